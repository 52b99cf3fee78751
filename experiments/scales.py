"""Scales: the same table row at paper size, as a CPU demo, or as a smoke test.

A scale is a gin layer over the row's paper configuration: ``gin/scales/<scale>.gin`` (fixed
settings: steps, batch, channel widths, evaluation size) plus bindings computed from the row's own
paper values so that each row keeps its relative meaning. Every resolution-valued setting is divided
by the same factor as the image size (the paper's 128x128 becomes 16x16 at factor 8): the schedule's
``image_d`` and ``noise_d`` (so the ratio image_d / noise_d, hence the shift, is the paper's), the
dropout start, the attention resolutions and the multiscale loss base, for both networks. Block
counts: the row's total number of (down-path) residual blocks is divided by the scale's divisor
(per architecture) and apportioned to the levels in proportion to the paper's counts (largest
remainder, at least one a level, :func:`scaled_blocks`), so Table 5's "total number of blocks is
kept the same" across None / DWT-1 / DWT-2 holds at every scale and Table 4's 2 < 4 < 8 < 12
blocks at 16x16 stay strictly increasing. A row evaluated at a fraction of its run (Table 3's
"no dropout", 700K of 1.5M) is the checkpoint at that fraction of the scale's steps
(:func:`snapshot_step`). Both layers are ordinary gin bindings and so appear in the run's
operative ``config.gin``.
"""
from __future__ import annotations

import math

from core import config as config_lib
from core.data import emoji
from core.models.patching import parse_patching
from experiments import registry

SCALES = ("paper", "demo", "smoke")
# Image size divisor per scale: the paper's U-Nets reach 8x8 at their lowest level, so 8 is the
# largest factor that keeps every level of every configuration at least 1x1.
FACTOR = {"paper": 1, "demo": 8, "smoke": 8}
# Divisor of a row's total residual blocks (then apportioned to levels, see scaled_blocks). 3 is
# the largest that keeps Table 4's four rows distinct at the 16x16 level (1, 2, 3, 4).
# The demo U-Net uses it too: a CPU step's time is mostly per-op overhead, so it goes with the
# number of blocks. Measured on Table 2's 128x128 demo rows (2 cores, 2,000 steps at batch 32):
# divisor 2 (0.87M parameters, [2, 2, 2, 6, 2]) ran 6.5 steps/s alone after a 60-70 s compile;
# divisor 3 (0.70M, [1, 1, 1, 4, 2]) 10.3 steps/s after 44 s; in `make demo` (two rows side by
# side, Inception beside them) they trained in 9:37-10:00 against 11:52, with KID train x1000
# 84.1 +- 2.2 / 93.8 +- 1.8 (original / shifted to 32, n=500) against 75.0 +- 2.0 / 99.4 +- 1.8
# and 77.7 +- 2.1 / 93.7 +- 1.8: the shifted row the same, the original row a few spreads worse,
# for 1.5x faster steps.
# The demo U-ViT keeps the paper's blocks: its up path has num_res_blocks blocks a level (the
# U-Net's has one more), and at one a level (2 // 2) it denoised worse at logSNR 0 than at -2.
BLOCK_DIVISOR = {"paper": {"unet": 1, "uvit": 1}, "demo": {"unet": 3, "uvit": 1},
                 "smoke": {"unet": 3, "uvit": 3}}
TRANSFORMER_BLOCKS = {"demo": 4, "smoke": 1}
# Demo widths: channel multipliers capped (every level and block is kept).
# * U-Net, at 2: so the 1x1-4x4 levels do not hold most of the parameters, whose Adam and EMA
#   updates dominated a CPU step.
# * U-ViT, at 4: the paper's 16 makes the transformer 16x the base width. At the demo's learning
#   rate, Adam moves every weight of its zero-initialised 1024-wide output projections at once:
#   after 300 demo steps its output is 24x its input, and the stream entering the output layer
#   has a std of 66. The skips, which carry the detail, enter each up block through a normalised
#   branch of order 1, so they are drowned, and the model does not denoise at logSNR > 0 (README,
#   "The demo U-ViT"). Capped at 4 (the transformer as wide as the last conv level) it does, and
#   it trains faster.
CHANNEL_MULTIPLIER_CAP = {"demo": {"unet": 2, "uvit": 4}}
# Text-to-image rows: width of the projected text embeddings (the paper's 1024 with 2048-wide
# transformer blocks); unconditional on class (the demo and smoke layers make the U-ViT
# class-conditional for the emoji categories).
TEXT_CHANNELS = {"demo": 64, "smoke": 16}


def _q(name: str, default=None):
  return config_lib.query(name, default)


def _fmt(v) -> str:
  return repr(v) if not isinstance(v, (list, tuple)) else "[" + ", ".join(repr(x) for x in v) + "]"


def scaled_blocks(blocks, divisor: int) -> list[int]:
  """Per-level blocks at a scale: total ceil(sum / divisor) (at least one a level), apportioned
  in proportion to ``blocks`` by largest remainder (ties to the deeper level)."""
  blocks = [int(b) for b in blocks]
  total, levels = sum(blocks), len(blocks)
  if divisor == 1 or total == 0:
    return blocks
  target = max(levels, math.ceil(total / divisor))
  quota = [b * target / total for b in blocks]
  out = [max(1, math.floor(q)) for q in quota]
  while sum(out) < target:
    out[max(range(levels), key=lambda i: (quota[i] - out[i], i))] += 1
  while sum(out) > target:
    out[min((i for i in range(levels) if out[i] > 1), key=lambda i: (quota[i] - out[i], -i))] -= 1
  return out


