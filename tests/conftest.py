"""Shared test set-up: CPU-only JAX tuned for fast compiles, a repository-root import path, fixtures.

The suite compiles many small programs on a 2-core CPU, so compile time dominates: XLA's CPU
backend optimisations are turned down (programs still compute the same maths) and compiled
programs are cached on disk, so the several processes of one test (a run, its kill, its resume)
compile once. Only programs that took a second or more to compile are kept: caching every eager
op's program too (hundreds per test) made eager-heavy tests ~40% slower alone, each lookup taking
the cache's lock. The cache outlives the session (a rerun compiles less), so it is bounded: JAX
evicts the least recently used programs beyond 512 MB.
"""
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sd-test-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(512 * 2**20))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401,E402  (GCS emulator fixtures)

import pytest  # noqa: E402

try:
  from _pytest.nodeid import NodeId  # pytest >= 9
except ImportError:  # pragma: no cover
  NodeId = None


# Longest first (measured on 2 idle cores, `make test`): pytest-xdist hands out work units in
# collection order, so a 6-minute unit collected last would run alone at the end while the other
# worker idles. Items matching these node-id prefixes come first, in this order, then the other
# `slow` tests, then the rest (otherwise in collection order). A module whose tests share an
# expensive module-scoped fixture is one xdist_group, one unit (its fixture is built once, on one
# worker): the SLURM group (about 6 minutes: the table row, then the four stops of one job) and the
# faults_train group (its two-host test and the module's shared run) are the largest units, so
# they go first, one to each worker; each worker takes one more unit while its first runs.
HEAVIEST = (
    "tests/test_slurm.py",
    "tests/test_faults_train.py",
    "tests/test_registry.py::test_table2_smoke_end_to_end",  # trains and evaluates 3 rows
    "tests/test_eval_worker.py",
    "tests/test_accelerators.py::test_gpu_check_smoke",
    "tests/test_learning.py",
    "tests/test_faults_run.py::test_sigterm_to_the_runner",
    "tests/test_scales.py::test_demo_uvit_learns",
    "tests/test_storage.py",  # the GCS emulator
    "tests/test_train.py",
)


def pytest_configure(config):
  # xdist would otherwise put groups with more tests first, whatever their duration.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def _set_nodeid(item, nodeid: str) -> None:
  if hasattr(item, "_id"):  # pytest >= 9 keeps a structured node id
    item._id = NodeId.parse(nodeid)  # pylint: disable=protected-access
  else:
    item._nodeid = nodeid  # pylint: disable=protected-access


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  def rank(item):
    for i, prefix in enumerate(HEAVIEST):
      if item.nodeid.startswith(prefix):
        return i
    return len(HEAVIEST) + (0 if item.get_closest_marker("slow") else 1)
  items.sort(key=rank)  # stable: collection order within a rank
  # `--dist loadgroup` sends the tests whose node ids end in the same "@group" to one worker.
  # pytest-xdist 3.8 appends the suffix by setting item._nodeid, which pytest 9 no longer reads
  # (every grouped test ran wherever it landed, building its module's fixtures on both workers),
  # so the suffix is set here on each worker, the way xdist would.
  if getattr(config.option, "loadgroup", False):
    for item in items:
      names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
               for m in item.iter_markers("xdist_group")}
      suffix = "@" + "_".join(sorted(names))
      if names and not item.nodeid.endswith(suffix):
        _set_nodeid(item, item.nodeid + suffix)
