#!/usr/bin/env bash
# Set up .venv if needed (CPU torch pinned first), then run the main job.
# Runs every task's shipped model on the shipped sample scans; extra arguments go to `medidiff demo`,
# e.g. `bash scripts/demo.sh --out my_demo --steps 20`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${MEDIDIFF_VENV:-$root/.venv}/bin/medidiff" demo "$@"
