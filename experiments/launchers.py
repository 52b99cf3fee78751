"""Launchers: where a job's training and evaluation commands run.

- ``local``: this machine, one job after another (experiments/run.py calls the entry points).
- ``tpu``: a Cloud TPU VM slice per job with the standard tooling: a queued resource is created
  with ``gcloud compute tpus queued-resources``, the same command runs on every worker
  (``tpu-vm ssh --worker=all``), each process calls ``jax.distributed.initialize()`` which reads
  the slice's topology from the TPU environment, and the run directory is on GCS. With
  ``dry_run=true`` the exact commands are printed instead of executed.
"""
from __future__ import annotations

import shlex
import subprocess
from typing import Any, Sequence

from core.errors import UserError

LAUNCHERS = ("local", "tpu")
# The paper's hardware (appendix B): U-Nets on 64 TPUv2 devices, U-ViTs on 128 TPUv4 chips.
DEFAULT_TPU = {"unet": "v2-64", "uvit": "v4-256"}
RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
           "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def _runtime(accelerator_type: str) -> str:
  return RUNTIME.get(accelerator_type.split("-")[0], "tpu-ubuntu2204-base")


def tpu_commands(job, train_args: Sequence[str], eval_args: Sequence[str], opts: dict[str, Any]) -> list[str]:
  """The shell commands that run one job on a multi-host TPU slice, in order."""
  workdir = next(a.split("=", 1)[1] for a in train_args if a.startswith("workdir="))
  if not workdir.startswith("gs://"):
    raise UserError(f"launcher=tpu needs workdir on GCS (gs://bucket/prefix), got {workdir!r}: every TPU "
                    f"worker must see the same run directory")
  if not opts.get("repo_url"):
    raise UserError("launcher=tpu needs repo_url=<git URL of this repository> to check out on the workers")
  acc = opts.get("tpu_type") or DEFAULT_TPU[job.arch]
  zone = opts["tpu_zone"]
  node = f"sd-{job.name}"[:60].rstrip("-")
  project = f" --project {opts['tpu_project']}" if opts.get("tpu_project") else ""
  where = f"--zone {zone}{project}"
  setup = (f"(test -d simple-diffusion || git clone {shlex.quote(opts['repo_url'])} simple-diffusion) && "
           f"cd simple-diffusion && git pull --ff-only && bash scripts/setup.sh .venv && "
           f".venv/bin/pip install -q 'jax[tpu]'")
  train = ".venv/bin/python -m core.train " + " ".join(shlex.quote(a) for a in train_args) + " distributed=true"
  evaluate = ".venv/bin/python -m eval.worker " + " ".join(shlex.quote(a) for a in eval_args) + " distributed=true"
  ssh = f"gcloud compute tpus tpu-vm ssh {node} {where} --worker=all --command "
  return [
      f"gcloud compute tpus queued-resources create {node} --node-id {node} {where} "
      f"--accelerator-type {acc} --runtime-version {_runtime(acc)}",
      f"until [ \"$(gcloud compute tpus queued-resources describe {node} {where} "
      f"--format='value(state.state)')\" = ACTIVE ]; do sleep 60; done",
      ssh + shlex.quote(f"{setup} && {train}"),
      ssh + shlex.quote(f"cd simple-diffusion && {evaluate}"),
      f"gcloud compute tpus queued-resources delete {node} {where} --force --quiet",
  ]


def execute(commands: Sequence[str], *, dry_run: bool) -> None:
  """Prints (dry run) or runs the commands in order, stopping at the first failure."""
  for c in commands:
    print(c, flush=True)
    if not dry_run:
      rc = subprocess.call(c, shell=True)
      if rc:
        raise UserError(f"command failed with exit status {rc}: {c[:200]}")
