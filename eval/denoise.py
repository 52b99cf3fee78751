"""``python -m eval.denoise``: how well a run's model denoises, noise level by noise level.

    python -m eval.denoise workdir=<run dir> [step=] [logsnrs=-10,-5,-2,0,2,5,10]

Sample quality is decided one noise level at a time: the sampler's first steps (low logSNR) set
the layout, its last ones (high logSNR) the detail. For held-out images x of the run's data set,
this diffuses z = alpha x + sigma eps at each fixed logSNR (Eq. 1; VP, alpha^2 = sigmoid(logSNR)),
asks the EMA model for v and turns it into x_hat = alpha z - sigma v (appendix A), and prints the
mean squared error of x_hat (pixels in [-1, 1]) beside two baselines that need no learning: the
rescaled input alpha z (no denoising), and the data set's mean image (the best constant: a model
must beat it at low logSNR, where the input carries almost no information). A row where the
model loses to a baseline names the noise levels that still need training; the eps-MSE loss
weights x-errors by the SNR (section 3.2), so on short runs the low-logSNR rows learn last.

Conditional runs (a class, or a caption for text to image) are also asked with each image's
condition swapped for the next image's, and with the null condition that classifier-free guidance
trains (the null class; zero text embeddings with an all-False mask). A model that uses its
conditioning denoises better with the right one than with a swapped one, most visibly at low
logSNR: the measurable form of "the samples respond to the caption".
"""
from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import cli
from core import diffusion
from core import trainer
from core.data import pipeline, records
from core.errors import UserError, run_main
from core.io import storage
from eval import sample

LOGSNRS = (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0)

OPTIONS = [
    cli.Option("workdir", None, "the run directory (unconditional, class or text conditional)"),
    cli.Option("step", None, "checkpoint step (default: the newest)", parse=int),
    cli.Option("logsnrs", list(LOGSNRS),
               "comma-separated logSNR values to test", parse=cli.parse_floats),
    cli.Option("split", "eval", "held-out images from this split of the run's data set"),
    cli.Option("num_images", 256, "images (the first of the split)", parse=int),
    cli.Option("seed", 0, "noise seed", parse=int),
    cli.Option("out", None, "JSON path (default <workdir>/eval/denoise_<step>.json)"),
]


def denoise_errors(v_fn: Callable, x, logsnrs: Sequence[float], rng: jax.Array,
                   others: dict[str, Callable] | None = None) -> list[dict[str, float]]:
  """Per logSNR: the MSE of the model's x_hat, of alpha z and of the mean image of ``x``, and of
  each of ``others`` (name -> v_fn, e.g. the model with swapped conditions) as 'mse_<name>'.

  v_fn(z [B,H,W,C], logsnr [B]) -> v_hat; x in [-1, 1], shape [B,H,W,C]; the same noise eps is
  used at every level, so rows differ by the noise level only."""
  others = others or {}
  x = jnp.asarray(x, jnp.float32)
  eps = jax.random.normal(rng, x.shape, jnp.float32)
  mean_mse = float(jnp.mean((jnp.mean(x, axis=0, keepdims=True) - x) ** 2))
  rows = []
  for l in logsnrs:
    logsnr = jnp.full((x.shape[0],), float(l), jnp.float32)
    z = diffusion.diffuse(x, logsnr, eps)
    x_hat = diffusion.x_from_v(z, v_fn(z, logsnr), logsnr)
    alpha = float(jax.nn.sigmoid(float(l))) ** 0.5
    rows.append({"logsnr": float(l), "mse_model": float(jnp.mean((x_hat - x) ** 2)),
                 "mse_alpha_z": float(jnp.mean((alpha * z - x) ** 2)), "mse_data_mean": mean_mse})
    for name, fn in others.items():
      x_other = diffusion.x_from_v(z, fn(z, logsnr), logsnr)
      rows[-1][f"mse_{name}"] = float(jnp.mean((x_other - x) ** 2))
  return rows


def _first_caption(a: np.ndarray, ndim: int) -> np.ndarray:
  """A record's text embedding (or mask) for its first caption (records keep all captions)."""
  a = np.asarray(a)
  return a[0] if a.ndim > ndim else a


