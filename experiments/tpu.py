"""``launcher=tpu``: each job is a SkyPilot managed job on a Cloud TPU VM slice (docs/tpu.md).

SkyPilot's jobs controller, not this process, owns the slice: it provisions it (waiting for
capacity), installs the launched commit on every host (``setup``), trains and then evaluates on
every host (``run``; ``jax.distributed.initialize()`` reads the slice's topology), relaunches on
preemption and on our trainer's exit status 75 (it checkpointed on SIGTERM: the same command
resumes the fixed run directory on gs://), and tears the slice down in every outcome. This module
writes each job's task YAML, ships exactly the committed tree, and submits the jobs detached.
The paper trained U-Nets on 64 TPUv2 cores and U-ViTs on 128 TPUv4 chips (appendix B); Cloud TPU
offers no v2-64 today, so the U-Net default is the same 32 chips one generation later (v4-64).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Any, Sequence

import yaml

from core import hardware
from core.errors import EXIT_PREEMPTED, UserError
from core.io import storage
from experiments import jobs, registry
from experiments.launchers import SHARD_ALL

# The SkyPilot whose loader validates our task YAML (tests/test_tpu.py). It lives in its own
# environment: it pins click<8.2, which this project's huggingface_hub (click>=8.4.2) rules out.
SKYPILOT = "skypilot[gcp]==0.14.1"
# What the workers install: the jax this project is tested with (the one installed here, with
# Cloud TPU's libtpu), on this Python, fetched by uv (the TPU images ship an older Python).
JAX_VERSION = importlib.metadata.version("jax")
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
UV = "uv==0.13.8"
# Slices that exist today (https://docs.cloud.google.com/tpu/docs/regions-zones): v4 slices count
# TensorCores, two per chip, so v4-64 is the paper's 32 U-Net chips and v4-256 its 128 U-ViT chips.
DEFAULT_TPU = {"unet": "v4-64", "uvit": "v4-256"}
# A zone offering each generation's multi-host slices (same page); tpu_zone= picks another.
ZONES = {"v2": "us-central1-a", "v3": "europe-west4-a", "v4": "us-central2-b",
         "v5litepod": "us-west4-a", "v5p": "us-east5-a", "v6e": "us-east5-b"}
# v2 is offered in these sizes only (TensorCores); the paper's v2-64 is not among them.
V2_SIZES = (8, 32, 128, 256, 512)
RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
           "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# A training error that is not a preemption is retried this often before the job is FAILED (a
# lost host or a GCS hiccup on a pod; a bug fails three times and stops billing).
MAX_RESTARTS_ON_ERRORS = 2
# Where launches keep their task YAML and the shipped commits (ignored by git).
STAGE_DIR = os.path.join("runs", "tpu")
# This checkout: the commit a launch ships.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVE = ("PENDING", "SUBMITTED", "STARTING", "RUNNING", "RECOVERING", "WINDING_DOWN",
          "CANCELLING")


def slice_for(arch: str, opts: dict[str, Any]) -> tuple[str, str]:
  """The accelerator type and zone a job runs on: options, else the defaults above."""
  tpu_type = opts.get("tpu_type") or DEFAULT_TPU[arch]
  try:
    acc, _ = hardware.parse_tpu_type(tpu_type)
  except ValueError as e:
    raise UserError(str(e)) from None
  size = int(tpu_type.rsplit("-", 1)[1])
  if acc.name == "v2" and size not in V2_SIZES:
    raise UserError(f"Cloud TPU offers no {tpu_type} (v2 slices: "
                    f"{', '.join(f'v2-{s}' for s in V2_SIZES)}); the paper's 64 TPUv2 cores are "
                    f"32 chips, tpu_type={DEFAULT_TPU['unet']} by default (docs/tpu.md)")
  return tpu_type, opts.get("tpu_zone") or ZONES[acc.name]


def task_name(job: registry.Job) -> str:
  return f"sd-{job.name}"[:60].rstrip("-")


def setup_script() -> str:
  """Runs on every host of every (re)launched slice, in the shipped tree: this Python by uv, the
  project by scripts/setup.sh, then jax with Cloud TPU's libtpu at the version tested here."""
  return "\n".join([
      "set -euo pipefail",
      f"python3 -m pip install -q --user {shlex.quote(UV)}",
      f"~/.local/bin/uv venv --seed --allow-existing --python {PYTHON_VERSION} .venv",
      "bash scripts/setup.sh .venv",
      f".venv/bin/pip install -q {shlex.quote(f'jax[tpu]=={JAX_VERSION}')}",
  ]) + "\n"


