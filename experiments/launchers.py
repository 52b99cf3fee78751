"""Launchers: where a job's training and evaluation commands run.

``local`` runs them here one job after another (``parallel=N``: up to N trainings at once, each in
its own process, then up to N evaluations at once); ``tpu`` submits a SkyPilot managed job per job
on a Cloud TPU VM slice (experiments/tpu.py); ``slurm`` (experiments/slurm.py) submits one
``sbatch`` script per job. ``jax.distributed.initialize()`` reads either topology; launching a job
again resumes its fixed run directory; ``dry_run`` prints the commands.
"""
from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from core import train as train_cli
from core.errors import UserError
from core.io import storage
from eval import worker
from experiments import jobs, registry

LAUNCHERS = ("local", "tpu", "slurm")
# Shard parameters, Adam and EMA over every device of a multi-device job (core/sharding.py).
SHARD_ALL = "mesh.fsdp=-1"


class EvalQueue:
  """``launcher=local eval_in_background=true``: each trained job is evaluated by an ``eval.worker``
  subprocess while the next job trains, one evaluation at a time (the first one also computes the
  reference statistics it needs, cached beside the data). For machines with cores or an
  accelerator to spare: on 2 CPU cores it made `make demo` slower (README). A failed evaluation
  fails the command once the others have run; whatever stops the command stops the running
  evaluation."""

  def __init__(self):
    self._proc: subprocess.Popen | None = None
    self._name = ""
    self.failed: list[str] = []

  def _reap(self) -> None:
    if self._proc is not None:
      rc = self._proc.wait()
      if rc != 0:
        self.failed.append(f"{self._name} (exit status {rc})")
      self._proc = None

  def submit(self, name: str, eval_args: Sequence[str]) -> None:
    """Waits for the evaluation before (if still running), then starts this one."""
    self._reap()
    print(f"[{name}] evaluating in the background", flush=True)
    self._name = name
    self._proc = subprocess.Popen([sys.executable, "-m", "eval.worker", *eval_args])

  def finish(self) -> None:
    """Waits for the last evaluation; one line naming every evaluation that failed."""
    self._reap()
    if self.failed:
      raise UserError(f"evaluation failed: {', '.join(self.failed)} (its output is above); "
                      f"rerun the same command to evaluate what is missing")

  def stop(self) -> None:
    """Stops a running evaluation (SIGTERM, then SIGKILL after 60 s): nothing outlives us."""
    if self._proc is not None and self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(60)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._proc = None