def conditions(run, data_dir: str, split: str, num_images: int
               ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
  """(uint8 images, {'model' | 'swapped' | 'null': model keyword arguments}) for the first
  ``num_images`` of ``split``: each image's own condition, the next image's, and the null one."""
  if not sample.is_text_to_image(run):
    images, labels = pipeline.load_split(data_dir, split, limit=num_images)
    if not run.num_classes:
      return images, {"model": {}}
    own = jnp.asarray(labels, jnp.int32)
    return images, {"model": {"label": own}, "swapped": {"label": jnp.roll(own, 1)},
                    "null": {"label": jnp.full_like(own, run.num_classes)}}
  names = [n for n in storage.listdir(data_dir) if n.startswith(f"{split}-")]
  recs = list(itertools.islice(records.split_records(data_dir, sorted(names)), num_images))
  if not recs:
    raise UserError(f"no {split} images in {data_dir}; choose split=train or split=eval")
  images = np.stack([r["image"] for r in recs])
  emb = jnp.asarray(np.stack([_first_caption(r["text_emb"], 2) for r in recs]), jnp.float32)
  mask = jnp.asarray(np.stack([_first_caption(r["text_mask"], 1) for r in recs]), bool)
  return images, {
      "model": {"text_emb": emb, "text_mask": mask},
      "swapped": {"text_emb": jnp.roll(emb, 1, 0), "text_mask": jnp.roll(mask, 1, 0)},
      "null": {"text_emb": jnp.zeros_like(emb), "text_mask": jnp.zeros_like(mask)}}


def run_denoise(run_dir: str, *, step: int | None = None, logsnrs: Sequence[float] = LOGSNRS,
                split: str = "eval", num_images: int = 256, seed: int = 0
                ) -> tuple[int, list[dict[str, float]]]:
  """(the step evaluated, :func:`denoise_errors` of its EMA parameters on ``split``)."""
  run = sample.load_run(run_dir)
  step = sample.checkpoint_step(run_dir, step)
  params = sample.restore_ema_params(run, step)
  data_dir, _ = trainer.resolve_data_dir(run.cfg, text=sample.is_text_to_image(run))
  images, conds = conditions(run, data_dir, split, num_images)
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  apply = jax.jit(lambda z, logsnr, kw: run.model.apply({"params": params}, z, logsnr,
                                                        train=False, **kw))
  fns = {name: functools.partial(apply, kw=kw) for name, kw in conds.items()}
  model = fns.pop("model")
  return step, denoise_errors(model, x, logsnrs, jax.random.key(seed), others=fns)


def format_rows(rows: Sequence[dict[str, float]]) -> str:
  cond = [k for k in ("swapped", "null") if rows and f"mse_{k}" in rows[0]]
  lines = [f"{'logSNR':>7}  {'model':>8}  {'alpha z':>8}  {'data mean':>9}  "
           + "".join(f"{k:>8}  " for k in cond) + "verdict"]
  for r in rows:
    best = min(r["mse_alpha_z"], r["mse_data_mean"])
    verdict = "beats both baselines" if r["mse_model"] < best else "loses to a baseline"
    if "swapped" in cond and r["mse_swapped"] > 0:
      verdict += f"; own / swapped condition {r['mse_model'] / r['mse_swapped']:.2f}"
    lines.append(f"{r['logsnr']:7g}  {r['mse_model']:8.4f}  {r['mse_alpha_z']:8.4f}  "
                 f"{r['mse_data_mean']:9.4f}  " + "".join(f"{r['mse_' + k]:8.4f}  " for k in cond)
                 + verdict)
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="eval.denoise",
                             description=__doc__.split("\n\n")[0])
  if bindings:
    raise UserError(f"eval.denoise takes no gin bindings (got {bindings[0]!r})")
  if not opts["workdir"]:
    raise UserError("give workdir=<run dir>")
  step, rows = run_denoise(opts["workdir"], step=opts["step"], logsnrs=opts["logsnrs"],
                           split=opts["split"], num_images=opts["num_images"], seed=opts["seed"])
  print(f"x-prediction MSE of the EMA model at step {step} ({opts['num_images']} {opts['split']} "
        f"images, pixels in [-1, 1]):")
  print(format_rows(rows))
  out = opts["out"] or storage.join(opts["workdir"], "eval", f"denoise_{step}.json")
  storage.write_text(out, json.dumps({"step": step, "split": opts["split"],
                                      "num_images": opts["num_images"], "rows": rows}, indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  run_main(main)
