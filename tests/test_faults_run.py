"""Faults and bad input at the front door, ``python -m experiments.run`` (issue 12).

Refusals are checked through :func:`core.errors.run_main` (the entry point's exit status and its
one ``error:`` line); the SIGTERM case runs the real command in a subprocess.
"""
from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from orbax.checkpoint._src.serialization import serialization

from core import config as config_lib
from core import train as train_cli
from core import errors
from core.errors import run_main
from experiments import jobs, run
from tests.test_faults_train import _mount_tmpfs, _umount, checkpoint_steps, rows
from tests.test_train import ROOT, _env

ROW = "cosine (shifted to 64)"  # a Table 2 row label: two jobs, at 128 and at 256


def exit_and_stderr(main, argv, capsys) -> tuple[int, str]:
  with pytest.raises(SystemExit) as e:
    run_main(main, argv)
  return e.value.code, capsys.readouterr().err


def one_error(code, err) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
  return lines[0]


TPU = ["launcher=tpu", "workdir=gs://b/sd", "repo_url=https://x/y.git"]


@pytest.mark.parametrize("args, names", [
    (["scale=paper"], ["scale=paper", "data_dir="]),
    (["scale=paper", "dry_run=true"], ["scale=paper", "data_dir="]),
    (["scale=paper", *TPU, "dry_run=true"], ["scale=paper", "data_dir="]),
    (["scale=demo", *TPU], ["launcher=tpu", "data_dir="]),
    # Table 2 trains at 128 and 256: one data set cannot serve both.
    (["scale=paper", *TPU, "data_dir=gs://b/imagenet128"], ["128, 256", "{res}"]),
])
def test_paper_scale_or_tpu_without_data_dir_is_refused(args, names, tmp_path, capsys, monkeypatch):
  """Without data_dir= these would have trained on the built-in emoji set, upscaled. (The local
  paper-scale cases pretend to have a GPU: on a CPU they are refused earlier, with their cost.)"""
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  workdir = [] if any(a.startswith("workdir=") for a in args) else [f"workdir={tmp_path / 'runs'}"]
  line = one_error(*exit_and_stderr(run.main, ["table=2", *args, *workdir], capsys))
  for n in names:
    assert n in line, line
  assert not (tmp_path / "runs").exists()


def test_paper_scale_tpu_with_data_dir_puts_each_resolution_in_its_commands(capsys):
  """data_dir=...{res} gives every job the data set at its own resolution."""
  assert run.main(["table=2", f"row={ROW}", "scale=paper", *TPU, "dry_run=true",
                   "data_dir=gs://b/imagenet{res}"]) == 0
  out = capsys.readouterr().out
  assert out.count("Train.data_dir=") == 2 and "imagenet128" in out and "imagenet256" in out


def test_dry_run_does_not_claim_jobs_were_done(tmp_path, capsys):
  code, err = exit_and_stderr(run.main, ["table=2", "scale=smoke", "dry_run=true",
                                         f"workdir={tmp_path / 'runs'}"], capsys)
  assert code == 0 and "nothing was run" in err and "done:" not in err, err
  assert not (tmp_path / "runs").exists()


def test_core_train_hint_names_gin_files_that_exist(capsys):
  line = one_error(*exit_and_stderr(train_cli.main, ["workdir=/tmp/x"], capsys))
  files = re.findall(r"gin_file=([\w/.-]+\.gin)", line)
  assert len(files) >= 2, line
  for f in files:
    assert os.path.isfile(config_lib.resolve_gin_file(f)), f


def test_read_only_output_directory_is_one_line(tmp_path, capsys):
  mnt = tmp_path / "ro"
  mounted = _mount_tmpfs(mnt, "1m", "ro")
  if not mounted:
    if os.geteuid() == 0:
      pytest.skip("root without mount: permissions do not stop root")
    os.chmod(mnt, 0o555)
  try:
    line = one_error(*exit_and_stderr(run.main, ["table=2", f"row={ROW}", "scale=smoke",
                                                 f"workdir={mnt / 'runs'}"], capsys))
    assert "cannot write to" in line and str(mnt) in line, line
  finally:
    if mounted:
      _umount(mnt)


