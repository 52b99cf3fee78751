"""launcher=slurm on a real one-node SLURM cluster: Debian's slurmctld, slurmd and munge, started by
scripts/slurm_local.sh (installed with apt if missing). Where that cannot run (not root, no apt)
these tests skip saying why; on CI (CI=true) they fail instead.

Each job runs two CPU tasks under jax.distributed, as on a node without GPUs (gpus_per_node=0):
a Table 2 smoke row trained, evaluated and recorded by ``experiments.run launcher=slurm
wait=true``; and a run stopped while its training starts in four ways a scheduler stops jobs
(``scontrol requeue``, the signal before the time limit, a SIGTERM to the batch shell,
``scancel``), requeued after the first three and resubmitted after the last, that resumes from
its checkpoint each time and ends with the losses of an uninterrupted two-process run, each step
logged once. docs/cluster.md describes what they cover.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time

import pytest

from core.errors import UserError
from eval import worker
from experiments import jobs, registry, run, slurm
from tables import render
from tests.test_faults_train import catches_sigterm, rows
from tests.test_train import ROOT, TINY, _env, _free_port, losses, train_cmd

pytestmark = pytest.mark.xdist_group("slurm")

ROW = "128x128/cosine (original at 128)"
CPU_NODE = {"gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "mem_per_cpu": "1G"}
CPU_ARGS = [f"{k}={v}" for k, v in CPU_NODE.items()]
LONG = 1800  # seconds: the SLURM jobs share 2 cores with the rest of the suite


@pytest.fixture(scope="module")
def cluster():
  """The environment (SLURM_CONF) of a running local cluster."""
  script = os.path.join(ROOT, "scripts", "slurm_local.sh")
  p = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=900)
  if p.returncode == 3 and os.environ.get("CI") != "true":
    pytest.skip(p.stderr.strip().splitlines()[-1])
  assert p.returncode == 0, p.stderr[-3000:]
  conf = subprocess.run(["bash", script, "env"], capture_output=True, text=True,
                        check=True).stdout.strip().split("=", 1)[1]
  return _env(SLURM_CONF=conf)


def sh(env, *cmd: str) -> str:
  p = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, (cmd, p.stdout, p.stderr)
  return p.stdout


def job_info(env, jid: str) -> dict[str, str]:
  out = sh(env, "scontrol", "show", "job", "--oneliner", jid)
  return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def until(predicate, what: str, timeout: float = LONG):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def table_job() -> registry.Job:
  job, = registry.jobs(registry.select("2", [ROW]))
  return job


def test_cpu_node_script_is_accepted_and_a_gpu_one_refused_in_one_line(cluster, tmp_path,
                                                                      monkeypatch):
  """The CPU-node script (no --gpus-per-node, with --cpus-per-task, --mem-per-cpu and
  --dependency=singleton) passes sbatch's own check; the GPU script on this GPU-less cluster is
  refused with one line that names the fix."""
  job = table_job()
  run_dir = str(tmp_path / "runs" / job.name)
  t_args = jobs.job_args(job, "smoke", run_dir, None)
  text = slurm.script(job, t_args, jobs.eval_args(job, "smoke", run_dir, {"num_samples": None,
                                                                           "extractor": "auto"}),
                      dict(CPU_NODE))
  assert "--gpus-per-node" not in text
  path = tmp_path / "job.sbatch"
  path.write_text(text)
  p = subprocess.run(["sbatch", "--test-only", str(path)], env=cluster, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0 and "to start at" in p.stderr, p.stderr
  monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
  with pytest.raises(UserError, match=r"sbatch .* failed: .*gres.*gpus_per_node=0"):
    run.main(["table=2", f"row={ROW}", "scale=smoke", "launcher=slurm", "gpus_per_node=1",
              f"workdir={tmp_path / 'gpu'}", f"slurm_logs={tmp_path / 'logs'}"])


@pytest.fixture(scope="module")
def table_run(cluster, tmp_path_factory):
  """``experiments.run table=2 row=... scale=smoke launcher=slurm wait=true`` on two CPU tasks."""
  workdir = tmp_path_factory.mktemp("slurm_table") / "runs"
  p = subprocess.run([sys.executable, "-m", "experiments.run", "table=2", f"row={ROW}",
                      "scale=smoke", "launcher=slurm", f"workdir={workdir}", *CPU_ARGS,
                      f"python={sys.executable}",
                      "wait=true", "poll_seconds=2"], cwd=ROOT, env=cluster, capture_output=True,
                     text=True, timeout=LONG)
  return workdir, p


@pytest.mark.slow
def test_a_table_row_trains_evaluates_and_is_recorded_on_two_cpu_tasks(cluster, table_run,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
  workdir, p = table_run
  assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
  jid = re.search(r"submitted as job (\d+)", p.stdout).group(1)
  job = table_job()
  run_dir = str(workdir / job.name)
  log = (workdir / "slurm" / f"{slurm.job_name(job)}-{jid}.out").read_text()
  # Two processes joined by jax.distributed from SLURM's variables, in training and evaluation.
  assert log.count("[Gloo] Rank 0 is connected to 1 peer") == 2, log[-3000:]
  assert log.count("[Gloo] Rank 1 is connected to 1 peer") == 2, log[-3000:]
  info = job_info(cluster, jid)
  assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
  assert [r["step"] for r in rows(run_dir)] == [2, 4]  # smoke: Train.log_every=2, 4 steps
  results = worker.read_results(run_dir)
  assert results and {r["step"] for r in results} == {4}
  # wait=true printed the table's status; mode=status says the same afterwards.
  assert re.search(rf"{job.name}\s+{jid}\s+COMPLETED\s+4 \(last\)\s+{len(results)}", p.stdout)
  monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
  capsys.readouterr()
  assert run.main(["table=2", f"row={ROW}", "scale=smoke", "launcher=slurm", "mode=status",
                   f"workdir={workdir}"]) == 0
  assert re.search(rf"{job.name}\s+{jid}\s+COMPLETED\s+4 \(last\)", capsys.readouterr().out)
  # Recorded: the renderer puts the row's FID in Table 2.
  render.main(["table=2", f"workdir={workdir}", f"out={tmp_path}", "format=markdown"])
  line = next(l for l in (tmp_path / "table_2.md").read_text().splitlines()
              if "original at 128" in l)
  assert re.search(r"\d+\.\d+ ± \d", line), line  # our FID (the paper's has no spread)


def _stopped_and_resumed(log: str) -> tuple[list[int], list[int]]:
  """Distinct steps the trainers stopped at ("preempted: SIGTERM at step N") and resumed from."""
  stops = [int(s) for s in re.findall(r"preempted: SIGTERM at step (\d+)", log)]
  resumes = [int(s) for s in re.findall(r"resumed from step (\d+)", log)]
  return sorted(set(stops)), sorted(set(resumes))


@pytest.mark.slow
def test_each_way_a_scheduler_stops_a_job_requeues_it_or_not_and_it_resumes(cluster, tmp_path,
                                                                            monkeypatch):
  """A job stopped four times while its training starts: ``scontrol requeue``, the time-limit
  signal (its limit shortened so that ``--signal=TERM@120`` fires), ``scancel --batch
  --signal=TERM`` (the batch shell alone, which passes it on) and ``scancel``. Each time the
  trainers, under jax.distributed, stop after one more step with a checkpoint and exit 75. The
  first three requeue the job (SLURM the first, its script the others) and it resumes from that
  checkpoint; after ``scancel`` it stays cancelled, and submitting it again resumes it. It ends
  COMPLETED with every step logged once and the losses of an uninterrupted two-process run. A
  second submission while it runs is not made; a copy sent to sbatch by hand waits
  (--dependency=singleton)."""
  steps = ["Train.num_steps=8", "Train.checkpoint_every=1000"]
  ref = tmp_path / "ref"
  port = _free_port()
  procs = [subprocess.Popen(train_cmd(ref, *steps, "mesh.fsdp=-1", f"coordinator=127.0.0.1:{port}",
                                      "num_processes=2", f"process_id={i}"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 0, err[-3000:]

  monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
  run_dir, logs = tmp_path / "run", tmp_path / "logs"
  job = dataclasses.replace(table_job(), name=f"tiny-requeue-{os.getpid()}")
  opts = {**CPU_NODE, "slurm_time": "30", "repo_dir": ROOT, "python": sys.executable,
          "slurm_logs": str(logs)}
  prepared = [(job, str(run_dir), slurm.script(job, [*TINY, *steps, f"workdir={run_dir}"], None,
                                               opts))]
  jid = slurm.submit(prepared, dry_run=False)[slurm.job_name(job)]
  jids = [jid]

  def state(j: str) -> str:
    return job_info(cluster, j)["JobState"]

  def training(j: str, restart: int) -> bool:
    """This run of the job has started its two trainers, and they handle SIGTERM (a signal
    in the first instants of a process, before Python runs any of its code, ends it)."""
    info = job_info(cluster, j)
    if info["JobState"] != "RUNNING" or int(info["Restarts"]) != restart:
      return False
    pids = _trainers(run_dir)
    return len(pids) == 2 and all(catches_sigterm(p) for p in pids)

  def time_limit():
    minutes = _minutes(job_info(cluster, jid)["RunTime"])
    sh(cluster, "scontrol", "update", f"JobId={jid}", f"TimeLimit={minutes + 3}")

  try:
    until(lambda: training(jid, 0), "the first run's training")
    # Submitting again while it runs submits nothing; a copy sent to sbatch by hand waits.
    assert slurm.submit(prepared, dry_run=False) == {slurm.job_name(job): jid}
    copy = sh(cluster, "sbatch", "--parsable", str(logs / f"{job.name}.sbatch")).strip()
    assert job_info(cluster, copy)["Reason"] == "Dependency"
    sh(cluster, "scancel", copy)

    stops = {"scontrol requeue": lambda: sh(cluster, "scontrol", "requeue", jid),
             "time limit": time_limit,
             "batch shell": lambda: sh(cluster, "scancel", "--batch", "--signal=TERM", jid)}
    for restart, (what, stop) in enumerate(stops.items()):
      if restart:
        until(lambda r=restart: training(jid, r), f"run {restart} training")
      stop()
      until(lambda r=restart: (lambda i: i["JobState"] == "PENDING" and
                               int(i["Restarts"]) == r + 1)(job_info(cluster, jid)),
            f"the job requeued after the {what} stop")
      # SLURM holds a requeued batch job for 2 minutes (BeginTime): release it once the node
      # has finished with its last run (a start in the second SLURM revoked the last run's
      # credential in is refused). The time-limit stop shortened the limit, which it keeps.
      until(lambda: sh(cluster, "sinfo", "--noheader", "--nodes=localhost",
                       "--format=%T").strip() == "idle", "the node idle")
      time.sleep(2)
      sh(cluster, "scontrol", "update", f"JobId={jid}", "TimeLimit=30", "StartTime=now")
    until(lambda: training(jid, 3), "run 3 training")
    sh(cluster, "scancel", jid)
    until(lambda: state(jid) == "CANCELLED" and not _trainers(run_dir), "the cancel")
    until(lambda: sh(cluster, "sinfo", "--noheader", "--nodes=localhost",
                     "--format=%T").strip() == "idle", "the node idle")
    assert job_info(cluster, jid)["Restarts"] == "3"  # not requeued
    jids.append(slurm.submit(prepared, dry_run=False)[slurm.job_name(job)])
    assert jids[1] != jid
    until(lambda: state(jids[1]) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
          "the resubmitted job's end")
  finally:
    for j in jids:
      subprocess.run(["scancel", j], env=cluster, capture_output=True)
  first, second = ((logs / f"{slurm.job_name(job)}-{j}.out").read_text() for j in jids)
  assert state(jids[1]) == "COMPLETED" and job_info(cluster, jids[1])["Restarts"] == "0", second
  assert first.count("requeueing it to resume") == 2, first[-4000:]  # time limit, batch shell
  assert first.count("while SLURM ends it") == 2, first[-4000:]  # scontrol requeue, scancel
  stopped, resumed = _stopped_and_resumed(first + second)
  assert len(stopped) == 4 and stopped == resumed and stopped[-1] < 8, first + second
  assert [r["step"] for r in rows(run_dir)] == list(range(1, 9))
  assert losses(run_dir) == losses(ref)


def _trainers(run_dir) -> list[int]:
  """Process ids of the ``python -m core.train ... workdir=<run_dir>`` processes on this machine."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if argv[1:3] == ["-m", "core.train"] and f"workdir={run_dir}" in argv:
      pids.append(int(pid))
  return pids


def _minutes(runtime: str) -> int:
  """Whole minutes of SLURM's [D-]HH:MM:SS."""
  days, _, hms = runtime.rpartition("-")
  h, m, _ = (int(x) for x in hms.split(":"))
  return (int(days or 0) * 24 + h) * 60 + m