def run_script(train_args: Sequence[str], eval_args: Sequence[str] | None) -> str:
  """Runs on every host: training (resumed from the run directory's latest checkpoint), then
  evaluation of its final step (unless ``eval_args`` is None). Its exit status is the failing
  command's: 75 after a SIGTERM checkpoint, which SkyPilot answers by relaunching
  (``recover_on_exit_codes``)."""
  q = lambda args: " ".join(shlex.quote(a) for a in args)
  lines = ["set -euo pipefail",
           "echo \"[$(hostname)] commit $SD_COMMIT\"",
           f".venv/bin/python -m core.train {q([*train_args, SHARD_ALL, 'distributed=true'])}"]
  if eval_args is not None:
    lines.append(f".venv/bin/python -m eval.worker {q([*eval_args, 'distributed=true'])}")
  return "\n".join(lines) + "\n"


def task(job: registry.Job, train_args: Sequence[str], eval_args: Sequence[str] | None,
         opts: dict[str, Any], *, commit: str, code: str | dict[str, str]) -> dict[str, Any]:
  """The SkyPilot task of one job: its slice, recovery policy, shipped code and commands
  (``eval_args`` None: training only)."""
  tpu_type, zone = slice_for(job.arch, opts)
  run_dir = next(a.split("=", 1)[1] for a in train_args if a.startswith("workdir="))
  if not run_dir.startswith("gs://"):
    raise UserError(f"launcher=tpu needs workdir on GCS (gs://bucket/prefix), got {run_dir!r}: "
                    f"every TPU host, and every slice after a preemption, must see the same run "
                    f"directory")
  gen = tpu_type.split("-")[0]
  return {
      "name": task_name(job),
      "workdir": code,
      "resources": {
          "infra": f"gcp/{zone.rsplit('-', 1)[0]}/{zone}",
          "accelerators": f"tpu-{tpu_type}",
          "accelerator_args": {"runtime_version": RUNTIME[gen]},
          "use_spot": bool(opts.get("tpu_spot")),
          "job_recovery": {"strategy": "FAILOVER",
                           "max_restarts_on_errors": MAX_RESTARTS_ON_ERRORS,
                           "recover_on_exit_codes": [EXIT_PREEMPTED]},
      },
      "envs": {"SD_COMMIT": commit, "PYTHONUNBUFFERED": "1"},
      "setup": setup_script(),
      "run": run_script(train_args, eval_args),
  }


class _Dumper(yaml.SafeDumper):
  """Multi-line strings (the scripts) as YAML literal blocks, as one would write them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(config: dict[str, Any], rows: str) -> str:
  body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
  return f"# {rows}\n{body}"


def _git(repo: str, *args: str) -> str:
  p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
  if p.returncode:
    raise UserError(f"launcher=tpu ships a git commit: git {' '.join(args)} failed in {repo} "
                    f"({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
  return p.stdout


def commit_of(repo: str) -> tuple[str, list[str]]:
  """HEAD's commit and the tracked files whose changes it does not hold."""
  sha = _git(repo, "rev-parse", "HEAD").strip()
  dirty = [l[3:] for l in _git(repo, "status", "--porcelain", "--untracked-files=no").splitlines()]
  return sha, dirty


def ship(repo: str, sha: str, dest: str) -> str:
  """Extracts commit ``sha`` of ``repo`` (``git archive``: its tree, nothing untracked) into
  ``dest``; SkyPilot uploads that directory as the job's workdir."""
  if os.path.exists(os.path.join(dest, ".complete")):
    return dest
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", sha],
                           capture_output=True, check=False)
  if archive.returncode:
    raise UserError(f"git archive {sha} failed: {archive.stderr.decode().strip()}")
  subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
  with open(os.path.join(tmp, ".complete"), "w") as f:
    f.write(sha + "\n")
  shutil.rmtree(dest, ignore_errors=True)
  os.rename(tmp, dest)
  return dest


def _sky(opts: dict[str, Any]) -> str:
  want = opts.get("sky") or "sky"
  sky = shutil.which(want)
  if sky is None:
    raise UserError(f"launcher=tpu submits SkyPilot managed jobs and found no {want!r}: install "
                    f"SkyPilot in its own environment (python3 -m venv ~/sky && ~/sky/bin/pip "
                    f"install '{SKYPILOT}' && ~/sky/bin/sky check gcp) and pass "
                    f"sky=~/sky/bin/sky (docs/tpu.md)")
  return sky


