"""``python -m eval.caption_grid``: the same seeds under different captions (text to image).

    python -m eval.caption_grid workdir=<run dir> captions="grinning face|red apple|flag: japan"

Samples ``seeds`` images per caption from a text-to-image run's EMA parameters, every caption
starting from the same noise (sample i of every row uses noise fold_in(seed, 0)[i]), and writes
one PNG: a row per caption, labelled. Captions are embedded with the text encoder the run's data
set was prepared with (its meta.json). It also prints how much the samples move with the caption:
the mean absolute pixel difference (0-255) between each caption's row and the first caption's,
beside the same for a second sampling of the first caption (exactly 0: sampling is deterministic).
"""
from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np

from core import cli
from core import trainer
from core.data import records, text_encoder
from core.errors import UserError, run_main
from core.io import storage
from eval import sample

OPTIONS = [
    cli.Option("workdir", None, "the text-to-image run directory"),
    cli.Option("captions", None, "captions separated by '|'"),
    cli.Option("seeds", 8, "samples per caption (the same noise in every row)", parse=int),
    cli.Option("seed", 0, "sampling seed", parse=int),
    cli.Option("step", None, "checkpoint step (default: the newest)", parse=int),
    cli.Option("sampler_steps", 64, "DDPM steps", parse=int),
    cli.Option("guidance", 1.0, "guidance scale", parse=float),
    cli.Option("noise_param", 1.0, "variance interpolation (appendix A; 1.0 for COCO)",
               parse=float),
    cli.Option("out", None, "PNG path (default <workdir>/eval/caption_grid.png)"),
]


def caption_grid(run_dir: str, captions: Sequence[str], *, seeds: int = 8, seed: int = 0,
                 step: int | None = None, sampler_steps: int = 64, guidance: float = 1.0,
                 noise_param: float = 1.0) -> tuple[np.ndarray, dict]:
  """uint8 [len(captions), seeds, H, W, 3] samples and the caption-vs-seed distances."""
  run = sample.load_run(run_dir)
  if not sample.is_text_to_image(run):
    raise UserError(f"{run_dir} is not a text-to-image run (its model has no text_channels)")
  data_dir, _ = trainer.resolve_data_dir(run.cfg, text=True)
  text = records.read_meta(data_dir).get("text")
  if not text:
    raise UserError(f"{data_dir}/meta.json names no text encoder; prepare it with text_encoder=")
  emb, mask = text_encoder.TextEncoder(text["encoder"], int(text["max_len"])).encode(captions)
  step = sample.checkpoint_step(run_dir, step)
  params = sample.restore_ema_params(run, step)
  rows = []
  for i in list(range(len(captions))) + [0]:
    cond = {"text_emb": np.repeat(emb[i:i + 1], seeds, 0),
            "text_mask": np.repeat(mask[i:i + 1], seeds, 0)}
    rows.append(sample.sample_images(run, params, num_samples=seeds, batch_size=seeds,
                                     num_steps=sampler_steps, noise_param=noise_param,
                                     guidance=guidance, seed=seed, conditions=cond, progress=False))
  grid = np.stack(rows[:-1])
  diff = lambda a, b: float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
  stats = {"step": step, "same_caption_again": diff(rows[-1], rows[0]),
           "vs_first_caption": {captions[i]: diff(rows[i], rows[0])
                                for i in range(1, len(captions))}}
  return grid, stats


def save_grid(grid: np.ndarray, captions: Sequence[str], path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n, k = grid.shape[:2]
  fig, axes = plt.subplots(n, 1, figsize=(1.0 * k + 2, 1.1 * n + 0.3), squeeze=False)
  for ax, row, cap in zip(axes[:, 0], grid, captions):
    ax.imshow(np.concatenate(list(row), axis=1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(cap, rotation=0, ha="right", va="center", fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())
  return path


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="eval.caption_grid",
                             description=__doc__.split("\n\n")[0])
  if bindings:
    raise UserError(f"eval.caption_grid takes no gin bindings (got {bindings[0]!r})")
  if not opts["workdir"] or not opts["captions"]:
    raise UserError('give workdir=<run directory> and captions="first caption|second caption"')
  captions = [c.strip() for c in opts["captions"].split("|") if c.strip()]
  grid, stats = caption_grid(opts["workdir"], captions, seeds=opts["seeds"], seed=opts["seed"],
                             step=opts["step"], sampler_steps=opts["sampler_steps"],
                             guidance=opts["guidance"], noise_param=opts["noise_param"])
  out = opts["out"] or storage.join(opts["workdir"], "eval", "caption_grid.png")
  print(save_grid(grid, captions, out))
  print(json.dumps(stats, indent=1))
  return 0


if __name__ == "__main__":
  run_main(main)
