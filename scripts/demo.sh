#!/usr/bin/env bash
# Set up .venv if needed (CPU torch pinned first), then run the main job.
# Extra arguments go to the command, e.g. `bash scripts/demo.sh --out my_demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${MEDIDIFF_VENV:-$root/.venv}/bin/python" benchmarks/bench_samplers.py "$@"
