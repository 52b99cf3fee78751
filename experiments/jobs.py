"""A registry job at a scale -> the exact ``core.train`` and ``eval.worker`` arguments, its
``job.json`` record, whether it is trained, and its model built from those arguments.

A job may carry per-run changes (:func:`with_overrides`: a batch size, gradient accumulation or
step count other than the row's, e.g. to fit a paper row to one GPU). They are bound after the
scale's settings, name the run (a changed row never resumes or overwrites the row's own run) and
are recorded in job.json as ``modified``, which the tables mark.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import gin

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import trainer as train_lib
from core.data import coco
from core.errors import UserError
from core.io import rundir, storage
from core.models import make_model
from eval.clip_score import DEFAULT_MODEL as DEFAULT_CLIP
from experiments import registry, scales

# Evaluation size per scale (the paper: 50K samples, 256 sampler steps is our default). Demo rows
# keep their 500 samples as an npz and compare them with whole splits (FID with a bootstrap spread,
# and KID); smoke compares 16 samples with a prefix of each split. All scales resize the paper's
# way (legacy_tensorflow) unless resize= says otherwise.
EVAL = {
    "paper": {"num_samples": None, "sampler_steps": None, "batch_size": 256,
              "max_reference_images": None, "save_samples": "grid"},
    # Demo: 32 sampler steps (on the 1,000-step row "original at 128": FID train 150.4 +- 1.7 vs
    # 146.7 +- 1.6 at 64 steps, KID train 0.127 vs 0.128 +- 0.002) at half the sampling time.
    "demo": {"num_samples": 500, "sampler_steps": 32, "batch_size": 100,
             "max_reference_images": None, "save_samples": "npz"},
    "smoke": {"num_samples": 16, "sampler_steps": 4, "batch_size": 8, "max_reference_images": 32,
              "save_samples": "npz"},
}


# The Train settings a run may change (experiments.run batch_size=, grad_accum=, steps=), with
# the word that names them in a changed run's name.
CHANGEABLE = {"batch_size": "batch", "grad_accum": "accum", "num_steps": "steps"}
# Gin bindings experiments.run passes on to core.train: how a run logs, checkpoints and reads its
# data, not what it trains (so the run keeps its name and the row is not marked).
RUN_BINDINGS = ("Train.log_every", "Train.checkpoint_every", "Train.keep_checkpoints",
                "Train.sample_every", "Train.num_workers")


def _bindings(job: registry.Job, scale: str, data_dir: str | None = None) -> list[str]:
  binds = list(job.bindings) + scales.scale_bindings(job.gin_files, job.bindings, job.arch,
                                                     job.resolution, scale)
  if data_dir:
    binds.append(f"Train.data_dir = '{data_dir.replace('{res}', str(job.resolution))}'")
  snapshot = scales.snapshot_step(job, scale)
  if snapshot:  # the row's checkpoint, saved and kept whatever Train.keep_checkpoints says; the
    # run stops there, on the schedule of all its steps (the paper's 700K of 1.5M)
    binds += [f"Train.keep_steps = [{snapshot[0]}]", f"train.stop_at_step = {snapshot[0]}"]
  return binds + list(job.overrides)


def job_args(job: registry.Job, scale: str, run_dir: str, data_dir: str | None) -> list[str]:
  """The exact ``python -m core.train`` arguments for a job at a scale."""
  args = [f"gin_file={f}" for f in job.gin_files]
  args += [b.replace(" ", "") for b in _bindings(job, scale, data_dir)]
  args.append(f"workdir={run_dir}")
  return args


def train_settings(job: registry.Job, scale: str) -> dict[str, int]:
  """The run's :data:`CHANGEABLE` Train settings at ``scale``, as gin resolves them."""
  with config_lib.scratch():
    config_lib.parse(list(job.gin_files), _bindings(job, scale))
    cfg = train_lib.TrainConfig()  # checks them (e.g. grad_accum divides batch_size)
  return {name: getattr(cfg, name) for name in CHANGEABLE}


def with_overrides(job: registry.Job, scale: str, *, batch_size: int | None = None,
                   grad_accum: int | None = None, steps: int | None = None,
                   bindings: Sequence[str] = ()) -> registry.Job:
  """``job`` with per-run changes: ``batch_size`` images per step, each step in ``grad_accum``
  micro-batches, ``steps`` steps (a snapshot row keeps its fraction of them), and
  :data:`RUN_BINDINGS`. A change names the run (``<row's run>-batch64-accum8``); a value equal to
  the row's is no change."""
  for b in bindings:
    if b.split("=", 1)[0].strip() not in RUN_BINDINGS:
      raise UserError(f"experiments.run takes only the gin bindings {', '.join(RUN_BINDINGS)} "
                      f"(got {b!r}); rows define their configuration (experiments/registry.py), "
                      f"and batch_size=, grad_accum= and steps= change their training")
  row = train_settings(job, scale)
  want = {"batch_size": batch_size, "grad_accum": grad_accum,
          "num_steps": steps}
  changes = {k: v for k, v in want.items() if v is not None and v != row[k]}
  changed = dataclasses.replace(
      job, name=job.name + "".join(f"-{CHANGEABLE[k]}{v}" for k, v in changes.items()),
      overrides=tuple(f"Train.{k} = {v}" for k, v in changes.items()) + tuple(bindings))
  train_settings(changed, scale)  # a grad_accum that does not divide the batch fails here
  return changed