ABANDONED = """
import asyncio, sys
from core.errors import UserError, run_main
async def write():
  pass
async def read_shard():
  raise ValueError("DATA_LOSS: a shard of the checkpoint")
def main(argv):
  main.pending = write()   # an async write the error abandons, finalised at shutdown
  # A failed task whose exception nobody retrieves (orbax restoring a garbled checkpoint reads
  # its arrays concurrently; one failure is raised, the others' tasks are finalised at shutdown).
  main.loop = asyncio.new_event_loop()
  main.task = main.loop.create_task(read_shard())
  main.loop.run_until_complete(asyncio.sleep(0.01))
  raise UserError("disk full; free space and rerun")
run_main(main)
"""


def test_work_abandoned_by_an_error_prints_nothing_after_its_line():
  """A coroutine left un-awaited by the failure (orbax's async checkpoint write on a full disk)
  would print a RuntimeWarning at shutdown, after the one error line, and a failed task nobody
  awaited asyncio's "Task exception was never retrieved" with a traceback."""
  p = subprocess.run([sys.executable, "-c", ABANDONED], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == ["error: disk full; free space and rerun"], p.stderr
  bare = ABANDONED.replace("from core.errors import UserError, run_main",
                           "from core.errors import UserError\nrun_main = lambda m: m([])")
  p = subprocess.run([sys.executable, "-c", bare], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=120)
  assert "never awaited" in p.stderr and "never retrieved" in p.stderr   # without run_main they appear


# A command that SIGTERM reaches while a finaliser runs: Python drops the exception the handler
# raises there ("Exception ignored in"), as it did while torch loaded the Inception network.
_SIGTERM_IN_A_FINALISER = """
import os, signal, sys, time
from core import errors

class Closes:
  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):   # the handler runs here, inside __del__
      time.sleep(0.001)

def main(argv):
  with errors.StopOnSigterm():
    Closes()
    for _ in range(100):   # 5 s of work after the finaliser
      time.sleep(0.05)
    print("ran to the end")
  return 0

errors.run_main(main, [])
"""


def test_sigterm_dropped_inside_a_finaliser_still_stops_the_command():
  p = subprocess.run([sys.executable, "-c", _SIGTERM_IN_A_FINALISER], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 75 and "ran to the end" not in p.stdout, (p.returncode, p.stdout, p.stderr)
  assert "preempted:" in p.stderr and "Exception ignored" not in p.stderr, p.stderr


@pytest.mark.slow
def test_sigterm_to_the_runner_stops_it_without_a_result(tmp_path):
  """A job trained to step 2 of 4 (a staged run), then the table command, SIGTERMed once its
  trainer has resumed: the trainer checkpoints step 3 and the command exits 75; that partial
  checkpoint is not evaluated (no results.jsonl, no row result) and the next job never starts."""
  workdir = tmp_path / "runs"
  job, _ = run.registry.jobs(run.registry.select("2", [ROW]))
  run_dir = workdir / job.name
  staged = subprocess.run([sys.executable, "-m", "core.train",
                           *jobs.job_args(job, "smoke", str(run_dir), None), "stop_at_step=2"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert staged.returncode == 0, staged.stderr[-3000:]
  assert checkpoint_steps(run_dir) == [2]

  p = subprocess.Popen([sys.executable, "-m", "experiments.run", "table=2", f"row={ROW}",
                        "scale=smoke", f"workdir={workdir}"], cwd=ROOT, env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out = ""
    while p.poll() is None and "resumed from step 2" not in out:
      out += p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=600)
  finally:
    if p.poll() is None:
      p.kill()
  out += rest
  assert p.returncode == 75, (out[-2000:], err[-3000:])
  last = [l for l in err.splitlines() if l.strip()][-1]
  assert last.startswith("preempted: SIGTERM"), err[-2000:]
  assert "evaluating" not in out and out.count("training") == 1, out
  assert not (run_dir / "eval").exists()
  assert checkpoint_steps(run_dir) == [2, 3]  # stopped after one more step, not finished (4)
  assert [r["step"] for r in rows(run_dir)] == [2]  # Train.log_every=2 at smoke scale: logged once
  assert sorted(os.listdir(workdir)) == [job.name]  # the next job never started



def test_sigterm_inside_an_asyncio_callback_still_stops_the_block():
  """A SIGTERM whose handler runs inside an asyncio callback (seen: an eval worker, while orbax's
  event loop read its wake-up pipe) raises there; asyncio logs and drops that, and the worker ran
  on, ignoring the signal until it was killed. It is delivered again once the callback returns, and
  the block stops."""
  loop = asyncio.new_event_loop()
  try:
    with pytest.raises(errors.Preempted):
      with errors.StopOnSigterm():
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        loop.run_until_complete(asyncio.sleep(0.05))
        time.sleep(5)  # the rest of the block: the stop comes here
  finally:
    loop.close()  # outside the block: a stop that lands inside close() would leave it half done

def test_sigterm_inside_a_garbage_collector_callback_still_stops_the_block():
  """A SIGTERM whose handler runs inside a garbage-collector callback (seen: an eval worker,
  inside JAX's, which gc.callbacks holds) raises there; Python drops that ("Exception ignored in
  garbage collector callback") and the worker ran on until it was killed. It is delivered again
  once the callback returns, and the block stops."""
  sent = []

  def callback(phase, info):  # pylint: disable=unused-argument
    if phase == "start" and not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(200):  # the handler runs here, inside the callback
        time.sleep(0.001)

  dropped = []
  gc.callbacks.append(callback)
  try:
    with pytest.raises(errors.Preempted):
      with errors.StopOnSigterm():
        previous = sys.unraisablehook

        def hook(unraisable):  # a hook set inside the block, passing on (as orbax's quieting)
          dropped.append(unraisable.exc_value)
          previous(unraisable)

        sys.unraisablehook = hook
        try:
          gc.collect()
          time.sleep(5)  # the rest of the block: the stop comes here
        finally:
          sys.unraisablehook = previous
  finally:
    gc.callbacks.remove(callback)
  # Dropped once or more (the signal delivered again can land in the next callback), then raised.
  assert sent and dropped and all(isinstance(e, errors.Preempted) for e in dropped)


@pytest.mark.slow
def test_sigterm_while_the_runner_evaluates_in_process_exits_75(tmp_path, capsys, monkeypatch):
  """A trained job, then the table command, which evaluates it in its own process: a SIGTERM that
  lands while orbax reads the checkpoint to sample from (orbax catches the Preempted raised there
  and raises an Exception of its own, which used to end the command with exit status 1 and a
  traceback) stops it with exit status 75 and one "preempted:" line, and writes no result."""
  workdir = tmp_path / "runs"
  row = "128x128/cosine (shifted to 64)"
  job, = run.registry.jobs(run.registry.select("2", [row]))
  run_dir = workdir / job.name
  trained = subprocess.run([sys.executable, "-m", "core.train",
                            *jobs.job_args(job, "smoke", str(run_dir), None)],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]

  read_shard, sent = serialization._read_shard, []  # pylint: disable=protected-access

  async def read_shard_after_a_sigterm(*args, **kwargs):
    if not sent:  # the scheduler's SIGTERM, while the first array is read
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return await read_shard(*args, **kwargs)

  monkeypatch.setattr(serialization, "_read_shard", read_shard_after_a_sigterm)
  code, err = exit_and_stderr(run.main, ["table=2", f"row={row}", "scale=smoke",
                                         f"workdir={workdir}"], capsys)
  assert sent and code == 75, (code, err[-3000:])
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1].startswith("preempted: SIGTERM") and "Traceback" not in err, err[-3000:]
  assert not (run_dir / "eval" / "results.jsonl").exists()
