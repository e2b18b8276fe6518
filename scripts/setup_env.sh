#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install medidiff into it.
# torch is installed first and pinned to the CPU build this machine carries, so that pip never
# resolves the bare `torch` requirement to a multi-GB CUDA build. Re-running is cheap: a stamp
# file records the hash of pyproject.toml and the install is skipped while it is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEDIDIFF_VENV:-$root/.venv}"
torch_spec="${MEDIDIFF_TORCH:-torch==2.13.0}"
stamp="$venv/.medidiff-install-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $torch_spec"

if [ ! -x "$venv/bin/python" ]; then
    echo "[medidiff] creating virtual environment in $venv"
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[medidiff] installing $torch_spec, then medidiff with its dependencies (about a minute)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$torch_spec"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test]"
    echo "$want" > "$stamp"
fi
