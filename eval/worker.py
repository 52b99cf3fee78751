"""The eval worker: follows a run directory and evaluates each new checkpoint exactly once.

    python -m eval.worker workdir=<run dir> [num_samples=50000] [guidance=1.0,1.05,...] [once=true]

For every complete checkpoint (newest first when it falls behind), and every guidance scale, it
samples with the EMA parameters, then computes FID against the training split, FID against the
eval split and the Inception Score (when the extractor has logits), the way the paper reports
them (section 5, Tables 2-9), and beside them KID (unbiased at small n) and a bootstrap spread of
each FID. Results are appended to ``<run>/eval/results.jsonl``, one JSON line per (step,
guidance, metric), and to TensorBoard's run ``<run>/eval`` (each metric, its spread and n against
the training step, the sample grid, a results table, the run's hyperparameters; see
docs/tensorboard.md). Every setting that changes a number (sampler steps, noise parameter, sample
count, seed, extractor, resize, reference) is part of a result's key, so a rerun with other
settings evaluates again instead of reusing old numbers.

Exactly once, under SIGKILL at any moment: a result row is written in a single append; rows that
already exist are never recomputed; sample batches are cached under ``<run>/eval/cache`` while an
evaluation is running, so a restarted worker finishes it instead of starting over; a torn last
line (killed mid-append) is dropped before the next append. A read-only run directory is a
one-line error before any work.

Multi-host (``distributed=true``, or ``coordinator=`` etc. as core.train): every process samples
its share; process 0 decides what to evaluate (its results file, its checkpoint list, its sample
cache, broadcast: core/multihost.py), and it alone computes the references and metrics and writes
results, samples and events, so hosts cannot fall out of step whatever their disks hold.

Text-to-image runs (Table 8, Figure 8): sample ``i`` is conditioned on caption ``i`` of the data
set's evaluation caption set (core/data/captions.py: 30K captions drawn once from the COCO
validation set), the unconditional pass of guidance on the null text; FID (and KID) against the
eval split only (the COCO validation set) and the CLIP score of each sample with its caption
(eval/clip_score.py, ``clip_model=``), one row per (guidance, metric). The noise parameter is the
caller's (the registry gives 1.0 for COCO, appendix A). A model with the portrait flag (the
384x640 model, Sec. 5) samples caption ``i`` with the flag of its image, so portraits (rotated,
as prepared) are in the proportion of the reference.
"""
from __future__ import annotations

from core import errors

if __name__ == "__main__":
  errors.defer_sigterm()  # before the slow imports below: StopOnSigterm takes it in main()

import io  # noqa: E402  (after defer_sigterm, on purpose)
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Iterator, Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from core import checkpoint as ckpt_lib  # noqa: E402
from core import cli  # noqa: E402
from core import multihost  # noqa: E402
from core import train as train_cli  # noqa: E402
from core import trainer  # noqa: E402
from core.errors import UserError, run_main  # noqa: E402
from core.data import captions as captions_lib  # noqa: E402
from core.io import jsonl, rundir, storage  # noqa: E402
from core.metric_writer import MetricWriter, image_grid  # noqa: E402
from eval import clip_score, inception, metrics, reference, sample  # noqa: E402
from eval.clip_score import DEFAULT_MODEL as DEFAULT_CLIP  # noqa: E402
from eval.inception import RESIZE_MODES  # noqa: E402


def read_results(run_dir: str) -> list[dict[str, Any]]:
  """Every complete result row (a torn final line is ignored)."""
  return jsonl.read(rundir.results_path(run_dir))


# Every field of a row that changes its number; a row is reused only if all of them are equal.
KEY_FIELDS = ("step", "metric", "guidance", "num_samples", "seed", "sampler_steps", "noise_param",
              "extractor", "resize_mode", "reference")


def _norm(v: Any) -> Any:
  if isinstance(v, bool) or v is None or isinstance(v, str):
    return v
  if isinstance(v, (int, float)):
    return float(v)
  return str(v)