class ProcessPool:
  """``launcher=local parallel=N``: up to N subprocesses at once (``core.train``, then
  ``eval.worker``), the rest queued.

  On a small CPU one XLA process does not keep its cores busy (its compilation is
  single-threaded and small steps leave threads waiting): three 300-step demo rows on 2 cores took
  343 s side by side against about 580 s one after another (README). Each line a
  child prints is relayed prefixed with its job's name. A failed child fails the command once
  the others have run; whatever stops the command stops every child (SIGTERM, on which the trainer
  checkpoints, then SIGKILL after 60 s) and drops the queue. As a context manager it runs
  everything submitted when the block ends (:meth:`finish`) and stops every child on the way out,
  whatever ended the block (:meth:`stop`).
  """

  def __init__(self, size: int, what: str = "training"):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise UserError(f"parallel={size!r} must be an integer >= 1 (jobs at once)")
    self.size = size
    self.what = what
    self._queue: collections.deque = collections.deque()
    self._running: dict[str, tuple[subprocess.Popen, threading.Thread]] = {}
    self.failed: list[str] = []

  def __enter__(self) -> "ProcessPool":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    try:
      if exc_type is None:
        self.finish()
    finally:
      self.stop()
    return False

  def submit(self, name: str, argv: Sequence[str]) -> None:
    """Queues a command (argv list); it starts as soon as a slot is free."""
    self._queue.append((name, list(argv)))
    self._fill()

  def _fill(self) -> None:
    while self._queue and len(self._running) < self.size:
      name, argv = self._queue.popleft()
      proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1)
      relay = threading.Thread(target=_relay, args=(name, proc.stdout), daemon=True)
      relay.start()
      self._running[name] = (proc, relay)

  def _reap(self) -> bool:
    done = [n for n, (p, _) in self._running.items() if p.poll() is not None]
    for name in done:
      proc, relay = self._running.pop(name)
      relay.join()
      if proc.returncode != 0:
        self.failed.append(f"{name} (exit status {proc.returncode})")
    return bool(done)

  def finish(self, poll_seconds: float = 0.2) -> None:
    """Runs everything queued; then one line naming every command that failed."""
    while self._running or self._queue:
      if not self._reap():
        time.sleep(poll_seconds)
      self._fill()
    if self.failed:
      raise UserError(f"{self.what} failed: {', '.join(self.failed)} (its output is above); "
                      f"rerun the same command to resume")

  def stop(self) -> None:
    """Drops the queue and stops every running child: nothing outlives us."""
    self._queue.clear()
    for proc, _ in self._running.values():
      if proc.poll() is None:
        proc.terminate()
    deadline = time.time() + 60
    for proc, relay in self._running.values():
      try:
        proc.wait(max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      relay.join(5)
    self._running.clear()


def _relay(name: str, stream) -> None:
  for line in stream:
    print(f"[{name}] {line.rstrip()}", flush=True)


def _local_args(job: registry.Job, scale: str, workdir: str, opts: dict[str, Any]
                ) -> tuple[str, list[str], list[str]]:
  """The job's run directory, training and evaluation arguments."""
  run_dir = storage.join(workdir, job.name)
  return (run_dir, jobs.job_args(job, scale, run_dir, opts["data_dir"]),
          jobs.eval_args(job, scale, run_dir, opts))


def _prepare_local(job: registry.Job, scale: str, workdir: str, opts: dict[str, Any]
                   ) -> tuple[str, list[str], list[str]]:
  """:func:`_local_args`, after writing the job's job.json."""
  run_dir, args, e_args = _local_args(job, scale, workdir, opts)
  try:
    jobs.write_job_json(job, scale, run_dir, args)
  except OSError as e:
    raise UserError(f"cannot write to {run_dir} ({e.strerror or e}); choose a writable "
                    f"workdir=") from None
  return run_dir, args, e_args


def _rows(job: registry.Job) -> str:
  return ", ".join(f"T{e.table} {e.group} {e.row}" for e in job.entries)


def _check_trained(job: registry.Job, run_dir: str) -> None:
  if not jobs.is_trained(run_dir):  # only a finished run's final step is a row's result
    raise UserError(f"[{job.name}] stopped at step {jobs.latest_step(run_dir)} before its last "
                    f"step; rerun the same command to resume it")


def _evaluate_local(job: registry.Job, run_dir: str, e_args: list[str], opts: dict[str, Any],
                    evals: EvalQueue | None) -> None:
  if opts["eval"] and evals is not None:
    evals.submit(job.name, e_args)
  elif opts["eval"]:  # the worker evaluates only what these settings have not evaluated yet
    print(f"[{job.name}] evaluating", flush=True)
    before = len(worker.read_results(run_dir))
    worker.main(e_args)
    _say_if_evaluated_already(job, run_dir, before)


def _say_if_evaluated_already(job: registry.Job, run_dir: str, results_before: int) -> None:
  """The worker evaluates only what these settings have not evaluated yet: no new result line
  means every one existed."""
  if len(worker.read_results(run_dir)) == results_before:
    print(f"[{job.name}] evaluated already (every result for these settings exists)", flush=True)


def run_local(job: registry.Job, scale: str, workdir: str, opts: dict[str, Any],
              evals: EvalQueue | None = None) -> None:
  """Trains ``job`` here (resuming its run directory), then evaluates it: in this process, or
  through ``evals`` in the background while the caller goes on to the next job."""
  if opts["dry_run"]:
    _, args, e_args = _local_args(job, scale, workdir, opts)
    print("python -m core.train " + " ".join(_quote(a) for a in args))
    if opts["eval"]:
      print("python -m eval.worker " + " ".join(e_args))
    return
  run_dir, args, e_args = _prepare_local(job, scale, workdir, opts)
  if jobs.is_trained(run_dir):
    print(f"[{job.name}] trained already ({_rows(job)})", flush=True)
  else:
    print(f"[{job.name}] training ({_rows(job)})", flush=True)
    train_cli.main(args)  # raises Preempted on SIGTERM: nothing below runs
    _check_trained(job, run_dir)
  _evaluate_local(job, run_dir, e_args, opts, evals)


def run_local_parallel(job_list: Sequence[registry.Job], scale: str, workdir: str,
                       opts: dict[str, Any], parallel: int, evals: EvalQueue | None = None
                       ) -> None:
  """``parallel=N``: trains the jobs up to N at once in ``core.train`` subprocesses, then
  evaluates them up to N at once in ``eval.worker`` subprocesses (:class:`ProcessPool`; with
  ``evals``, through that queue instead). Sampling is one XLA process, like training: the two
  demo rows' evaluations took 146 s side by side against 187 s one after the other (README)."""
  prepared = []
  with ProcessPool(parallel) as pool:
    for job in job_list:
      run_dir, args, e_args = _prepare_local(job, scale, workdir, opts)
      prepared.append((job, run_dir, e_args))
      if jobs.is_trained(run_dir):
        print(f"[{job.name}] trained already ({_rows(job)})", flush=True)
      else:
        print(f"[{job.name}] training ({_rows(job)}), {parallel} at once", flush=True)
        pool.submit(job.name, [sys.executable, "-m", "core.train", *args])
  for job, run_dir, _ in prepared:
    _check_trained(job, run_dir)
  if not opts["eval"] or evals is not None:
    for job, run_dir, e_args in prepared:
      _evaluate_local(job, run_dir, e_args, opts, evals)
    return
  before = {job.name: len(worker.read_results(run_dir)) for job, run_dir, _ in prepared}
  with ProcessPool(parallel, what="evaluation") as pool:
    for job, _, e_args in prepared:
      print(f"[{job.name}] evaluating, {parallel} at once", flush=True)
      pool.submit(job.name, [sys.executable, "-m", "eval.worker", *e_args])
  for job, run_dir, _ in prepared:
    _say_if_evaluated_already(job, run_dir, before[job.name])


def _quote(a: str) -> str:
  return f'"{a}"' if any(c in a for c in " '[]()") else a
