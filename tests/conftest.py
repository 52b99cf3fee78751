"""Shared test set-up: CPU-only JAX tuned for fast compiles, a repository-root import path, fixtures.

The suite compiles many small programs on a 2-core CPU, so compile time dominates: XLA's CPU
backend optimisations are turned down (programs still compute the same maths) and compiled
programs are cached on disk for the session, so the several processes of one test (a run, its
kill, its resume) compile once.
"""
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sd-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401,E402  (GCS emulator fixtures)
