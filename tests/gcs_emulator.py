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

The emulator runs with :func:`patch_emulator`: three differences from GCS that stalled
tensorstore's reads and failed OCDBT's writes are fixed there (accepting concurrent connections,
the ``x-goog-generation`` download header, generation preconditions); the comment above it says
why, and ``tests/test_gcs_resume.py`` shows each with the stock emulator.
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


# Runs the emulator's own command line, with :func:`patch_emulator` applied, in a process that exits
# when the test process is gone (even if it was killed), so that no emulator outlives its tests.
# (PR_SET_PDEATHSIG would tie it to the thread that started it instead, and tests restart the
# emulator from helper threads.)
_LAUNCHER = """
import os, sys, threading, time
parent = int(sys.argv[1])
def watch():
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(0)
threading.Thread(target=watch, daemon=True).start()
if sys.argv[2]:
  sys.path.insert(0, sys.argv[2])
  from tests.gcs_emulator import patch_emulator
  patch_emulator()
from gcp_storage_emulator.__main__ import main
main(sys.argv[3:])
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# What gcp-storage-emulator does differently from GCS, and the fixes (applied in its process).
#
# 1. It serves one connection at a time (``http.server.HTTPServer``) from a listen backlog of 5
#    and closes each connection after one response (HTTP/1.0). tensorstore's gcs driver opens up to
#    32 connections at once (``gcs_request_concurrency``); the kernel drops the SYNs that do not
#    fit the backlog (``ListenOverflows`` in /proc/net/netstat) and curl resends them after 1, 3,
#    7, 15... s. Restoring a checkpoint of a few hundred arrays (one ``.zarray`` and one chunk read
#    each) then stalls for minutes: "tensorstore's reads stall". Fix: accept every connection at
#    once (a thread per connection, backlog 1024) and run the handlers one at a time under a lock
#    (the emulator's storage is not thread-safe; one at a time also makes conditional writes
#    atomic, as GCS's are).
# 2. Media downloads (``alt=media``) lack the ``x-goog-generation`` and ``x-goog-metageneration``
#    headers that GCS sends with every object download. tensorstore takes a read's storage
#    generation from ``x-goog-generation`` and gets 0 without it; OCDBT then writes its
#    ``manifest.ocdbt`` conditioned on that generation and tensorstore refuses it ("Malformed
#    StorageGeneration"), so "OCDBT writes fail" once a checkpoint has more than a handful of
#    arrays (the first commit needs no read). Fix: send the headers.
# 3. It ignores the generation preconditions (``ifGenerationMatch``, ``ifGenerationNotMatch``
#    query parameters): every conditional write succeeds and every conditional read returns the
#    object. GCS answers a failed precondition with 412 (and a read whose ``ifGenerationNotMatch``
#    holds the current generation with 304 Not Modified); ``ifGenerationMatch=0`` means "no live
#    object". OCDBT's manifest commits and core.io.storage's append-by-compose rely on them. Fix:
#    check them before the handler runs, per the JSON API (objects.get/insert/delete/patch/
#    compose: the object named in the path or upload; copyTo/rewriteTo: the destination).
# ------------------------------------------------------------------------------------------------

_PRECONDITION_FAILED = {"error": {"code": 412, "message": "Precondition Failed", "errors": [
    {"domain": "global", "reason": "conditionNotMet", "message": "Precondition Failed",
     "locationType": "header", "location": "If-Match"}]}}


def _target(request) -> tuple[str | None, str | None]:
  """(bucket, object name) that a request's generation preconditions refer to."""
  params = request.params or {}
  if params.get("dest_object_id"):  # copyTo / rewriteTo: the destination
    return params.get("dest_bucket_name"), params["dest_object_id"]
  name = params.get("object_id")
  if name is None and "upload_id" not in request.query:  # uploads name the object in the query
    name = (request.query.get("name") or [None])[0]      # or in the metadata part / body
    data = request.data if request.method == "POST" else None
    if name is None and isinstance(data, dict):
      name = (data.get("meta") or {}).get("name") or data.get("name")
  return params.get("bucket_name"), name


def _with_gcs_semantics(handler, storage_lock):
  """``handler`` (an emulator route handler) run under ``storage_lock`` after checking the
  generation preconditions, with the generation headers added to media downloads (see above)."""
  from http import HTTPStatus

  from gcp_storage_emulator.exceptions import NotFound

  def run(request, response, storage, *args, **kwargs):
    with storage_lock:
      bucket, name = _target(request)
      if bucket and name:
        try:
          current = int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
          current = 0  # "no live object" is generation 0 in preconditions
        match = request.query.get("ifGenerationMatch")
        not_match = request.query.get("ifGenerationNotMatch")
        if match and int(match[0]) != current:
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json(_PRECONDITION_FAILED)
          return None
        if not_match and int(not_match[0]) == current:
          if request.method == "GET":
            response.status = HTTPStatus.NOT_MODIFIED
          else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(_PRECONDITION_FAILED)
          return None
      out = handler(request, response, storage, *args, **kwargs)
      media = request.method == "GET" and (
          "/download/" in request.path or (request.query.get("alt") or [""])[0] == "media")
      if media and bucket and name and response.status in (HTTPStatus.OK,
                                                            HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
        response["x-goog-stored-content-length"] = str(obj["size"])
      return out
  return run


def patch_emulator() -> None:
  """Applies the three fixes above to ``gcp_storage_emulator`` (call before it starts)."""
  import functools
  import http.server
  import socketserver
  import threading

  from gcp_storage_emulator import server as emu

  if getattr(emu, "patched_for_gcs_semantics", False):
    return
  lock = threading.RLock()
  emu.HANDLERS = tuple((regex, {method: _with_gcs_semantics(fn, lock)
                                for method, fn in handlers.items()})
                       for regex, handlers in emu.HANDLERS)
  # The router's fallback for uploads POSTed without the /upload prefix calls objects.insert.
  emu.objects.insert = _with_gcs_semantics(emu.objects.insert, lock)

  class ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
      if not isinstance(sys.exc_info()[1], ConnectionError):  # not a client that hung up
        super().handle_error(request, client_address)

  def run(thread):  # APIThread.run with the threading server
    # pylint: disable=protected-access
    thread._httpd = ThreadingServer((thread._host, thread._port),
                                    functools.partial(emu.RequestHandler, thread._storage))
    thread.is_running.set()
    thread._httpd.serve_forever()

  emu.APIThread.run = run
  emu.patched_for_gcs_semantics = True


class GcsEmulator:
  """``gcp-storage-emulator`` on 127.0.0.1:``port``, one bucket, objects kept in ``data_dir``;
  ``stock=True`` runs it without :func:`patch_emulator` (to show what the fixes fix)."""

  def __init__(self, bucket: str = BUCKET, port: int | None = None, data_dir: str | None = None,
               stock: bool = False):
    self.bucket = bucket
    self.stock = stock
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
    cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), "" if self.stock else ROOT,
           "--data-dir", self.data_dir,
           "start", "--host", "127.0.0.1", "--port", str(self.port), "--default-bucket",
           self.bucket, "--quiet"]
    # stderr goes to a file, not a pipe nobody reads: the server's tracebacks for clients that
    # hung up mid-response would fill a pipe's 64 KiB and block it.
    self._stderr = tempfile.TemporaryFile()
    self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                  env={k: v for k, v in os.environ.items()
                                       if k != "STORAGE_EMULATOR_HOST"})
    deadline = time.monotonic() + timeout
    while True:
      if self._proc.poll() is not None:
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace")[-2000:]
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
    self._stderr.close()
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