def result_key(row: dict[str, Any]) -> tuple:
  """The identity of a result: its KEY_FIELDS (missing ones, in older rows, are None)."""
  return tuple(_norm(row.get(k)) for k in KEY_FIELDS)


SAVE_CHOICES = ("none", "grid", "npz", "png")


def _log(msg: str) -> None:
  """A progress line on stderr (plain, so it also shows in logs and CI, not only on a terminal)."""
  print(f"eval: {msg}", file=sys.stderr, flush=True)


class Evaluator:
  """What stays fixed while the worker follows a run: extractor, references, evaluation settings."""

  def __init__(self, run_dir: str, *, guidances: Sequence[float], num_samples: int, batch_size: int,
               sampler_steps: int, noise_param: float, seed: int, extractor_source: str,
               resize_mode: str = "legacy_tensorflow", ref_train: str | None = None,
               ref_eval: str | None = None, ref_convention: str | None = None,
               max_reference_images: int | None = None, save_samples: str = "grid",
               bootstrap: int = 20, inception_batch_size: int = 50,
               clip_model: str | None = DEFAULT_CLIP, clip_batch_size: int = 64,
               cache_dir: str | None = None):
    for name, value, least in (("batch_size", batch_size, 1), ("num_samples", num_samples, 2),
                               ("sampler_steps", sampler_steps, 1), ("bootstrap", bootstrap, 0)):
      if value < least:
        raise UserError(f"eval.worker {name}={value} must be at least {least}")
    self.run_dir = run_dir
    self.cache_root = cache_dir or _local_cache_root(run_dir)
    self.guidances = [float(w) for w in guidances]
    self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
    self.sampler_steps, self.noise_param = sampler_steps, noise_param
    self.bootstrap = bootstrap
    self.extractor = inception.FeatureExtractor(source=extractor_source, resize_mode=resize_mode,
                                                batch_size=inception_batch_size)
    self._refs_given = {"train": ref_train, "eval": ref_eval}
    self._convention = ref_convention
    self._max_ref = max_reference_images
    self.save_samples = save_samples
    self._refs = None
    self._run = None
    self._data_dir = None
    self._described = None
    self.clip_model = None if clip_model in (None, "", "none") else clip_model
    self._clip_batch_size = clip_batch_size
    self._clip = None
    self._captions = None
    self.text_to_image = False

  def _load_run(self):
    if self._run is None:
      self._run = sample.load_run(self.run_dir)
      self.text_to_image = sample.is_text_to_image(self._run)
      if self.text_to_image:  # zero-shot COCO: FID against the validation set (the eval split)
        self._refs_given = {"eval": self._refs_given["eval"]}
      if self.text_to_image or not all(self._refs_given.values()):
        self._data_dir, _ = trainer.resolve_data_dir(self._run.cfg, text=self.text_to_image)
    return self._run

  def captions(self):
    """The data set's evaluation captions (text-to-image), checked against the run and n."""
    if self._captions is None:
      self._load_run()
      c = captions_lib.load_eval_captions(self._data_dir)
      if len(c.captions) < self.num_samples:
        raise UserError(f"num_samples={self.num_samples} but {self._data_dir} has "
                        f"{len(c.captions)} evaluation captions (one sample per caption); use "
                        f"num_samples<={len(c.captions)} or prepare more captions")
      dim = int(c.text_emb.shape[-1])
      if dim != self._run.cfg.text_dim:
        raise UserError(f"the evaluation captions of {self._data_dir} are {dim}-d embeddings but "
                        f"the run trained on Train.text_dim={self._run.cfg.text_dim}; prepare the "
                        f"captions with the run's text encoder")
      self._captions = c
    return self._captions

  def conditions(self) -> dict[str, np.ndarray]:
    """Sample i's conditioning: caption i's embedding and mask and, for a model with the portrait
    flag (the 384x640 model, Sec. 5), the flag of the image caption i was drawn from, so that
    samples are portraits (rotated, as prepared) in the reference's proportion."""
    c = self.captions()
    n = self.num_samples
    out = {"text_emb": np.asarray(c.text_emb[:n]), "text_mask": np.asarray(c.text_mask[:n])}
    if getattr(self._run.model, "portrait_conditioning", False):
      out["portrait"] = sample.caption_portraits(self._data_dir, c.keys[:n],
                                                 c.meta.get("split", "eval"))
    return out

  def _captions_desc(self) -> str:
    m = self.captions().meta
    return (f"{self._data_dir}/eval_captions (encoder {m.get('encoder')}, {m.get('count')} "
            f"captions, seed {m.get('seed')})")

  def _descriptions(self) -> dict[str, tuple[str, bool]]:
    """Per split: (the reference recorded in rows, whether it gives KID), without computing it."""
    if self._described is None:
      self._load_run()
      self._described = {}
      for split, given in self._refs_given.items():
        desc = reference.describe(self._data_dir, split, self.extractor, reference=given,
                                  max_images=self._max_ref)
        self._described[split] = (desc, reference.has_kid_features(given))
    return self._described

  def _references(self):
    """{split: eval.reference.Reference}; computed (and cached next to the data) on first use."""
    if self._refs is None:
      self._load_run()
      self._refs = {}
      for split, given in self._refs_given.items():
        if not given:
          _log(f"reference statistics of the {split} split of {self._data_dir} "
               f"({self.extractor.name}, resize {self.extractor.resize_mode})")
        self._refs[split] = reference.get_reference(
            given, data_dir=self._data_dir, split=split, extractor=self.extractor,
            max_images=self._max_ref, convention=self._convention)
    return self._refs

  def metric_names(self) -> list[str]:
    described = self._descriptions()
    names = [f"fid_{split}" for split in described]
    names += [f"kid_{split}" for split, (_, has_kid) in described.items() if has_kid]
    names += ["is"] if self.extractor.has_logits else []
    return names + (["clip_score"] if self.text_to_image and self.clip_model else [])

  def row_settings(self, metric: str) -> dict[str, Any]:
    """Every setting of ``metric``'s row that changes its number (KEY_FIELDS but step/guidance)."""
    if metric == "clip_score":
      return {"num_samples": self.num_samples, "seed": self.seed,
              "sampler_steps": self.sampler_steps, "noise_param": self.noise_param,
              "extractor": self.clip_model, "resize_mode": "clip_processor",
              "reference": self._captions_desc()}
    split = metric.split("_", 1)[1] if "_" in metric else "train"
    return {"num_samples": self.num_samples, "seed": self.seed, "sampler_steps": self.sampler_steps,
            "noise_param": self.noise_param, "extractor": self.extractor.name,
            "resize_mode": self.extractor.resize_mode,
            "reference": self._descriptions()[split][0] if metric != "is" else None}

  def tag(self, step: int, w: float) -> str:
    """Names the samples of one evaluation (sample cache, saved npz): every sampling setting."""
    return (f"step{step}_w{w:g}_n{self.num_samples}_t{self.sampler_steps}_seed{self.seed}"
            f"_noise{self.noise_param:g}")

  def _save(self, step: int, w: float, images) -> str | None:
    """A sample grid for figures (eval/samples_<step>[_w<w>].png), and optionally every sample;
    returns the saved npz's path relative to the run directory (None when not saved)."""
    if self.save_samples == "none":
      return None

    def png(a) -> bytes:
      buf = io.BytesIO()
      Image.fromarray(np.asarray(a)).save(buf, format="PNG")
      return buf.getvalue()

    suffix = "" if w == 1.0 else f"_w{w:g}"
    eval_dir = storage.join(self.run_dir, "eval")
    storage.write_bytes(storage.join(eval_dir, f"samples_{step}{suffix}.png"),
                        png(image_grid(images[:64])))
    if self.save_samples == "npz":
      buf = io.BytesIO()
      np.savez_compressed(buf, images=np.asarray(images, np.uint8))
      rel = f"eval/samples/{self.tag(step, w)}.npz"
      storage.write_bytes(storage.join(self.run_dir, rel), buf.getvalue())
      return rel
    if self.save_samples == "png":
      folder = storage.join(eval_dir, "samples", self.tag(step, w))
      for i, img in enumerate(images):
        storage.write_bytes(storage.join(folder, f"{i:06d}.png"), png(img))
    return None

  def missing(self, step: int) -> list[tuple[float, str]]:
    """(guidance, metric) pairs of ``step`` without a result row for these settings yet."""
    done = {result_key(r) for r in read_results(self.run_dir)}
    return [(w, m) for w in self.guidances for m in self.metric_names()
            if result_key(dict(self.row_settings(m), step=step, metric=m, guidance=w)) not in done]

  def todo(self, step: int) -> list[tuple[float, str]]:
    """:meth:`missing`, as process 0 sees it, on every process (one results file decides)."""
    grid = [(w, m) for w in self.guidances for m in self.metric_names()]

    def decide() -> np.ndarray:
      jsonl.repair(rundir.results_path(self.run_dir))
      missing = set(self.missing(step))
      return np.asarray([p in missing for p in grid], np.int32)

    mask = multihost.from_chief(decide, np.zeros(len(grid), np.int32))
    return [p for p, t in zip(grid, mask) if t]

  def evaluate(self, step: int, writer=None) -> list[dict[str, Any]]:
    """Evaluates checkpoint ``step`` at each guidance scale; appends and returns the new rows.

    Every process samples; process 0 alone computes the references and metrics and writes rows,
    samples and events (the others return []). What to evaluate is process 0's decision.
    """
    todo = self.todo(step)
    if not todo:
      if multihost.is_chief():
        _log(f"nothing to evaluate: step {step} has every result for these settings in "
             f"{rundir.results_path(self.run_dir)}")
      return []
    refs = multihost.on_chief(self._references)
    if not self.extractor.has_logits and multihost.is_chief():
      _log(f"IS unavailable: extractor {self.extractor.name} has no logits head (FID and KID only)")
    params = sample.restore_ema_params(self._run, step)
    conditions = self.conditions() if self.text_to_image else None
    written = []
    for w in self.guidances:
      wanted = [m for (ww, m) in todo if ww == w]
      if not wanted:
        continue
      cache = os.path.join(self.cache_root, self.tag(step, w))
      if multihost.is_chief():
        _log(f"step {step} w={w:g}: sampling {self.num_samples} images "
             f"({self.sampler_steps} steps)")
      images = sample.sample_images(self._run, params, num_samples=self.num_samples,
                                    batch_size=self.batch_size,
                                    num_steps=self.sampler_steps, noise_param=self.noise_param,
                                    guidance=w, seed=self.seed, cache_dir=cache,
                                    conditions=conditions)
      rows = multihost.on_chief(lambda: self._score(step, w, wanted, images, refs, writer))
      written += rows or []
      if multihost.is_chief():
        shutil.rmtree(cache, ignore_errors=True)
    if writer is not None and written:
      keys = {result_key(dict(self.row_settings(m), step=step, metric=m, guidance=w))
              for w in self.guidances for m in self.metric_names()}
      done = [r for r in read_results(self.run_dir) if result_key(r) in keys]
      writer.write_text("results", results_table(done), step)
      writer.flush()
    return written

  def _score(self, step: int, w: float, wanted: list[str], images: np.ndarray, refs,
             writer) -> list[dict[str, Any]]:
    """The metrics of one guidance scale's samples, appended as rows (process 0 only)."""
    if len(images) != self.num_samples:  # sample_images' contract; rows record num_samples
      raise RuntimeError(f"{len(images)} samples for num_samples={self.num_samples}")
    saved = self._save(step, w, images)
    _log(f"step {step} w={w:g}: Inception features of {len(images)} samples "
         f"({self.extractor.name}, resize {self.extractor.resize_mode})")
    feats, logits = self.extractor.features(metrics.validate_images(images))
    evaluators = metrics.evaluators(
        refs, has_logits=logits is not None, is_splits=min(10, len(images)),
        bootstrap=self.bootstrap, seed=self.seed,
        provenance={"extractor": self.extractor.name, "resize_mode": self.extractor.resize_mode})
    result = {k: v for ev in evaluators for k, v in ev(feats, logits)}
    if "clip_score" in wanted:
      result.update(self._clip_score(images))
    rows = []
    for m in wanted:
      if m not in result:
        continue
      std = result.get(f"{m}_std")
      std = None if std is None or not np.isfinite(std) else float(std)
      ref = refs.get(m.split("_", 1)[1]) if m not in ("is", "clip_score") else None
      rows.append({"step": step, "metric": m, "value": float(result[m]), "std": std,
                   "std_kind": None if std is None else metrics.std_kind(m),
                   **self.row_settings(m), "guidance": w,
                   "reference_split": None if ref is None else ref.meta.get("split"),
                   "reference_num_images": None if ref is None else ref.meta.get("num_images"),
                   "bootstrap": self.bootstrap if m.startswith("fid") else None,
                   "batch_size": self.batch_size,
                   "samples": saved, "time": time.time()})
    # One append per guidance scale: a kill leaves either all of these rows or a torn line.
    jsonl.append(rundir.results_path(self.run_dir), rows)
    for r in rows:
      spread = "" if r["std"] is None else f" ± {r['std']:.4g}"
      _log(f"step {step} w={w:g}: {r['metric']} = {r['value']:.4g}{spread} "
           f"(n={r['num_samples']})")
    if writer is not None:
      writer.write_hparams(trainer.run_hparams(self.run_dir, self._run.model, self._run.cfg),
                           group=storage.basename(self.run_dir))
      writer.write_scalars(step, tb_scalars(rows, w))
      writer.write_images(step, {tb_tag("samples", w): np.asarray(images[:64])})
      writer.flush()
    return rows

  def _clip_score(self, images) -> Iterator[tuple[str, float]]:
    """clip_score of sample i with caption i (mean) and clip_score_std (its standard error)."""
    if self._clip is None:
      self._clip = clip_score.ClipScore(self.clip_model, batch_size=self._clip_batch_size)
    _log(f"CLIP score of {len(images)} samples ({self.clip_model})")
    return self._clip(images, self.captions().captions[:len(images)])


