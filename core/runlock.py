"""One trainer per run directory: an ``fcntl.flock`` on ``<run>/train.lock`` while a run trains.

The kernel drops the lock however the process dies, so a killed run never blocks its resume.
``gs://`` run directories cannot carry one; the TPU launcher's one queued resource per run keeps
two slices off one run directory.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from core.errors import UserError

LOCK_FILE = "train.lock"


class RunLock:
  """An exclusive, non-blocking lock on a local run directory; ``release`` (or exit) frees it."""

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot write to run directory {os.path.dirname(self.path)} ({e.strerror}); "
                      f"choose a writable workdir=") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise UserError(f"run directory {os.path.dirname(self.path)} is in use by {self.holder()}; "
                      f"wait for it to finish or stop it, then rerun to resume") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                 timespec="seconds")}).encode() + b"\n")
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
