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
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import checkpoint as ckpt_lib
from core import cli
from core import diffusion
from core import trainer
from core.data import pipeline
from core.errors import UserError, run_main
from core.io import storage
from eval import sample

LOGSNRS = (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0)

OPTIONS = [
    cli.Option("workdir", None, "the run directory (class-conditional or unconditional runs)"),
    cli.Option("step", None, "checkpoint step (default: the newest)", parse=int),
    cli.Option("logsnrs", list(LOGSNRS),
               "comma-separated logSNR values to test", parse=cli.parse_floats),
    cli.Option("split", "eval", "held-out images from this split of the run's data set"),
    cli.Option("num_images", 256, "images (the first of the split)", parse=int),
    cli.Option("seed", 0, "noise seed", parse=int),
    cli.Option("out", None, "JSON path (default <workdir>/eval/denoise_<step>.json)"),
]


def denoise_errors(v_fn: Callable, x, logsnrs: Sequence[float], rng: jax.Array
                   ) -> list[dict[str, float]]:
  """Per logSNR: the MSE of the model's x_hat, of alpha z and of the mean image of ``x``.

  v_fn(z [B,H,W,C], logsnr [B]) -> v_hat; x in [-1, 1], shape [B,H,W,C]; the same noise eps is
  used at every level, so rows differ by the noise level only."""
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
  return rows


def run_denoise(run_dir: str, *, step: int | None = None, logsnrs: Sequence[float] = LOGSNRS,
                split: str = "eval", num_images: int = 256, seed: int = 0
                ) -> tuple[int, list[dict[str, float]]]:
  """(the step evaluated, :func:`denoise_errors` of its EMA parameters on ``split``)."""
  run = sample.load_run(run_dir)
  if sample.is_text_to_image(run):
    raise UserError(f"{run_dir} is a text-to-image run; eval.denoise covers class-conditional "
                    f"and unconditional runs (use eval.caption_grid for text)")
  c = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  steps = c.all_steps()
  c.close()
  step = steps[-1] if step is None and steps else step
  if step is None:
    raise UserError(f"no complete checkpoint in {run_dir} yet; train it first")
  params = sample.restore_ema_params(run, step)
  data_dir, _ = trainer.resolve_data_dir(run.cfg)
  images, labels = pipeline.load_split(data_dir, split, limit=num_images)
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  label = jnp.asarray(labels, jnp.int32) if run.num_classes else None

  @jax.jit
  def v_fn(z, logsnr):
    return run.model.apply({"params": params}, z, logsnr, label=label, train=False)

  return step, denoise_errors(v_fn, x, logsnrs, jax.random.key(seed))


def format_rows(rows: Sequence[dict[str, float]]) -> str:
  lines = [f"{'logSNR':>7}  {'model':>8}  {'alpha z':>8}  {'data mean':>9}  verdict"]
  for r in rows:
    best = min(r["mse_alpha_z"], r["mse_data_mean"])
    verdict = "beats both baselines" if r["mse_model"] < best else "loses to a baseline"
    lines.append(f"{r['logsnr']:7g}  {r['mse_model']:8.4f}  {r['mse_alpha_z']:8.4f}  "
                 f"{r['mse_data_mean']:9.4f}  {verdict}")
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
