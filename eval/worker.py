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


SAVE_CHOICES = ("none", "grid", "npz", "png")


class Evaluator:
  """What stays fixed while the worker follows a run: extractor, references, evaluation settings."""

  def __init__(self, run_dir: str, *, guidances: Sequence[float], num_samples: int, batch_size: int,
               sampler_steps: int, noise_param: float, seed: int, extractor_source: str,
               ref_train: str | None = None, ref_eval: str | None = None,
               max_reference_images: int | None = None, save_samples: str = "grid"):
    from eval import inception  # pylint: disable=import-outside-toplevel
    self.run_dir = run_dir
    self.guidances = [float(w) for w in guidances]
    self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
    self.sampler_steps, self.noise_param = sampler_steps, noise_param
    self.extractor = inception.FeatureExtractor(source=extractor_source)
    self.metrics = ["fid_train", "fid_eval"] + (["is"] if self.extractor.has_logits else [])
    if not self.extractor.has_logits:
      print(f"IS unavailable: extractor {self.extractor.name} has no logits head (FID only)",
            file=sys.stderr, flush=True)
    self._refs_given = {"fid_train": ref_train, "fid_eval": ref_eval}
    self._max_ref = max_reference_images
    self.save_samples = save_samples
    self._refs = None
    self._run = None

  def _references(self):
    """(stats, description) per FID metric; computed (and cached next to the data) on first use."""
    if self._refs is None:
      from core import trainer  # pylint: disable=import-outside-toplevel
      from eval import reference, sample  # pylint: disable=import-outside-toplevel
      self._run = sample.load_run(self.run_dir)
      data_dir = None
      if not all(self._refs_given.values()):
        data_dir, _ = trainer.resolve_data_dir(self._run.cfg)
      self._refs = {}
      for metric, split in (("fid_train", "train"), ("fid_eval", "eval")):
        given = self._refs_given[metric]
        stats = reference.get_reference(given, data_dir=data_dir, split=split, extractor=self.extractor,
                                        max_images=self._max_ref)
        desc = reference.describe(data_dir, split, self.extractor, reference=given, max_images=self._max_ref)
        self._refs[metric] = (stats, desc)
    return self._refs

  def _save(self, step: int, w: float, images) -> None:
    """A sample grid for figures (eval/samples_<step>[_w<w>].png), and optionally every sample."""
    import io  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from core.metrics import image_grid  # pylint: disable=import-outside-toplevel
    if self.save_samples == "none":
      return

    def png(a) -> bytes:
      buf = io.BytesIO()
      Image.fromarray(np.asarray(a)).save(buf, format="PNG")
      return buf.getvalue()

    suffix = "" if w == 1.0 else f"_w{w:g}"
    eval_dir = storage.join(self.run_dir, "eval")
    storage.write_bytes(storage.join(eval_dir, f"samples_{step}{suffix}.png"), png(image_grid(images[:64])))
    if self.save_samples == "npz":
      buf = io.BytesIO()
      np.savez_compressed(buf, images=images)
      storage.write_bytes(storage.join(eval_dir, "samples", f"step{step}_w{w:g}.npz"), buf.getvalue())
    elif self.save_samples == "png":
      folder = storage.join(eval_dir, "samples", f"step{step}_w{w:g}")
      for i, img in enumerate(images):
        storage.write_bytes(storage.join(folder, f"{i:06d}.png"), png(img))

  def missing(self, step: int) -> list[tuple[float, str]]:
    """(guidance, metric) pairs of ``step`` without a result row yet."""
    done = {_key(r) for r in read_results(self.run_dir)}
    return [(w, m) for w in self.guidances for m in self.metrics
            if (step, m, w, self.num_samples, self.seed) not in done]

  def evaluate(self, step: int, writer=None) -> list[dict[str, Any]]:
    """Evaluates checkpoint ``step`` at each guidance scale; appends and returns the new rows."""
    import jax  # pylint: disable=import-outside-toplevel
    from eval import metrics, sample  # pylint: disable=import-outside-toplevel
    _repair(self.run_dir)
    todo = self.missing(step)
    if not todo:
      return []
    refs = self._references()
    params = sample.restore_ema_params(self._run, step)
    written = []
    for w in self.guidances:
      wanted = [m for (ww, m) in todo if ww == w]
      if not wanted:
        continue
      cache = os.path.join(_local_cache_root(self.run_dir), f"step{step}_w{w:g}_n{self.num_samples}_s{self.seed}")
      os.makedirs(cache, exist_ok=True)
      images = sample.sample_images(self._run, params, num_samples=self.num_samples, batch_size=self.batch_size,
                                    num_steps=self.sampler_steps, noise_param=self.noise_param, guidance=w,
                                    seed=self.seed, cache_dir=cache)
      if jax.process_index() != 0:
        continue
      self._save(step, w, images)
      result = metrics.compute_metrics(images, extractor=self.extractor, ref_train=refs["fid_train"][0],
                                       ref_eval=refs["fid_eval"][0], is_splits=min(10, len(images)))
      rows = []
      for m in wanted:
        value, std = result["is"] if m == "is" else (result[m], None)
        rows.append({"step": step, "metric": m, "value": float(value), "std": None if std is None else float(std),
                     "num_samples": self.num_samples, "extractor": self.extractor.name,
                     "reference": refs["fid_eval" if m == "fid_eval" else "fid_train"][1],
                     "guidance": w, "seed": self.seed, "sampler_steps": self.sampler_steps,
                     "noise_param": self.noise_param, "time": time.time()})
      # One append per guidance scale: a kill leaves either all of these rows or a torn line.
      storage.append_lines(results_path(self.run_dir), [json.dumps(r) for r in rows])
      if writer is not None:
        writer.write_scalars(step, {f"eval/{r['metric']}_w{w:g}": r["value"] for r in rows})
        writer.flush()
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
    cli.Option("ref_train", None, "FID train reference .npz with mu and sigma (default: the run's train split)"),
    cli.Option("ref_eval", None, "FID eval reference .npz with mu and sigma (default: the run's eval split)"),
    cli.Option("max_reference_images", None, "use only this many images of each split for reference statistics",
               parse=int),
    cli.Option("save_samples", "grid", "keep samples: a PNG grid for figures (grid), also every sample as "
               "one .npz (npz) or a PNG folder (png), or nothing (none)", choices=SAVE_CHOICES),
    cli.Option("once", False, "evaluate one checkpoint (the newest, or step=) and exit", parse=cli.parse_bool),
    cli.Option("step", None, "with once=true: the checkpoint step to evaluate (default: newest)", parse=int),
    cli.Option("poll_seconds", 60, "how often to look for new checkpoints", parse=float),
    cli.Option("stop_after_step", None, "exit once this step (e.g. the run's last) is evaluated", parse=int),
    cli.Option("distributed", False, "call jax.distributed.initialize() (multi-host sampling)", parse=cli.parse_bool),
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
  if opts["distributed"]:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  from core import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from core.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  evaluator = Evaluator(run_dir, guidances=opts["guidance"], num_samples=opts["num_samples"],
                        batch_size=opts["batch_size"], sampler_steps=opts["sampler_steps"],
                        noise_param=opts["noise_param"], seed=opts["seed"], extractor_source=opts["extractor"],
                        ref_train=opts["ref_train"], ref_eval=opts["ref_eval"],
                        max_reference_images=opts["max_reference_images"], save_samples=opts["save_samples"])
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
      for r in evaluator.evaluate(step, writer):
        print(json.dumps(r), flush=True)
      return 0
    while True:
      # Newest first: a worker that fell behind reports the current state of the run first.
      todo = [s for s in reversed(checkpointer.all_steps()) if evaluator.missing(s)]
      if todo:
        for r in evaluator.evaluate(todo[0], writer):
          print(json.dumps(r), flush=True)
      last = opts["stop_after_step"]
      if last is not None and last in checkpointer.all_steps() and not evaluator.missing(last):
        return 0
      if not todo:
        time.sleep(opts["poll_seconds"])
  finally:
    writer.close()
    checkpointer.close()


if __name__ == "__main__":
  run_main(main)
