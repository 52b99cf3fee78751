"""Faults and bad input at the trainer (issue 12): each ends in one ``error:`` line (or exit 75 for
preemption) and loses or duplicates nothing already written. The second-trainer and single-host
SIGTERM cases are in tests/test_train.py (test_sigterm_writes_a_final_checkpoint), the stale lock of
a SIGKILLed run in test_sigkill_at_random_step_resumes_bit_exactly.

Most cases rerun ``python -m core.train`` on a copy of one finished 4-step run (checkpoints at
steps 2 and 4) and check that its metrics.jsonl and checkpoints are exactly as they were.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorstore as ts

from core.checkpoint import quiet_closed_loop_errors
from tests.test_train import ROOT, _env, _free_port, losses, run_train, train_cmd

# One xdist worker runs the module: its tests copy one finished run (module fixture), built once.
pytestmark = pytest.mark.xdist_group("faults_train")

STEPS = ["Train.num_steps=4"]


def rows(workdir) -> list[dict]:
  """metrics.jsonl rows; every line must be complete JSON."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(l) for l in f]


def assert_rows_unique_and_complete(workdir, last_step: int) -> None:
  assert [r["step"] for r in rows(workdir)] == list(range(1, last_step + 1))


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def snapshot(workdir) -> dict[str, bytes]:
  """Every file under the run directory except the lock and TensorBoard events, by content."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for f in files:
      rel = os.path.relpath(os.path.join(dirpath, f), workdir)
      if rel != "train.lock" and not rel.startswith("train" + os.sep):
        with open(os.path.join(dirpath, f), "rb") as fh:
          out[rel] = fh.read()
  return out


def one_error_line(p: subprocess.CompletedProcess) -> str:
  """The process failed with exactly one ``error:`` line, the last of stderr, and no traceback."""
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], p.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One finished 4-step run (checkpoints 2 and 4), trained once for the module."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  run_train(workdir, *STEPS)
  assert checkpoint_steps(workdir) == [2, 4]
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(finished_run, dst)
  return dst


@pytest.mark.parametrize("binding, names", [
    ("Train.learning_rate='fast'", ["Train.learning_rate", "float"]),
    ("Train.batch_size='8'", ["Train.batch_size", "Train.batch_size=8"]),
    ("UNet.num_res_blocks=[1,1", ["UNet.num_res_blocks=[1,1", "brackets"]),
    ("UNet.num_res_blocks=abc", ["UNet.num_res_blocks=abc"]),
    ("Train.num_steps=0", ["Train.num_steps=0", "at least 1"]),
    ("Train.num_steps=-5", ["Train.num_steps=-5", "at least 1"]),
])
def test_bad_value_is_one_line_and_leaves_the_run_intact(run_copy, binding, names):
  before = snapshot(run_copy)
  line = one_error_line(run_train(run_copy, *STEPS, binding, check=False))
  for n in names:
    assert n in line, line
  assert "ast.Name" not in line
  assert snapshot(run_copy) == before


def test_changed_model_names_the_parameter_and_both_shapes(run_copy):
  before = snapshot(run_copy)
  line = one_error_line(run_train(run_copy, *STEPS, "UNet.base_channels=16", check=False))
  # The first parameter in sorted order whose shape differs: the logSNR embedding's first dense
  # layer, base_channels sinusoidal features into emb_channels=16, with the checkpoint's shape
  # and then the model's.
  assert "checkpoint step 4" in line, line
  want = "params['cond']['logsnr_dense0']['kernel'] of shape (8, 16) but the model's is (16, 16)"
  assert want in line, line
  assert snapshot(run_copy) == before


def _corrupt_data_files(step_dir) -> None:
  """Truncates every array data file of a checkpoint to zero bytes."""
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(dirpath) == "d":
      for f in files:
        open(os.path.join(dirpath, f), "wb").close()


def _corrupt_manifest(step_dir) -> None:
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      if f == "manifest.ocdbt":
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.write(b"\xff" * 64)


def _corrupt_data_state(step_dir) -> None:
  """The grain iterator state (JSON) of the checkpoint, cut in half."""
  for dirpath, _, files in os.walk(os.path.join(step_dir, "data")):
    for f in files:
      path = os.path.join(dirpath, f)
      data = open(path, "rb").read()
      open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_corrupt_data_files, _corrupt_data_state],
                         ids=["zeroed-arrays", "truncated-iterator-state"])
def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(run_copy, corrupt):
  """Step 4 is corrupt: it is moved aside (named, with why), the run resumes from step 2, and the
  rewritten steps 3 and 4 have the same losses as before (bit-exact)."""
  want = losses(run_copy)
  corrupt(run_copy / "checkpoints" / "4")
  p = run_train(run_copy, *STEPS)
  note = [l for l in p.stderr.splitlines() if l.startswith("checkpoint step 4 does not restore")]
  assert len(note) == 1 and "resuming from step 2" in note[0], p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert (run_copy / "checkpoints.corrupt" / "4").is_dir()  # kept, not deleted
  assert checkpoint_steps(run_copy) == [2, 4]
  assert_rows_unique_and_complete(run_copy, 4)
  assert losses(run_copy) == want


def test_no_checkpoint_restores_is_one_line_and_moves_nothing(run_copy):
  """Garbled manifests in every checkpoint (as after a change of optimizer, nothing restores):
  nothing is moved aside, one line names the newest and why."""
  for step in (2, 4):
    _corrupt_manifest(run_copy / "checkpoints" / str(step))
  before = snapshot(run_copy)
  line = one_error_line(run_train(run_copy, *STEPS, check=False))
  assert "checkpoint step 4" in line and "does not restore" in line, line
  assert snapshot(run_copy) == before and not (run_copy / "checkpoints.corrupt").exists()


def _mount_tmpfs(path, size: str, *options: str) -> bool:
  """Mounts a small tmpfs (needs root); False where that is not possible."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  opts = ",".join((f"size={size}",) + options)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def _umount(path) -> None:
  subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_run_directory_is_one_line(finished_run, tmp_path):
  """A finished run on a read-only file system (a mount as root, file modes otherwise)."""
  mnt = tmp_path / "ro"
  mounted = _mount_tmpfs(mnt, "16m")
  if not mounted and os.geteuid() == 0:
    pytest.skip("root without mount: permissions do not stop root")
  try:
    shutil.copytree(finished_run, mnt / "run")
    before = snapshot(mnt / "run")
    if mounted:
      assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
    else:
      for dirpath, dirs, files in os.walk(mnt / "run"):
        for n in dirs + files:
          os.chmod(os.path.join(dirpath, n), 0o555)
      os.chmod(mnt / "run", 0o555)
    line = one_error_line(run_train(mnt / "run", *STEPS, check=False))
    assert "cannot write to run directory" in line and str(mnt / "run") in line, line
    assert snapshot(mnt / "run") == before
  finally:
    if mounted:
      _umount(mnt)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(tmp_path):
  """A 3 MB file system fills up at the third checkpoint (about 1.4 MB each; orbax deletes none
  before the fourth, so where it fills does not depend on timing): one line naming the
  step and where a rerun resumes; no half-written *-tmp checkpoint; after freeing space the rerun
  resumes and reproduces the lost steps exactly, each logged once."""
  mnt = tmp_path / "small"
  if not _mount_tmpfs(mnt, "3m"):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    run = mnt / "run"
    args = ["Train.num_steps=10"]
    line = one_error_line(run_train(run, *args, check=False))
    assert "No space left on device" in line and "resume from step" in line, line
    resume_from = int(line.rsplit("resume from step ", 1)[1].split()[0])
    steps = checkpoint_steps(run)
    assert steps and steps[-1] == resume_from
    assert not [n for n in os.listdir(run / "checkpoints") if "tmp" in n]
    before = losses(run)
    assert subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)]).returncode == 0
    run_train(run, *args)
    assert_rows_unique_and_complete(run, 10)
    after = losses(run)
    assert all(after[s] == before[s] for s in before)
  finally:
    _umount(mnt)


