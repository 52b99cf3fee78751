"""Shared test set-up: CPU-only JAX, a repository-root import path, and fixtures."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401,E402  (GCS emulator fixtures)
