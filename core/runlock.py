"""One trainer per run directory: a lock on ``<run>/train.lock`` held while a run trains.

Local (and network file systems): an ``fcntl.flock``. The kernel drops it however the process
dies, so a killed run never blocks its resume. A file system that cannot flock (Lustre mounted
without ``-o flock``, NFS without a lock manager) is a one-line error naming the mount option.

``gs://``: a lease object that a trainer creates or takes over only with a generation precondition
(GCS's ``ifGenerationMatch``: of two trainers racing for it, exactly one write succeeds). It holds
the holder's pid, host, start time and expiry; a thread renews it every ``renew_every`` seconds.
A trainer that finds a lease renewed while it watches is refused in one line naming the holder; a
lease nobody renews (its holder was killed or cut off) runs out ``ttl`` seconds after its last
renewal and is taken over, so a restarted run waits at most ``ttl`` (not at all when the dead
holder was a process of the same host). A holder that could not renew in time and finds its lease
taken stops at once (exit status 2) rather than write beside the new holder. Expiry compares wall
clocks across hosts, so it assumes them synchronised (NTP) to well under ``ttl``.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from core.errors import UserError
from core.io import storage

LOCK_FILE = "train.lock"
# flock(2) on a file system that does not implement it: ENOSYS (Lustre's default 'noflock'),
# EOPNOTSUPP / ENOTSUP, or ENOLCK (NFS without a reachable lock manager).
FLOCK_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)
LEASE_TTL_S = 60.0    # a restarted run waits at most this long for a killed holder's lease
LEASE_RENEW_S = 10.0  # a second trainer is refused once it sees a renewal: within this long
EXIT_LOST = 2
log = logging.getLogger(__name__)


def _iso(t: float | None = None) -> str:
  return datetime.datetime.fromtimestamp(time.time() if t is None else t,
                                         datetime.timezone.utc).isoformat(timespec="seconds")


def _identity() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname()}


class RunLock:
  """An exclusive, non-blocking lock on a local run directory; ``release`` (or exit) frees it."""

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    run_dir = os.path.dirname(self.path)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot write to run directory {run_dir} ({e.strerror}); "
                      f"choose a writable workdir=") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in FLOCK_UNSUPPORTED:
        raise UserError(
            f"the file system of run directory {run_dir} does not support flock "
            f"({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}), which keeps a second "
            f"trainer off a run; mount it with locking (Lustre: -o flock; NFS: -o lock with "
            f"rpc.statd running, or NFSv4) or choose a workdir on another file system "
            f"(a local disk, gs://)") from None
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise UserError(f"run directory {run_dir} is in use by {self.holder()}; "
                      f"wait for it to finish or stop it, then rerun to resume") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(dict(_identity(), since=_iso())).encode() + b"\n")
    self._fd = fd
    return self

  def holder(self) -> str:
    """'process <pid> on <host> (since <time>)' as written by the holder, or 'another process'."""
    try:
      with open(self.path, encoding="utf-8") as f:
        h = json.loads(f.read() or "{}")
      return f"process {h['pid']} on {h['host']} (since {h['since']})"
    except (OSError, ValueError, KeyError):
      return "another process"

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _exit_lost(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(EXIT_LOST)  # pylint: disable=protected-access  (from a thread: stop writing now)


class GcsLease:
  """The lease of a ``gs://`` run directory (see the module docstring); ``release`` frees it.

  Args:
    run_dir: ``gs://bucket/prefix`` of the run.
    ttl: seconds after its last renewal that a lease runs out (default LEASE_TTL_S).
    renew_every: seconds between renewals, well under ``ttl`` since a renewal may be retried
      (default LEASE_RENEW_S).
    on_lost: called with a one-line message when the lease was taken while held; the default
      prints it and exits the process (exit status 2).
  """

  def __init__(self, run_dir: str, *, ttl: float | None = None, renew_every: float | None = None,
               on_lost=_exit_lost):
    ttl = LEASE_TTL_S if ttl is None else float(ttl)
    renew_every = LEASE_RENEW_S if renew_every is None else float(renew_every)
    if not 0 < renew_every < ttl:
      raise ValueError(f"renew_every={renew_every} must be in (0, ttl={ttl})")
    self.run_dir = run_dir
    self.path = storage.join(run_dir, LOCK_FILE)
    self.ttl, self.renew_every = ttl, renew_every
    self.token = uuid.uuid4().hex  # tells our own lease (and our own retried write) apart
    self._on_lost = on_lost
    self._since = None
    self._generation: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self._generation is not None

  def _record(self) -> bytes:
    now = time.time()
    return json.dumps(dict(_identity(), since=self._since, renewed=_iso(now),
                           expires=now + self.ttl, expires_at=_iso(now + self.ttl),
                           token=self.token), indent=1).encode()

  @staticmethod
  def _parse(data: bytes | None) -> dict | None:
    """The lease in ``data``; None when there is none (absent, or not a lease: taken over)."""
    try:
      lease = json.loads(data) if data else None
      return lease if isinstance(lease, dict) and float(lease["expires"]) > 0 else None
    except (ValueError, KeyError, TypeError):
      return None

  @staticmethod
  def describe(lease: dict) -> str:
    return (f"process {lease.get('pid')} on {lease.get('host')} (since {lease.get('since')}; "
            f"lease renewed {lease.get('renewed')}, expires {lease.get('expires_at')})")

  @staticmethod
  def _stale(lease: dict) -> bool:
    """Whether someone else's lease may be taken: run out, or its holder is a process of this
    host that no longer exists (a quick restart on the same machine need not wait)."""
    if float(lease["expires"]) <= time.time():
      return True
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
      try:
        os.kill(lease["pid"], 0)
      except ProcessLookupError:
        return True
      except OSError:
        pass
    return False

  def acquire(self) -> "GcsLease":
    """Creates or takes over the lease; UserError when a live holder renews it meanwhile."""
    watched = None  # the generation of someone else's lease we are waiting on
    while True:
      data, generation = storage.read_generation(self.path)
      lease = self._parse(data)
      if lease is not None and lease.get("token") == self.token:
        self._generation = generation  # our write went through (its retried request said 412)
        break
      if lease is not None and not self._stale(lease):
        if watched is not None and generation != watched:
          raise UserError(f"run directory {self.run_dir} is in use by {self.describe(lease)}; "
                          f"wait for it to finish or stop it, then rerun to resume")
        if watched is None:
          print(f"waiting for the lease {self.path} of {self.describe(lease)}: taken over if "
                f"not renewed before it expires", file=sys.stderr, flush=True)
        watched = generation
        wait = min(float(lease["expires"]) - time.time(), self.renew_every)
        time.sleep(max(0.0, wait) + 0.1)
        continue
      self._since = _iso()
      try:
        self._generation = storage.write_if_generation(self.path, self._record(), generation)
        break
      except storage.ConflictError:
        continue  # another trainer wrote first: look again
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, name="gcs-lease", daemon=True)
    self._thread.start()
    return self

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_every):
      try:
        try:
          self._generation = storage.write_if_generation(self.path, self._record(),
                                                         self._generation)
          continue
        except storage.ConflictError:
          data, generation = storage.read_generation(self.path)
        lease = self._parse(data)
        if lease is not None and lease.get("token") == self.token:
          self._generation = generation  # our own write, retried after its answer was lost
          continue
      except Exception as e:  # pylint: disable=broad-except  (GCS down beyond the retries)
        log.warning("renewing the lease %s failed (%s); trying again in %g s", self.path, e,
                    self.renew_every)
        continue
      self._generation = None
      if not self._stop.is_set():
        taker = self.describe(lease) if lease else "nobody (it was deleted)"
        self._on_lost(f"lost the lease {self.path} of the run (not renewed for {self.ttl:g} s) "
                      f"to {taker}; stopping without writing more")
      return

  def release(self) -> None:
    """Stops renewing and deletes the lease if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._generation is not None:
      try:
        storage.delete_if_generation(self.path, self._generation)
      except Exception as e:  # pylint: disable=broad-except  (it runs out by itself)
        log.warning("could not delete the lease %s (%s); it expires within %g s", self.path, e,
                    self.ttl)
      self._generation = None

  def __enter__(self) -> "GcsLease":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_run_dir(run_dir: str) -> RunLock | GcsLease:
  """The lock of a run directory, acquired: a lease for ``gs://``, else a flock."""
  return (GcsLease(run_dir) if storage.is_remote(run_dir) else RunLock(run_dir)).acquire()