def managed_jobs(sky: str) -> dict[str, dict[str, Any]]:
  """The newest managed job of each name (``sky jobs queue``): id, status, failure reason."""
  p = subprocess.run([sky, "jobs", "queue", "--output", "json"], capture_output=True, text=True)
  if p.returncode:
    last = (p.stderr.strip().splitlines() or [""])[-1]
    raise UserError(f"sky jobs queue failed (exit status {p.returncode}): {last}; try "
                    f"sky check gcp")
  newest: dict[str, dict[str, Any]] = {}
  for r in json.loads(p.stdout or "[]"):
    name = r.get("job_name") or r.get("task_name")
    if name and (name not in newest or (r.get("job_id") or 0) > (newest[name].get("job_id") or 0)):
      newest[name] = r
  return newest


def launch(job_list: Sequence[registry.Job], scale: str, workdir: str, opts: dict[str, Any],
           repo: str = ROOT) -> None:
  """Submits one managed job per job (``dry_run``: prints each task YAML and the command).

  Refuses a tree with uncommitted changes to tracked files (they would not ship); skips a job
  whose managed job of the same name is still active (a second slice would train the same run
  directory); writes each run's job.json (tables.render finds the rows by it) before launching.
  """
  dry_run = opts["dry_run"]
  sha, dirty = commit_of(repo)
  if dirty and not dry_run:
    raise UserError(f"launcher=tpu ships commit {sha[:12]} and {len(dirty)} tracked file(s) differ "
                    f"from it ({', '.join(dirty[:3])}{', ...' if len(dirty) > 3 else ''}): commit "
                    f"or stash them first")
  code: str | dict[str, str]
  if opts.get("repo_url"):  # the hosts clone this commit themselves
    code = {"url": opts["repo_url"], "ref": sha}
  else:
    code = os.path.abspath(os.path.join(STAGE_DIR, sha[:12]))
  specs = []
  for job in job_list:
    run_dir = storage.join(workdir, job.name)
    t_args = jobs.job_args(job, scale, run_dir, opts["data_dir"])
    e_args = jobs.eval_args(job, scale, run_dir, opts)
    rows = "; ".join(f"T{e.table} {e.group} {e.row}" for e in job.entries)
    config = task(job, t_args, e_args if opts["eval"] else None, opts, commit=sha, code=code)
    specs.append((job, run_dir, t_args, config, rows))
  shipped = (f"clones {opts['repo_url']} at" if opts.get("repo_url") else "uploads") + \
      f" commit {sha[:12]}"
  if dry_run:
    for job, _, _, config, rows in specs:
      path = os.path.join(STAGE_DIR, f"{config['name']}.yaml")
      print(f"# ---- {path}")
      print(to_yaml(config, rows), end="")
      print(f"sky jobs launch --yes --detach-run --name {config['name']} {path}", flush=True)
    note = (f"; {len(dirty)} tracked file(s) with uncommitted changes would not ship, and a launch "
            f"refuses until they are committed" if dirty else "")
    print(f"dry run: each job {shipped}{note}", file=sys.stderr)
    return
  sky = _sky(opts)
  if not opts.get("repo_url"):
    ship(repo, sha, code)
  known = managed_jobs(sky)
  failed, launched = [], []
  for job, run_dir, t_args, config, rows in specs:
    name = config["name"]
    last = known.get(name)
    if last and str(last.get("status")) in ACTIVE:
      print(f"[{job.name}] managed job {last.get('job_id')} ({name}) is {last.get('status')}: not "
            f"launched again", flush=True)
      continue
    if last and str(last.get("status", "")).startswith("FAILED"):
      print(f"[{job.name}] the last managed job {last.get('job_id')} ended {last.get('status')}: "
            f"{last.get('failure_reason') or 'see sky jobs logs --controller'}; launching again",
            flush=True)
    try:
      jobs.write_job_json(job, scale, run_dir, t_args)
    except OSError as e:
      raise UserError(f"cannot write to {run_dir} ({e.strerror or e}); choose a writable "
                      f"workdir=gs://...") from None
    path = os.path.join(STAGE_DIR, f"{name}.yaml")
    os.makedirs(STAGE_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write(to_yaml(config, rows))
    print(f"[{job.name}] launching {name} on {config['resources']['accelerators']} in "
          f"{config['resources']['infra']} ({rows})", flush=True)
    rc = subprocess.call([sky, "jobs", "launch", "--yes", "--detach-run", "--name", name, path])
    if rc:
      failed.append(f"{name} (exit status {rc})")
    else:
      launched.append(name)
  if launched:
    print(f"submitted {len(launched)} managed job(s), each {shipped}; follow them with: sky jobs "
          f"queue; sky jobs logs -n {launched[0]}; stop one with sky jobs cancel -n NAME",
          file=sys.stderr)
  if failed:
    raise UserError(f"sky jobs launch failed: {', '.join(failed)} (its output is above); rerun "
                    f"the same command to launch what is missing")