def modified(job: registry.Job, scale: str) -> dict[str, list[int]]:
  """{setting: [the row's value, this run's]} of every :data:`CHANGEABLE` Train setting if the
  job's overrides change any of them (the tables mark the row), else {}."""
  run, row = train_settings(job, scale), train_settings(dataclasses.replace(job, overrides=()),
                                                        scale)
  return {k: [row[k], run[k]] for k in CHANGEABLE} if run != row else {}


def sampler_steps(job: registry.Job, scale: str) -> int:
  """The row's sampler steps at paper scale (a registry choice), the scale's own below it."""
  return EVAL[scale]["sampler_steps"] or job.sampler_steps


def eval_args(job: registry.Job, scale: str, run_dir: str, opts: dict[str, Any]) -> list[str]:
  ev = EVAL[scale]
  n = opts["num_samples"] or ev["num_samples"] or job.num_samples
  return [f"workdir={run_dir}", f"num_samples={n}",
          "guidance=" + ",".join(f"{w:g}" for w in job.guidances),
          f"batch_size={ev['batch_size']}", f"sampler_steps={sampler_steps(job, scale)}",
          f"noise_param={job.noise_param}", f"extractor={opts['extractor']}",
          f"resize={opts.get('resize') or 'legacy_tensorflow'}",
          f"save_samples={ev['save_samples']}",
          "once=true"] + _step_arg(job, scale) + (
              [f"max_reference_images={ev['max_reference_images']}"]
              if ev["max_reference_images"] else []) + (
              [f"clip_model={clip_model(scale, opts)}"] if "clip_score" in job.metrics else [])


def _step_arg(job: registry.Job, scale: str) -> list[str]:
  """A snapshot row (Table 3's "no dropout") evaluates its checkpoint, not the run's last."""
  snapshot = scales.snapshot_step(job, scale)
  return [f"step={snapshot[0]}"] if snapshot else []


def clip_model(scale: str, opts: dict[str, Any]) -> str:
  """The CLIP of a text-to-image row's CLIP score: the literature's ViT-L/14 at paper scale."""
  return opts.get("clip_model") or (DEFAULT_CLIP if scale == "paper" else "none")


def write_job_json(job: registry.Job, scale: str, run_dir: str, args: list[str]) -> None:
  """Records which table rows the run serves (merged with rows recorded by earlier invocations)."""
  path = rundir.job_path(run_dir)
  rows = job.rows_json(*(scales.snapshot_step(job, scale) or ()))
  if storage.exists(path):  # rows of earlier invocations stay; this one's replace their own
    new = {_row_id(r) for r in rows}
    rows = [r for r in json.loads(storage.read_text(path)).get("rows", [])
            if _row_id(r) not in new] + rows
  storage.makedirs(run_dir)
  record = {
      "run_name": job.name, "scale": scale, "arch": job.arch, "resolution": job.resolution,
      "gin_files": list(job.gin_files), "bindings": list(job.bindings), "train_args": args,
      "rows": rows, "data": coco.data_record(_data_dir(args)),
  }
  if job.overrides:  # tables/runs.py reads 'modified'
    record["overrides"] = list(job.overrides)
    record["modified"] = modified(job, scale)
  storage.write_text(path, json.dumps(record, indent=1))


def _row_id(row: dict) -> tuple:
  return row.get("table"), row.get("group"), row.get("row")


def _data_dir(train_args: Sequence[str]) -> str | None:
  """The run's Train.data_dir, its last binding as for gin (None: the built-in emoji set)."""
  given = [a.split("=", 1)[1] for a in train_args if a.startswith("Train.data_dir=")]
  return None if not given or given[-1] == "None" else given[-1].strip("'\"")


def is_trained(run_dir: str) -> bool:
  """Whether the run has checkpointed its configured last step (a snapshot row's stop)."""
  if not rundir.is_run(run_dir):
    return False
  last = latest_step(run_dir)
  return last is not None and last >= _configured_steps(run_dir)


def latest_step(run_dir: str) -> int | None:
  if not storage.exists(rundir.checkpoints_dir(run_dir)):
    return None
  c = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  try:
    return c.latest_step()
  finally:
    c.close()


def _configured_steps(run_dir: str) -> int:
  with config_lib.scratch():
    config_lib.parse_text(rundir.read_config(run_dir), rundir.config_path(run_dir))
    steps = train_lib.TrainConfig().num_steps
    stop = config_lib.query("train.stop_at_step")
    return steps if stop is None else min(steps, int(stop))


def build(train_args: Sequence[str]):
  """Parses a job's ``python -m core.train`` arguments; returns (model, TrainConfig, logsnr_fn)."""
  files = [a.split("=", 1)[1] for a in train_args if a.startswith("gin_file=")]
  binds = [a for a in train_args if not a.startswith(("gin_file=", "workdir="))]
  config_lib.parse(files, binds)
  model = make_model()
  logsnr_fn = gin.query_parameter("train.logsnr_fn").scoped_configurable_fn()
  return model, train_lib.TrainConfig(), logsnr_fn
