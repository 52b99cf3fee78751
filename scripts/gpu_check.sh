#!/usr/bin/env bash
# The prepared one-GPU check (issues 15, 29) on a bare machine without network (`make gpu-check`).
# Installs the project's missing dependencies from wheels/ (built here by `make gpu-wheels`; the
# device tool carries it with carry=["wheels"]) into a private folder, then runs
# scripts/gpu_check.py, which writes benchmarks/results/<device>-<date>.json (and a copy in $OUT).
# Arguments go to scripts/gpu_check.py (out=, budget_s=, smoke=, tables=).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/sd-site}
if ! "$PY" -c "import gin, grain, array_record" 2>/dev/null; then
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "error: gin-config/grain are missing and wheels/ is empty: run 'make gpu-wheels' where pip works and carry wheels/" >&2
    exit 2
  fi
  # Only packages the image lacks are in wheels/, so nothing already installed is replaced.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --find-links wheels/ --target "$SITE" wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project itself without dependencies: its source tree on the path (the gin/ files resolve from it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax; print('[gpu-check]', jax.__version__, jax.devices())"
exec "$PY" scripts/gpu_check.py "$@"