def snapshot_step(job: registry.Job, scale: str) -> tuple[int, int] | None:
  """(step, of the run's steps) of a row evaluated at a snapshot (``Entry.eval_fraction``): the
  same fraction of the run at every scale (Table 3's "no dropout": 700,000 of 1,500,000 at paper
  scale, 933 of 2,000 at demo scale); None for a row evaluated at its run's last step."""
  if job.eval_fraction == 1.0:
    return None
  with config_lib.scratch():
    config_lib.parse(list(job.gin_files), list(job.bindings) + scale_bindings(
        job.gin_files, job.bindings, job.arch, job.resolution, scale) + list(job.overrides))
    steps = int(_q("Train.num_steps"))
  return max(1, round(steps * job.eval_fraction)), steps


def _whole_levels(arch: str, paper_size, f: int) -> tuple[list[str], int]:
  """H x W rows whose scaled size no longer divides into whole levels (384x640 / 8 = 48x80 with
  DWT-2 and three downsamplings needs multiples of 32) drop DWT levels until it does; returns the
  binding and by how much the feature maps grow (attention resolutions follow their level)."""
  if arch != "uvit" or not isinstance(paper_size, (list, tuple)):
    return [], 1
  h, w = int(paper_size[0]) // f, int(paper_size[1]) // f
  levels = parse_patching(_q("UViT.patching_type", "none")).levels
  down = 2 ** (len(_q("UViT.channel_multiplier", (1, 2))) - 1)
  start = levels
  while levels > 0 and (h % (2 ** levels * down) or w % (2 ** levels * down)):
    levels -= 1
  if levels == start:
    return [], 1
  patching = f"dwt_{levels}" if levels else "none"
  return [f"UViT.patching_type = '{patching}'"], 2 ** (start - levels)


def layer_bindings(scale: str) -> list[str]:
  """The fixed part of a scale: the bindings of ``gin/scales/<scale>.gin``, in order."""
  text = open(config_lib.resolve_gin_file(f"scales/{scale}.gin")).read()
  lines = [l.split("#", 1)[0].strip() for l in text.splitlines()]
  return [l for l in lines if l]


def scale_bindings(gin_files, bindings, arch: str, resolution: int, scale: str) -> list[str]:
  """Bindings that turn the paper configuration of a row into the same row at ``scale``.

  They come after the row's own bindings, so the scale layer wins over paper-scale values that a
  row sets (e.g. the 1.5M steps of the 128x128 U-Net).
  """
  if scale == "paper":
    return []
  with config_lib.scratch():
    return _scaled(gin_files, bindings, arch, resolution, scale)


def _scaled(gin_files, bindings, arch: str, resolution: int, scale: str) -> list[str]:
  f = FACTOR[scale]
  layer = layer_bindings(scale)
  config_lib.parse(list(gin_files), list(bindings) + layer)
  size = _q("Train.image_size", resolution)
  size = (f"({int(size[0]) // f}, {int(size[1]) // f})" if isinstance(size, (list, tuple))
          else str(resolution // f))   # H x W rows (384x640) keep their aspect ratio
  out = layer + [f"Train.image_size = {size}", f"model.image_size = {size}"]
  whole, grow = _whole_levels(arch, _q("Train.image_size", resolution), f)
  out += whole
  name = _q("schedule.name", "cosine")
  for key in ("image_d", "noise_d", "noise_d_low", "noise_d_high"):
    v = _q(f"schedule.{key}")
    if v is not None:
      out.append(f"schedule.{key} = {max(1, int(v) // f)}")
  if name == "cosine":
    # The unshifted schedule is the shift with noise_d = image_d: nothing to rescale.
    pass
  if _q("diffusion_loss.multiscale", False):
    out.append(f"diffusion_loss.multiscale_base = "
               f"{max(1, int(_q('diffusion_loss.multiscale_base', 32)) // f)}")
  cls = "UNet" if arch == "unet" else "UViT"
  blocks = _q(f"{cls}.num_res_blocks")
  if blocks is not None:
    divisor = BLOCK_DIVISOR[scale][arch]
    out.append(f"{cls}.num_res_blocks = {_fmt(scaled_blocks(blocks, divisor))}")
  mult = _q(f"{cls}.channel_multiplier")
  if mult is not None and scale in CHANNEL_MULTIPLIER_CAP:
    cap = CHANNEL_MULTIPLIER_CAP[scale][arch]
    out.append(f"{cls}.channel_multiplier = {_fmt([min(m, cap) for m in mult])}")
  attn = _q(f"{cls}.attn_resolutions")
  if attn:
    out.append(f"{cls}.attn_resolutions = {_fmt(sorted({max(1, a // f) * grow for a in attn}))}")
  drop = _q(f"{cls}.dropout_from_resolution")
  if drop is not None:
    out.append(f"{cls}.dropout_from_resolution = {max(1, int(drop) // f)}")
  if arch != "unet":
    out.append(f"UViT.num_transformer_blocks = {TRANSFORMER_BLOCKS[scale]}")
    if _q("UViT.text_channels", 0):
      # The captioned emoji set and its demo encoder (core.data.emoji): 24 tokens of width 64.
      out += [f"UViT.text_channels = {TEXT_CHANNELS[scale]}", "UViT.num_classes = 0",
              f"Train.text_len = {emoji.EMOJI_MAX_LEN}",
              f"Train.text_dim = {emoji.EMOJI_ENCODER['d_model']}"]
  return out
