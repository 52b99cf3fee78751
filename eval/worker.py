"""The eval worker: follows a run directory and evaluates each new checkpoint exactly once.

    python -m eval.worker workdir=<run dir> [num_samples=50000] [guidance=1.0,1.05,...] [once=true]

For every complete checkpoint (newest first when it falls behind), and every guidance scale, it
samples with the EMA parameters, then computes FID against the training split, FID against the
eval split and the Inception Score (when the extractor has logits), the way the paper reports
them (section 5, Tables 2-9). Results are appended to ``<run>/eval/results.jsonl``, one JSON line
per (step, guidance, metric), and to TensorBoard.

Exactly once, under SIGKILL at any moment: a result row is written in a single append; rows that
already exist are never recomputed; sample batches are cached under ``<run>/eval/cache`` while an
evaluation is running, so a restarted worker finishes it instead of starting over; a torn last
line (killed mid-append) is dropped before the next append.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

from core import cli
from core import storage
from core.errors import UserError, run_main

METRICS = ("fid_train", "fid_eval", "is")


def results_path(run_dir: str) -> str:
  return storage.join(run_dir, "eval", "results.jsonl")


def read_results(run_dir: str) -> list[dict[str, Any]]:
  """Every complete result row (a torn final line is ignored)."""
  path = results_path(run_dir)
  if not storage.exists(path):
    return []
  rows = []
  for line in storage.read_text(path).splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def _repair(run_dir: str) -> None:
  """Drops a torn last line left by a kill during an append."""
  path = results_path(run_dir)
  if not storage.exists(path):
    return
  text = storage.read_text(path)
  if text and not text.endswith("\n"):
    good = [l for l in text.splitlines() if _parses(l)]
    storage.write_text(path, "".join(l + "\n" for l in good))


def _parses(line: str) -> bool:
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:
    return False


def _key(row: dict[str, Any]) -> tuple:
  return (int(row["step"]), row["metric"], float(row["guidance"]), int(row["num_samples"]), int(row["seed"]))


def evaluate_checkpoint(run_dir: str, step: int, *, guidances: Sequence[float], num_samples: int,
                        batch_size: int, sampler_steps: int, noise_param: float, seed: int,
                        extractor_source: str, writer=None) -> list[dict[str, Any]]:
  """Evaluates one checkpoint at each guidance scale; returns the rows it appended."""
  import jax  # pylint: disable=import-outside-toplevel
  from eval import inception, metrics, reference, sample  # pylint: disable=import-outside-toplevel
  from core import trainer as train_lib  # pylint: disable=import-outside-toplevel

  _repair(run_dir)
  done = {_key(r) for r in read_results(run_dir)}
  run = sample.load_run(run_dir)
  extractor = inception.FeatureExtractor(source=extractor_source)
  data_dir, _ = train_lib.resolve_data_dir(run.cfg)
  refs = {"fid_train": reference.reference_stats(data_dir, "train", extractor),
          "fid_eval": reference.reference_stats(data_dir, "eval", extractor)}
  wanted = ["fid_train", "fid_eval"] + (["is"] if extractor.has_logits else [])
  if not extractor.has_logits:
    print(f"IS unavailable: extractor {extractor.name} has no logits head", file=sys.stderr, flush=True)
  params = None
  written = []
  for w in guidances:
    todo = [m for m in wanted if (step, m, float(w), num_samples, seed) not in done]
    if not todo:
      continue
    if params is None:
      params = sample.restore_ema_params(run, step)
    cache = os.path.join(_local_cache_root(run_dir), f"step{step}_w{w}_n{num_samples}_s{seed}")
    os.makedirs(cache, exist_ok=True)
    images = sample.sample_images(run, params, num_samples=num_samples, batch_size=batch_size,
                                  num_steps=sampler_steps, noise_param=noise_param, guidance=w,
                                  seed=seed, cache_dir=cache)
    if jax.process_index() != 0:
      continue
    result = metrics.compute_metrics(images, extractor=extractor, ref_train=refs["fid_train"],
                                     ref_eval=refs["fid_eval"])
    rows = []
    for m in todo:
      value, std = (result["is"] if m == "is" else (result[m], None))
      rows.append({"step": step, "metric": m, "value": float(value), "std": None if std is None else float(std),
                   "num_samples": num_samples, "extractor": extractor.name,
                   "reference": reference.describe(data_dir, "train" if m != "fid_eval" else "eval", extractor),
                   "guidance": float(w), "seed": seed, "sampler_steps": sampler_steps,
                   "noise_param": noise_param, "time": time.time()})
    storage.append_lines(results_path(run_dir), [json.dumps(r) for r in rows])
    if writer is not None:
      writer.write_scalars(step, {f"eval/{r['metric']}_w{w:g}": r["value"] for r in rows})
    written += rows
    shutil.rmtree(cache, ignore_errors=True)
  return written


def _local_cache_root(run_dir: str) -> str:
  if storage.is_remote(run_dir):
    return os.path.join(os.path.expanduser("~/.cache/simple_diffusion/eval"), run_dir.replace("gs://", "").replace("/", "_"))
  return os.path.join(run_dir, "eval", "cache")


OPTIONS = [
    cli.Option("workdir", None, "the run directory to follow (local path or gs://...)"),
    cli.Option("num_samples", 50000, "samples per evaluation (the paper: 50K; 30K for COCO)", parse=int),
    cli.Option("guidance", [1.0], "comma-separated guidance scales w = 1 + eta (Table 9)", parse=cli.parse_floats),
    cli.Option("batch_size", 64, "sampling batch size (global, divisible by the device count)", parse=int),
    cli.Option("sampler_steps", 256, "DDPM sampling steps", parse=int),
    cli.Option("noise_param", 0.2, "interpolation between posterior and upper variance (appendix A)", parse=float),
    cli.Option("seed", 0, "sampling seed (noise and class labels)", parse=int),
    cli.Option("extractor", "auto", "Inception source: auto, clean-fid, fid-helper or a path to TorchScript weights"),
    cli.Option("once", False, "evaluate the newest checkpoint once and exit", parse=cli.parse_bool),
    cli.Option("step", None, "with once=true: the checkpoint step to evaluate (default: newest)", parse=int),
    cli.Option("poll_seconds", 60, "how often to look for new checkpoints", parse=float),
    cli.Option("stop_after_step", None, "exit after evaluating this step (e.g. the run's last)", parse=int),
]


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="eval.worker", description=__doc__.split("\n\n")[0])
  if bindings:
    raise UserError(f"eval.worker takes no gin bindings (got {bindings[0]!r}); the run's config.gin is used")
  run_dir = opts["workdir"]
  if not run_dir:
    raise UserError("give workdir=<run directory>")
  if not storage.exists(storage.join(run_dir, "config.gin")):
    raise UserError(f"{run_dir} is not a run directory (no config.gin); start training with core.train first")
  from core import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from core.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  kw = dict(guidances=opts["guidance"], num_samples=opts["num_samples"], batch_size=opts["batch_size"],
            sampler_steps=opts["sampler_steps"], noise_param=opts["noise_param"], seed=opts["seed"],
            extractor_source=opts["extractor"])
  checkpointer = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  writer = MetricWriter(storage.join(run_dir, "eval"), jsonl=False)
  try:
    if opts["once"]:
      steps = checkpointer.all_steps()
      step = opts["step"] if opts["step"] is not None else (steps[-1] if steps else None)
      if step is None:
        raise UserError(f"no complete checkpoint in {checkpointer.directory} yet")
      if step not in steps:
        raise UserError(f"checkpoint step {step} does not exist in {checkpointer.directory}; available: {steps}")
      for r in evaluate_checkpoint(run_dir, step, writer=writer, **kw):
        print(json.dumps(r), flush=True)
      return 0
    while True:
      done_steps = {int(r["step"]) for r in read_results(run_dir)}
      todo = [s for s in checkpointer.all_steps() if s not in done_steps]
      for step in sorted(todo, reverse=True)[:1]:
        for r in evaluate_checkpoint(run_dir, step, writer=writer, **kw):
          print(json.dumps(r), flush=True)
      last = opts["stop_after_step"]
      if last is not None and last in {int(r["step"]) for r in read_results(run_dir)}:
        return 0
      if not todo:
        time.sleep(opts["poll_seconds"])
  finally:
    writer.close()
    checkpointer.close()


if __name__ == "__main__":
  run_main(main)
