"""A real Google Cloud Storage emulator for tests (``gcp-storage-emulator`` in a subprocess).

Fixtures (import them into a test module, or into ``tests/conftest.py`` for every module)::

    from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

    def test_something(gcs_bucket):          # 'gs://sd-test-bucket/<test name>-<random>'
      storage.write_text(gcs_bucket + '/x.txt', 'hi')

* ``gcs_emulator`` (session): the :class:`GcsEmulator` (``.url``, ``.bucket``, ``.stop()``,
  ``.start()``). One emulator per test process (per xdist worker), started on first use on a free
  port of 127.0.0.1, stopped when the session ends. It keeps its objects in a temporary directory,
  so they survive a ``stop()``/``start()`` (used to simulate an outage).
* ``gcs_bucket`` (function): a fresh ``gs://`` prefix inside the emulator's bucket, with the
  environment pointing every client at the emulator for the duration of the test:

  - ``STORAGE_EMULATOR_HOST``: google-cloud-storage (core.io.storage) and gcsfs (orbax/etils paths);
  - ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore's gcs driver
    (orbax array data) talks to the emulator with a dummy bearer token;
  - ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs does not probe the bucket layout API;
  - ``GOOGLE_CLOUD_PROJECT``: the project the anonymous client reports.

Both fixtures depend only on pytest's built-in ``request`` fixture, so importing ``gcs_bucket``
alone into a test module is enough.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

BUCKET = "sd-test-bucket"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Runs the emulator's own command line in a process that exits when the test process is gone
# (even if it was killed), so that no emulator outlives its tests. (PR_SET_PDEATHSIG would tie it
# to the thread that started it instead, and tests restart the emulator from helper threads.)
_LAUNCHER = """
import os, sys, threading, time
parent = int(sys.argv[1])
def watch():
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from gcp_storage_emulator.__main__ import main
main(sys.argv[2:])
"""


class GcsEmulator:
  """``gcp-storage-emulator`` on 127.0.0.1:``port``, one bucket, objects kept in ``data_dir``."""

  def __init__(self, bucket: str = BUCKET, port: int | None = None, data_dir: str | None = None):
    self.bucket = bucket
    self.port = port or free_port()
    self._own_dir = data_dir is None
    self.data_dir = data_dir or tempfile.mkdtemp(prefix="gcs-emulator-")
    self._proc: subprocess.Popen | None = None

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def env(self) -> dict[str, str]:
    """Environment variables that point google-cloud-storage, gcsfs and tensorstore here."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test-project",
    }

  @property
  def running(self) -> bool:
    return self._proc is not None and self._proc.poll() is None

  def start(self, timeout: float = 30.0) -> None:
    """Starts the server (same port and data as before) and waits until it answers."""
    if self.running:
      return
    cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), "--data-dir", self.data_dir,
           "start", "--host", "127.0.0.1", "--port", str(self.port), "--default-bucket",
           self.bucket, "--quiet"]
    self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env={k: v for k, v in os.environ.items()
                                       if k != "STORAGE_EMULATOR_HOST"})
    deadline = time.monotonic() + timeout
    while True:
      if self._proc.poll() is not None:
        err = self._proc.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"gcp-storage-emulator exited with {self._proc.returncode}: {err}")
      try:
        with urllib.request.urlopen(self.url + "/", timeout=1) as r:
          if r.read() == b"OK":
            return
      except OSError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not answer on {self.url} in {timeout}s")
      time.sleep(0.05)

  def stop(self) -> None:
    """Stops the server (objects stay in ``data_dir``); connections to the port are refused."""
    if self._proc is None:
      return
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    if self._proc.stderr:
      self._proc.stderr.close()
    self._proc = None

  def close(self) -> None:
    self.stop()
    if self._own_dir:
      shutil.rmtree(self.data_dir, ignore_errors=True)


_shared: GcsEmulator | None = None


def _shared_emulator(request: pytest.FixtureRequest) -> GcsEmulator:
  """The process-wide emulator, started on first use and closed when the pytest session ends."""
  global _shared
  if _shared is None:
    emu = GcsEmulator()
    emu.start()
    _shared = emu

    def close():
      global _shared
      emu.close()
      _shared = None
    request.config.add_cleanup(close)
  elif not _shared.running:
    _shared.start()  # a test stopped it to simulate an outage and failed before restarting
  return _shared


@pytest.fixture(scope="session")
def gcs_emulator(request) -> GcsEmulator:
  """The running :class:`GcsEmulator` (session-wide)."""
  return _shared_emulator(request)


@pytest.fixture
def gcs_bucket(request):
  """A fresh ``gs://<bucket>/<test>-<hex>`` prefix on the emulator, env vars set for the test."""
  emu = _shared_emulator(request)
  name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
  with pytest.MonkeyPatch.context() as mp:
    for k, v in emu.env.items():
      mp.setenv(k, v)
    yield f"gs://{emu.bucket}/{name}-{uuid.uuid4().hex[:8]}"
  if not emu.running:
    emu.start()