def preempted_step(stderr: str) -> int:
  """N of the last line, ``preempted: SIGTERM at step N: ...``."""
  line = [l for l in stderr.splitlines() if l.strip()][-1]
  assert line.startswith("preempted: SIGTERM at step"), stderr[-2000:]
  return int(line.split("at step ")[1].split(":")[0])


def _wait_rows(workdir, n: int, proc, timeout: float = 300) -> None:
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= n:
      return
    time.sleep(0.02)
  raise AssertionError(f"no {n} rows in {metrics} (process rc={proc.poll()})")


@pytest.mark.slow
def test_two_hosts_stop_at_the_same_step_and_resume_exactly(tmp_path):
  """Two JAX processes on localhost; only process 1 gets SIGTERM. Through the preemption sync
  manager (orbax's reached_preemption) both stop and checkpoint at the same step, both exit 75,
  and resuming reproduces an uninterrupted two-process run's losses bit for bit."""
  common = ["Train.num_steps=20", "Train.num_data_shards=2", "Train.checkpoint_every=100000"]

  def start(workdir):
    port = _free_port()
    return [subprocess.Popen(train_cmd(workdir, *common, f"coordinator=127.0.0.1:{port}",
                                       "num_processes=2", f"process_id={i}"),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]

  def finish(procs):
    errs = []
    for p in procs:
      _, err = p.communicate(timeout=600)
      errs.append(err)
    return [p.returncode for p in procs], errs

  ref = tmp_path / "ref"
  codes, errs = finish(start(ref))
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]

  run = tmp_path / "run"
  procs = start(run)
  try:
    _wait_rows(run, 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    codes, errs = finish(procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [75, 75], errs[0][-2000:] + errs[1][-2000:]
  stops = [preempted_step(e) for e in errs]
  assert stops[0] == stops[1] < 20, stops
  assert checkpoint_steps(run) == [stops[0]]
  assert_rows_unique_and_complete(run, stops[0])

  codes, errs = finish(start(run))
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert_rows_unique_and_complete(run, 20)
  assert losses(run) == losses(ref)


def test_unraisable_errors_of_callbacks_on_a_closed_loop_are_dropped_and_others_kept(monkeypatch):
  """After a failed save, tensorstore's future callbacks find orbax's event loop closed; tensorstore
  reports each through sys.unraisablehook (a bare traceback on stderr). Those, and only those, are
  dropped."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  quiet_closed_loop_errors()
  quiet_closed_loop_errors()  # idempotent: wraps once
  loop = asyncio.new_event_loop()
  loop.close()
  def fire(callback):
    promise, future = ts.Promise.new()
    future.add_done_callback(callback)
    promise.set_result(1)
    time.sleep(0.3)
  fire(lambda f: loop.call_soon_threadsafe(print))           # the noise
  fire(lambda f: (_ for _ in ()).throw(ValueError("kept")))  # any other error is kept
  assert [type(u.exc_value).__name__ for u in seen] == ["ValueError"]
  assert str(seen[0].exc_value) == "kept"


def test_reads_a_sigterm_abandoned_print_nothing_when_collected(monkeypatch):
  """A SIGTERM during a restore leaves orbax's started array reads unfinished; when the garbage
  collector closes each, orbax's ``except BaseException`` turns the ``GeneratorExit`` into an
  ``Exception`` that Python reports through sys.unraisablehook (hundreds of tracebacks, seen in a
  clean-clone ``make test``). Those are dropped; an error in any other finaliser is kept."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  quiet_closed_loop_errors()

  class Reading:  # an awaitable that is still under way
    def __await__(self):
      yield

  async def read_array_index():  # the shape of orbax's _read_array_index_and_device_put
    try:
      await Reading()
    except BaseException as e:  # pylint: disable=broad-exception-caught
      raise Exception("Encountered error while reading array index") from e  # pylint: disable=W0719

  class Other:
    def __del__(self):
      raise ValueError("kept")

  read = read_array_index()
  read.send(None)  # started, suspended in the read
  del read
  Other()
  gc.collect()
  assert [type(u.exc_value).__name__ for u in seen] == ["ValueError"]


def catches_sigterm(pid: int) -> bool:
  """Whether the process has a handler for SIGTERM (SigCgt in /proc/<pid>/status)."""
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      caught = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
def test_two_hosts_signalled_before_the_loop_of_a_resumed_run_stop_after_one_step(tmp_path):
  """Two JAX processes resume a run at step 2; process 1 gets SIGTERM as soon as it handles one
  (the start of core.train, while it imports JAX; before the fix, once jax.distributed had
  installed the preemption sync manager's handler, before the loop). The notice reaches the sync
  manager before any process has reported a step: both stop after one more step (3), checkpoint
  it and exit 75, each step logged once. Before the fix the sync point was step 1, which a run
  resumed at step 2 never reaches: it trained to the end (or the process died of the signal)."""
  common = ["Train.num_steps=6", "Train.num_data_shards=2", "Train.checkpoint_every=100000"]
  run = tmp_path / "run"

  def start(*extra):
    port = _free_port()
    return [subprocess.Popen(train_cmd(run, *common, *extra, f"coordinator=127.0.0.1:{port}",
                                       "num_processes=2", f"process_id={i}"),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]

  def finish(procs):
    try:
      errs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    return [p.returncode for p in procs], errs

  codes, errs = finish(start("stop_at_step=2"))
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert checkpoint_steps(run) == [2]

  procs = start()
  deadline = time.time() + 300
  while not catches_sigterm(procs[1].pid) and procs[1].poll() is None and time.time() < deadline:
    time.sleep(0.005)
  procs[1].send_signal(signal.SIGTERM)
  codes, errs = finish(procs)
  assert codes == [75, 75], errs[0][-2000:] + errs[1][-2000:]
  assert [preempted_step(e) for e in errs] == [3, 3]
  assert checkpoint_steps(run) == [2, 3]
  assert_rows_unique_and_complete(run, 3)
