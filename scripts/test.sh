#!/usr/bin/env bash
# Set up .venv if needed (CPU torch pinned first), then run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_samplers.py`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${MEDIDIFF_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
