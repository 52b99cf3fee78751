"""``launcher=slurm``: one ``sbatch`` script per job that trains, evaluates and requeues itself.

Each job is one batch script (kept beside its logs, printed by ``dry_run=true``) that runs the same
``srun`` command on every task: ``core.train`` under ``jax.distributed`` (which reads SLURM's
variables: one process per task, one task per GPU, or ``tasks_per_node`` CPU tasks on a node
without GPUs), then ``eval.worker``. Every submission of a job resumes its run directory.

Stopping and requeueing (docs/cluster.md says what each path was tested with):

* ``--signal=TERM@120``: before the time limit SLURM sends SIGTERM to the tasks; the trainers agree
  on a step, checkpoint it and exit 75 (core/trainer.py), and the script requeues its own job
  (``scontrol requeue``): ``--requeue`` alone covers node failure and preemption, and a job's own
  exit status 75 would end it FAILED unless the admin set ``RequeueExit``. It does so only while
  SLURM still runs the job: after ``scancel`` (which also sends SIGTERM) the job stays cancelled,
  and ``scontrol requeue`` or preemption requeue it themselves.
* A SIGTERM to the batch shell (``scancel --batch``, ``--signal=B:TERM@...``) is passed on to the
  tasks (``scancel --signal=TERM``, which skips the batch step), with the same result. srun itself
  turns a SIGTERM of its own into SIGKILL of the tasks (srun(1)), so ``scancel --full`` loses the
  steps since the last checkpoint; the job still requeues and resumes from it.
* A step ended by SIGTERM (143) requeues too: an evaluation (which keeps its finished batches),
  or trainers that had checkpointed when ``srun --kill-on-bad-exit`` saw the first exit 75 and
  ended the others.
* ``--dependency=singleton``: a second submission of a job waits for the first to end, and a job
  already queued or running is not submitted again.

``--cpus-per-task`` (grain's readers and XLA's threads) and ``--mem-per-cpu`` are always set:
without them a task may get one core. ``mode=status`` lists a table's jobs with their SLURM state
and progress; ``wait=true`` waits for them to leave the queue.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from core.errors import UserError
from core.io import storage
from eval import worker
from experiments import jobs, launchers, registry

# Exit statuses after which the script requeues its job: a trainer that stopped at a checkpoint
# (core.errors.EXIT_PREEMPTED), a task ended by SIGTERM (128 + 15).
REQUEUE_STATUSES = (75, 143)
# squeue states of a job that has not ended yet.
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
          "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


def job_name(job: registry.Job) -> str:
  return f"sd-{job.name}"[:60].rstrip("-")


def _workdir(train_args: Sequence[str]) -> str:
  return next(a.split("=", 1)[1] for a in train_args if a.startswith("workdir="))


def log_dir(run_dir: str, opts: dict[str, Any]) -> str:
  """Where the job's output (and its script) goes: ``slurm_logs=``, else ``slurm/`` beside the
  run directories (``runs/slurm`` here for gs:// ones)."""
  if opts.get("slurm_logs"):
    return os.path.abspath(opts["slurm_logs"])
  parent = os.path.dirname(run_dir.rstrip("/"))
  return f"{parent}/slurm" if parent.startswith("/") else os.path.abspath(
      os.path.join("runs", "slurm"))


def tasks_per_node(opts: dict[str, Any]) -> int:
  """``tasks_per_node=``, else one task per GPU (one on a node without GPUs)."""
  gpus = int(opts.get("gpus_per_node") if opts.get("gpus_per_node") is not None else 8)
  return int(opts.get("tasks_per_node") or max(gpus, 1))


def script(job: registry.Job, train_args: Sequence[str], eval_args: Sequence[str] | None,
           opts: dict[str, Any]) -> str:
  """The sbatch script of one job (``eval_args=None``: train only)."""
  run_dir = _workdir(train_args)
  if not (run_dir.startswith("gs://") or run_dir.startswith("/")):
    raise UserError(f"launcher=slurm needs workdir on shared storage (an absolute path every node "
                    f"mounts) or gs://, got {run_dir!r}")
  nodes = int(opts.get("nodes") or 1)
  gpus = int(opts.get("gpus_per_node") if opts.get("gpus_per_node") is not None else 8)
  tasks, cpus = tasks_per_node(opts), int(opts.get("cpus_per_task") or 8)
  if nodes < 1 or gpus < 0 or tasks < 1 or cpus < 1:
    raise UserError(f"nodes={nodes}, tasks_per_node={tasks} and cpus_per_task={cpus} must be >= 1 "
                    f"and gpus_per_node={gpus} >= 0 (0: CPU nodes)")
  if gpus and tasks != gpus:
    raise UserError(f"tasks_per_node={tasks} but gpus_per_node={gpus}: JAX runs one process per "
                    f"GPU (leave tasks_per_node unset)")
  repo = opts.get("repo_dir") or "$SLURM_SUBMIT_DIR"
  python = opts.get("python") or f"{repo}/.venv/bin/python"
  head = [f"--job-name={job_name(job)}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}"]
  if gpus:
    head.append(f"--gpus-per-node={gpus}")
  head += [f"--cpus-per-task={cpus}", f"--mem-per-cpu={opts.get('mem_per_cpu') or '8G'}",
           f"--time={opts.get('slurm_time') or '2-00:00:00'}",
           f"--output={log_dir(run_dir, opts)}/%x-%j.out", "--open-mode=append", "--requeue",
           "--signal=TERM@120", "--dependency=singleton"]
  for key in ("partition", "account"):
    if opts.get(key):
      head.append(f"--{key}={opts[key]}")
  train = " ".join(shlex.quote(a) for a in [*train_args, launchers.SHARD_ALL, "distributed=true"])
  lines = ["#!/bin/bash", f"# {job.name}: " + "; ".join(
      f"T{e.table} {e.group} {e.row}" for e in job.entries)]
  lines += [f"#SBATCH {h}" for h in head]
  lines += [
      "set -uo pipefail",
      f"cd {repo}",
      "export PYTHONUNBUFFERED=1",
      "# srun does not pass --cpus-per-task on to the tasks (SLURM >= 22.05) unless told again.",
      "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}",
      'echo "sd: job ${SLURM_JOB_ID:-} (restart ${SLURM_RESTART_COUNT:-0}) on '
      '${SLURM_JOB_NODELIST:-} at $(date -Is)"',
      "# A SIGTERM to this shell goes on to the tasks (scancel without --full skips this shell):",
      "# the trainers checkpoint and exit 75. Steps run in the background so that it is handled",
      "# at once; step() waits through it for the step's own exit status. (scancel in the",
      "# background: while SLURM ends or requeues the job it retries for minutes.)",
      "stopping=0",
      'trap \'stopping=1; scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null &\' TERM',
      "step() {",
      '  srun --kill-on-bad-exit=1 "$@" &',
      "  local pid=$! rc",
      "  while :; do",
      '    wait "$pid"; rc=$?',
      '    kill -0 "$pid" 2>/dev/null || return "$rc"',
      "  done",
      "}",
      "# jax.distributed.initialize() reads SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST and",
      "# SLURM_LOCALID (the task's GPU): one process per task, the same command on every task.",
      "rc=0",
      f"step {python} -m core.train {train} || rc=$?",
  ]
  if eval_args is not None:
    evaluate = " ".join(shlex.quote(a) for a in [*eval_args, "distributed=true"])
    lines += [f'if [ "$rc" -eq 0 ]; then step {python} -m eval.worker {evaluate} || rc=$?; fi']
  statuses = " || ".join(f'[ "$rc" -eq {s} ]' for s in REQUEUE_STATUSES)
  lines += [
      "# 75: stopped at a checkpoint; 143: ended by SIGTERM; or anything after this shell's SIGTERM.",
      "# Requeued here only while SLURM still runs the job (a signal asked it to stop): when SLURM",
      "# itself ends it (scancel, scontrol requeue, preemption), SLURM decides.",
      f'if {statuses} || {{ [ "$rc" -ne 0 ] && [ "$stopping" -eq 1 ]; }}; then',
      '  state=$(squeue --noheader --jobs="$SLURM_JOB_ID" --format=%T 2>/dev/null)',
      '  if [ "$state" = RUNNING ]; then',
      '    echo "sd: job $SLURM_JOB_ID stopped (exit status $rc); requeueing it to resume"',
      '    scontrol requeue "$SLURM_JOB_ID"',
      "  else",
      '    echo "sd: job $SLURM_JOB_ID stopped (exit status $rc) while SLURM ends it'
      ' (${state:-gone}): not requeued here"',
      "  fi",
      "fi",
      'exit "$rc"',
  ]
  return "\n".join(lines) + "\n"


def _run(cmd: Sequence[str], what: str) -> str:
  """Runs a SLURM client command; its output, or one line naming what failed."""
  try:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
  except FileNotFoundError:
    raise UserError(f"{cmd[0]} not found: launcher=slurm runs where SLURM's commands are (a login "
                    f"node); dry_run=true prints the scripts") from None
  except subprocess.TimeoutExpired:
    raise UserError(f"{cmd[0]} did not answer in 120 s ({what}); is slurmctld up?") from None
  if p.returncode:
    why = (p.stderr.strip() or p.stdout.strip() or f"exit status {p.returncode}").splitlines()[0]
    hint = (" (a node without GPUs: gpus_per_node=0)" if "gres" in why.lower() else "")
    raise UserError(f"{what} failed: {why}{hint}")
  return p.stdout


def queue(names: Sequence[str]) -> dict[str, tuple[str, str]]:
  """{job name: (job id, state)} of this user's jobs that SLURM still lists under these names (the
  newest of each; ended ones are listed for the cluster's MinJobAge)."""
  if not names:
    return {}
  out = _run(["squeue", "--noheader", "--states=all", f"--user={os.getuid()}",
              f"--name={','.join(names)}", "--format=%i|%j|%T"], "squeue")
  found: dict[str, tuple[str, str]] = {}
  for line in out.splitlines():
    parts = line.strip().split("|")
    if len(parts) == 3:
      jid, name, state = parts
      if name not in found or int(jid.split("_")[0]) > int(found[name][0].split("_")[0]):
        found[name] = (jid, state)
  return found


def submit(prepared: Sequence[tuple[registry.Job, str, str]], *, dry_run: bool
           ) -> dict[str, str]:
  """Writes (beside its log) and submits each ``(job, run_dir, script)``, or prints it (dry run).
  A job already queued or running is not submitted again. Returns {job name: job id}."""
  if dry_run:
    for job, _, text in prepared:
      print(f"# ---- {job.name}.sbatch", flush=True)
      print(text, end="", flush=True)
    return {}
  active = {n: v for n, v in queue([job_name(j) for j, _, _ in prepared]).items()
            if v[1] in ACTIVE}
  ids = {}
  for job, _, text in prepared:
    name = job_name(job)
    if name in active:
      jid, state = active[name]
      print(f"[{job.name}] already in the queue as job {jid} ({state}): not submitted again",
            flush=True)
      ids[name] = jid
      continue
    logs = next(l.split("=", 1)[1] for l in text.splitlines() if l.startswith("#SBATCH --output="))
    folder = os.path.dirname(logs)
    os.makedirs(folder, exist_ok=True)  # sbatch does not create the log folder
    path = os.path.join(folder, f"{job.name}.sbatch")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    jid = _run(["sbatch", "--parsable", path], f"sbatch {path}").strip().split(";")[0]
    ids[name] = jid
    print(f"[{job.name}] submitted as job {jid} ({path}; log {logs.replace('%x', name)})"
          .replace("%j", jid), flush=True)
  return ids


def progress(run_dir: str) -> dict[str, Any]:
  """What the run directory says: latest checkpoint, whether it is the last, result lines."""
  step = jobs.latest_step(run_dir)
  results = worker.read_results(run_dir) if storage.exists(run_dir) else []
  return {"step": step, "trained": jobs.is_trained(run_dir), "results": len(results)}


def status(job_list: Sequence[registry.Job], workdir: str) -> list[dict[str, Any]]:
  """One row per job: SLURM's job id and state (if it still lists it) and the run's progress."""
  listed = queue([job_name(j) for j in job_list])
  rows = []
  for job in job_list:
    jid, state = listed.get(job_name(job), ("", ""))
    rows.append({"job": job.name, "slurm_job": jid, "state": state,
                 **progress(storage.join(workdir, job.name))})
  return rows


def format_status(rows: Sequence[dict[str, Any]]) -> str:
  width = max([len(r["job"]) for r in rows] + [3])
  out = [f"{'job':<{width}}  {'slurm job':<10} {'state':<11} {'trained':<12} results"]
  for r in rows:
    trained = "-" if r["step"] is None else f"{r['step']}{' (last)' if r['trained'] else ''}"
    out.append(f"{r['job']:<{width}}  {r['slurm_job'] or '-':<10} {r['state'] or '-':<11} "
               f"{trained:<12} {r['results']}")
  return "\n".join(out)


def wait(job_list: Sequence[registry.Job], workdir: str, *, poll_seconds: float = 30.0,
         eval_too: bool = True) -> list[dict[str, Any]]:
  """Waits until none of the jobs is queued or running, then refuses (one line naming them) if
  any did not finish: trained, and evaluated when ``eval_too``."""
  names = [job_name(j) for j in job_list]
  while True:
    active = {n: v for n, v in queue(names).items() if v[1] in ACTIVE}
    if not active:
      break
    print(f"waiting for {len(active)} job(s): " + ", ".join(
        f"{jid} {state}" for jid, state in sorted(active.values())), file=sys.stderr, flush=True)
    time.sleep(poll_seconds)
  rows = status(job_list, workdir)
  print(format_status(rows), flush=True)
  unfinished = [r for r in rows if not r["trained"] or (eval_too and not r["results"])]
  if unfinished:
    raise UserError("not finished: " + ", ".join(
        f"{r['job']} (job {r['slurm_job'] or '?'} {r['state'] or 'not listed'}, step "
        f"{r['step'] if r['step'] is not None else 0})" for r in unfinished)
        + "; see their logs and rerun the same command to resubmit")
  return rows
