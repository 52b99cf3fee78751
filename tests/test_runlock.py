"""One trainer per run directory (core/runlock.py): flock on file systems without it, and the
lease of gs:// run directories on the GCS emulator (tests/gcs_emulator.py, which honours
``ifGenerationMatch`` as GCS does)."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from core import runlock
from core import trainer
from core.errors import UserError
from core.io import storage
from tests.test_train import ROOT, _env


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_flock_unsupported_by_the_file_system_is_one_line_naming_the_mount_option(
    tmp_path, monkeypatch, err):
  """Lustre mounted without -o flock answers flock(2) with ENOSYS, other file systems with
  EOPNOTSUPP or ENOLCK (NFS without a lock manager). This machine has none of them, so the
  kernel's answer is simulated; the lock must turn it into one line naming the mount option."""
  def flock(fd, op):
    raise OSError(err, os.strerror(err))

  monkeypatch.setattr(runlock.fcntl, "flock", flock)
  with pytest.raises(UserError) as e:
    runlock.RunLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert "\n" not in msg and "does not support flock" in msg and str(tmp_path) in msg
  assert "-o flock" in msg and errno.errorcode[err] in msg
  monkeypatch.undo()
  with runlock.RunLock(str(tmp_path)):  # nothing left open or held
    pass


def test_conditional_writes_on_gcs(gcs_bucket):
  """write_if_generation / delete_if_generation carry ifGenerationMatch: a stale generation loses."""
  path = gcs_bucket + "/obj.json"
  assert storage.read_generation(path) == (None, 0)
  g1 = storage.write_if_generation(path, b"one", 0)
  with pytest.raises(storage.ConflictError):
    storage.write_if_generation(path, b"again", 0)  # 0: only if absent
  g2 = storage.write_if_generation(path, b"two", g1)
  assert g2 != g1 and storage.read_generation(path) == (b"two", g2)
  with pytest.raises(storage.ConflictError):
    storage.write_if_generation(path, b"stale", g1)
  assert not storage.delete_if_generation(path, g1)
  assert storage.read_text(path) == "two"
  assert storage.delete_if_generation(path, g2)
  assert storage.read_generation(path) == (None, 0)


def _lease(run, **kw):
  return runlock.GcsLease(run, **dict(dict(ttl=3.0, renew_every=0.3), **kw))


def _holder(run, ttl=3.0, renew=0.3):
  """A trainer-like process holding the lease of ``run``; returns it once it holds it."""
  code = ("import sys, time; from core import runlock\n"
          f"runlock.GcsLease({run!r}, ttl={ttl}, renew_every={renew}).acquire()\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n")
  p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert p.stdout.readline().strip() == "held", p.stderr.read()
  return p


def test_gcs_lease_refuses_a_second_trainer_and_is_taken_over_when_its_holder_dies(gcs_bucket):
  run = gcs_bucket + "/run"
  holder = _holder(run)
  try:
    lease = json.loads(storage.read_text(run + "/train.lock"))
    assert lease["pid"] == holder.pid and lease["host"] == socket.gethostname()
    assert lease["expires"] > time.time() and lease["since"] and lease["expires_at"]
    # A second trainer sees the lease renewed and is refused in one line naming the holder.
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
      _lease(run).acquire()
    assert f"in use by process {holder.pid} on {socket.gethostname()}" in str(e.value)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 3.0  # before it could expire
    assert json.loads(storage.read_text(run + "/train.lock"))["pid"] == holder.pid
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # Killed: the lease stays on the bucket, but its holder is gone: taken over at once.
  assert json.loads(storage.read_text(run + "/train.lock"))["pid"] == holder.pid
  mine = _lease(run).acquire()
  try:
    assert json.loads(storage.read_text(run + "/train.lock"))["token"] == mine.token
  finally:
    mine.release()
  assert storage.read_generation(run + "/train.lock") == (None, 0)  # released: deleted


def test_gcs_lease_of_a_silent_holder_on_another_host_expires(gcs_bucket):
  """A lease of another host that nobody renews is taken over once it runs out, not before."""
  run = gcs_bucket + "/run"
  expires = time.time() + 2.0
  storage.write_text(run + "/train.lock", json.dumps(
      {"pid": 1, "host": "another-host", "since": "x", "renewed": "x", "expires": expires,
       "expires_at": "x", "token": "theirs"}))
  lease = _lease(run).acquire()
  try:
    assert time.time() >= expires
    assert json.loads(storage.read_text(run + "/train.lock"))["token"] == lease.token
  finally:
    lease.release()


def test_gcs_lease_holder_that_lost_its_lease_stops_at_once(gcs_bucket):
  """A holder whose lease was taken (it could not renew in time: here, overwritten as an expired
  lease is taken over) exits with one error line naming the new holder, writing nothing more."""
  run = gcs_bucket + "/run"
  holder = _holder(run)
  try:
    storage.write_text(run + "/train.lock", json.dumps(
        {"pid": 7, "host": "new-host", "since": "x", "renewed": "x",
         "expires": time.time() + 60, "expires_at": "x", "token": "theirs"}))
    _, err = holder.communicate(timeout=60)
  finally:
    if holder.poll() is None:
      holder.kill()
  assert holder.returncode == runlock.EXIT_LOST
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: lost the lease"), err
  assert "process 7 on new-host" in lines[0]
  assert json.loads(storage.read_text(run + "/train.lock"))["token"] == "theirs"


def test_gcs_lease_race_has_one_winner(gcs_bucket):
  """Trainers starting together on an empty run: exactly one takes the lease."""
  run = gcs_bucket + "/run"
  results, barrier = [], threading.Barrier(4)

  def contend():
    lease = _lease(run, ttl=30.0, renew_every=0.5)
    barrier.wait()
    try:
      results.append(lease.acquire())
    except UserError as e:
      results.append(e)

  threads = [threading.Thread(target=contend) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  won = [r for r in results if isinstance(r, runlock.GcsLease)]
  assert len(won) == 1 and len(results) == 4, results
  assert json.loads(storage.read_text(run + "/train.lock"))["token"] == won[0].token
  won[0].release()


def test_trainer_locks_gcs_run_directories(gcs_bucket, monkeypatch):
  monkeypatch.setattr(runlock, "LEASE_TTL_S", 3.0)
  monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.3)
  run = gcs_bucket + "/run"
  lock = trainer._lock_run_dir(run)  # pylint: disable=protected-access
  try:
    assert isinstance(lock, runlock.GcsLease) and lock.held
    with pytest.raises(UserError, match="is in use by process"):
      trainer._lock_run_dir(run)  # pylint: disable=protected-access
  finally:
    lock.release()
  trainer._lock_run_dir(run).release()  # pylint: disable=protected-access