def tb_tag(name: str, w: float) -> str:
  """The TensorBoard tag of an evaluation's scalar or image (after the eval writer's ``eval/``):
  ``fid_train`` at guidance 1, ``fid_train_w1.5`` at another scale."""
  return name if w == 1.0 else f"{name}_w{w:g}"


def tb_scalars(rows: Sequence[dict[str, Any]], w: float) -> dict[str, float]:
  """Each metric of ``rows`` (one guidance scale), its spread (``<metric>_std``: bootstrap for
  FID, over subsets for KID and IS) and the number of samples, as TensorBoard scalars."""
  out = {}
  for r in rows:
    out[tb_tag(r["metric"], w)] = r["value"]
    if r["std"] is not None:
      out[tb_tag(r["metric"], w) + "_std"] = r["std"]
    out[tb_tag("num_samples", w)] = r["num_samples"]
  return out


def results_table(rows: Sequence[dict[str, Any]]) -> str:
  """A markdown table of one checkpoint's result rows (TensorBoard's text dashboard shows it:
  readable where a chart has a single point)."""
  lines = ["| metric | guidance | value | ± std | n | sampler steps | reference |",
           "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["guidance"], r["metric"])):
    std = "" if r.get("std") is None else f"{r['std']:.4g} ({r.get('std_kind')})"
    ref = "" if r.get("reference_split") is None else (
        f"{r['reference_split']} split, {r.get('reference_num_images')} images")
    lines.append(f"| {r['metric']} | {r['guidance']:g} | {r['value']:.4g} | {std} | "
                 f"{r['num_samples']} | {r['sampler_steps']} | {ref} |")
  return "\n".join(lines)


def _local_cache_root(run_dir: str) -> str:
  if storage.is_remote(run_dir):
    return os.path.join(os.path.expanduser("~/.cache/simple_diffusion/eval"),
                        run_dir.replace("gs://", "").replace("/", "_"))
  return os.path.join(run_dir, "eval", "cache")


OPTIONS = [
    cli.Option("workdir", None, "the run directory to follow (local path or gs://...)"),
    cli.Option("num_samples", 50000, "samples per evaluation (the paper: 50K; 30K for COCO)",
               parse=int),
    cli.Option("guidance", [1.0], "comma-separated guidance scales w = 1 + eta (Table 9)",
               parse=cli.parse_floats),
    cli.Option("batch_size", 64, "sampling batch size (global, divisible by the device count)",
               parse=int),
    cli.Option("sampler_steps", 256, "DDPM sampling steps", parse=int),
    cli.Option("noise_param", 0.2,
               "interpolation between posterior and upper variance (appendix A)", parse=float),
    cli.Option("seed", 0, "sampling seed (noise and class labels)", parse=int),
    cli.Option("extractor", "auto",
               "Inception source: auto, clean-fid, fid-helper or a path to TorchScript weights"),
    cli.Option("resize", "legacy_tensorflow", "how samples and references are resized to 299x299: "
               "legacy_tensorflow (the TF graph's bilinear, as the paper and ADM's evaluator) or "
               "clean (clean-fid's PIL bicubic)", choices=RESIZE_MODES),
    cli.Option("ref_train", None,
               "FID train reference .npz with mu and sigma (default: the run's train split)"),
    cli.Option("ref_eval", None,
               "FID eval reference .npz with mu and sigma (default: the run's eval split)"),
    cli.Option("ref_convention", None,
               "the resize a ref_train/ref_eval .npz without a provenance record "
               "was computed with (ADM's reference batches: legacy_tensorflow)",
               choices=RESIZE_MODES),
    cli.Option("max_reference_images", None,
               "use only this many images of each split for reference "
               "statistics (default: the whole split)", parse=int),
    cli.Option("bootstrap", 20, "resamples of the samples for each FID's spread (std); 0 = none",
               parse=int),
    cli.Option("inception_batch_size", 50, "images per Inception forward pass", parse=int),
    cli.Option("save_samples", "grid",
               "keep samples: a PNG grid for figures (grid), also every sample as "
               "one .npz (npz) or a PNG folder (png), or nothing (none)", choices=SAVE_CHOICES),
    cli.Option("clip_model", DEFAULT_CLIP,
               "text-to-image runs: CLIP for the CLIP score (Figure 8), a "
               "Hugging Face name in the local cache or a local directory; none = skip it"),
    cli.Option("clip_batch_size", 64, "images per CLIP forward pass", parse=int),
    cli.Option("once", False, "evaluate one checkpoint (the newest, or step=) and exit",
               parse=cli.parse_bool),
    cli.Option("step", None, "with once=true: the checkpoint step to evaluate (default: newest)",
               parse=int),
    cli.Option("poll_seconds", 60, "how often to look for new checkpoints", parse=float),
    cli.Option("stop_after_step", None, "exit once this step (e.g. the run's last) is evaluated",
               parse=int),
    cli.Option("cache_dir", None,
               "where finished sample batches wait while an evaluation runs, so a restarted "
               "worker finishes it (default: <run>/eval/cache; for gs:// runs "
               "~/.cache/simple_diffusion/eval/...); multi-host: process 0's is used"),
    cli.Option("distributed", False, "call jax.distributed.initialize() (multi-host sampling)",
               parse=cli.parse_bool),
    *[o for o in train_cli.OPTIONS if o.name in ("coordinator", "num_processes", "process_id")],
]


def check_writable(run_dir: str) -> None:
  """A one-line error, naming the fix, when ``<run>/eval`` (results, samples, events) cannot be
  written: a run directory on a read-only mount, or another user's."""
  if storage.is_remote(run_dir):
    return  # a gs:// write refused for permissions is already a one-line error (core.io.storage)
  eval_dir = os.path.join(run_dir, "eval")
  try:
    os.makedirs(eval_dir, exist_ok=True)
    tempfile.TemporaryFile(dir=eval_dir).close()
  except OSError as e:
    raise UserError(f"cannot write to {eval_dir} ({e.strerror}): the worker writes its results "
                    f"there; make the run directory writable, or evaluate a copy of it "
                    f"(cp -r {run_dir} <writable dir>, then workdir=<writable dir>)") from None


def main(argv: Sequence[str]) -> int:
  # SIGTERM (preemption, a scheduler's time limit, the runner stopping its background
  # evaluation) stops the worker with exit status 75: its finished batches are cached and its
  # rows whole, so the same command resumes.
  with errors.StopOnSigterm():
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="eval.worker",
                             description=__doc__.split("\n\n")[0])
  if bindings:
    raise UserError(f"eval.worker takes no gin bindings (got {bindings[0]!r}); the run's "
                    f"config.gin is used")
  run_dir = opts["workdir"]
  if not run_dir:
    raise UserError("give workdir=<run directory>")
  if not rundir.is_run(run_dir):
    raise UserError(f"{run_dir} is not a run directory (no config.gin); start training with "
                    f"core.train first")
  train_cli.initialize_distributed(opts)
  multihost.on_chief(lambda: check_writable(run_dir))
  evaluator = Evaluator(run_dir, guidances=opts["guidance"], num_samples=opts["num_samples"],
                        batch_size=opts["batch_size"], sampler_steps=opts["sampler_steps"],
                        noise_param=opts["noise_param"], seed=opts["seed"],
                        extractor_source=opts["extractor"],
                        resize_mode=opts["resize"], ref_train=opts["ref_train"],
                        ref_eval=opts["ref_eval"],
                        ref_convention=opts["ref_convention"],
                        max_reference_images=opts["max_reference_images"],
                        save_samples=opts["save_samples"],
                        bootstrap=opts["bootstrap"],
                        inception_batch_size=opts["inception_batch_size"],
                        clip_model=opts["clip_model"], clip_batch_size=opts["clip_batch_size"],
                        cache_dir=opts["cache_dir"])
  checkpointer = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  writer = MetricWriter(run_dir, jsonl=False, tb_dir=rundir.EVAL_EVENTS, tb_prefix="eval/",
                        legacy_tb_dir=f"{rundir.EVAL_EVENTS}/tb", is_chief=multihost.is_chief())
  try:
    if opts["once"]:
      def pick() -> int:
        steps = checkpointer.all_steps()
        step = opts["step"] if opts["step"] is not None else (steps[-1] if steps else None)
        if step is None:
          raise UserError(f"no complete checkpoint in {checkpointer.directory} yet")
        if step not in steps:
          raise UserError(f"checkpoint step {step} does not exist in {checkpointer.directory}; "
                          f"available: {steps}")
        return step

      step = int(multihost.from_chief(pick, np.int32(0)))  # every process: process 0's choice
      for r in evaluator.evaluate(step, writer):
        print(json.dumps(r), flush=True)
      return 0
    waiting, last = False, opts["stop_after_step"]

    def newest_todo() -> tuple[int, int]:
      # Newest first: a worker that fell behind reports the current state of the run first.
      steps = checkpointer.all_steps()
      todo = [s for s in reversed(steps) if evaluator.missing(s)]
      return (todo[0] if todo else -1), len(steps)

    def finished() -> bool:
      return last is not None and last in checkpointer.all_steps() and not evaluator.missing(last)

    while True:
      step, num_steps = (int(v) for v in multihost.from_chief(newest_todo, np.zeros(2, np.int32)))
      if step >= 0:
        waiting = False
        for r in evaluator.evaluate(step, writer):
          print(json.dumps(r), flush=True)
      if multihost.from_chief(finished, np.int32(0)):
        return 0
      if step < 0:
        if not waiting and multihost.is_chief():
          _log(f"nothing to evaluate: {num_steps} checkpoint(s) "
               f"{'all evaluated' if num_steps else 'yet'}; "
               f"looking for new ones every {opts['poll_seconds']:g}s")
        waiting = True
        time.sleep(opts["poll_seconds"])
  finally:
    writer.close()
    checkpointer.close()


if __name__ == "__main__":
  run_main(main)
