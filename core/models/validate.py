"""Build-time checks of a model configuration: one-line UserErrors that name the setting.

``validate(model, image_size)`` is called by make_model (when the image size is known) and again
at the top of UNet/UViT.__call__, so a bad configuration fails at ``model.init`` with a message
instead of a shape error deep inside XLA.
"""
from __future__ import annotations

from typing import Any, Sequence

from core.errors import UserError
from core.models.conditioning import LOGSNR_INPUT_TYPES
from core.models.layers import UPSAMPLE_IMPLS, compute_dtype
from core.models.patching import parse_patching
from core.models.transformer import ATTENTION_IMPLS, REMAT_POLICIES


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  """An int (square) or (height, width) -> (height, width)."""
  if isinstance(image_size, int):
    return image_size, image_size
  hw = tuple(int(v) for v in image_size)
  if len(hw) != 2:
    raise UserError(f"image_size must be an int or (height, width), got {image_size!r}")
  return hw  # type: ignore[return-value]


def level_resolutions(model: Any, image_size: int | Sequence[int]) -> list[int]:
  """Feature-map resolution (the shorter side) of each level after patching, top to bottom.

  For the UViT the list ends with the transformer's resolution (one more than its conv levels).
  """
  h, w = image_hw(image_size)
  f = parse_patching(model.patching_type).factor
  n = len(model.channel_multiplier)
  return [min(h, w) // f // 2 ** i for i in range(n)]


def _ints(name: str, values: Any, minimum: int) -> list[int]:
  try:
    vals = [int(v) for v in values]
  except (TypeError, ValueError):
    raise UserError(f"{name} must be a list of integers, got {values!r}") from None
  if any(v < minimum for v in vals) or any(int(v) != v for v in values):
    raise UserError(f"{name}={list(values)} must hold integers >= {minimum}")
  return vals


def validate(model: Any, image_size: int | Sequence[int], image_channels: int = 3) -> None:
  """Raises UserError naming the setting if ``model`` cannot run on images of ``image_size``."""
  arch = type(model).__name__
  is_uvit = hasattr(model, "num_transformer_blocks")
  p = parse_patching(model.patching_type)
  compute_dtype(model.dtype)
  if model.logsnr_input_type not in LOGSNR_INPUT_TYPES:
    raise UserError(f"{arch}.logsnr_input_type={model.logsnr_input_type!r} is unknown; use one "
                    f"of {', '.join(LOGSNR_INPUT_TYPES)}")
  if model.attention_impl not in ATTENTION_IMPLS:
    raise UserError(f"{arch}.attention_impl={model.attention_impl!r} is unknown; use one of "
                    f"{', '.join(ATTENTION_IMPLS)}")
  policy = getattr(model, "remat_policy", None)
  if policy is not None and policy not in REMAT_POLICIES:
    raise UserError(f"{arch}.remat_policy={policy!r} is unknown; use one of "
                    f"{', '.join(REMAT_POLICIES)} (or None: 'full' if remat else 'none')")
  if getattr(model, "upsample_impl", "auto") not in UPSAMPLE_IMPLS:
    raise UserError(f"{arch}.upsample_impl={model.upsample_impl!r} is unknown; use one of "
                    f"{', '.join(UPSAMPLE_IMPLS)}")
  lo, hi = (float(v) for v in model.logsnr_range)
  if not lo < hi:
    raise UserError(f"{arch}.logsnr_range={tuple(model.logsnr_range)} must be (min, max) with "
                    "min < max")
  if model.base_channels < 1 or model.emb_channels < 1:
    raise UserError(f"{arch}.base_channels and {arch}.emb_channels must be >= 1")
  if model.num_classes < 0:
    raise UserError(f"{arch}.num_classes={model.num_classes} must be >= 0 (0 = unconditional)")
  if not 0.0 <= model.dropout < 1.0:
    raise UserError(f"{arch}.dropout={model.dropout} must be in [0, 1)")
  mult = _ints(f"{arch}.channel_multiplier", model.channel_multiplier, 1)
  blocks = _ints(f"{arch}.num_res_blocks", model.num_res_blocks, 0)
  want = len(blocks) + 1 if is_uvit else len(blocks)
  if len(mult) != want or not blocks:
    extra = (" (one entry per conv level plus one for the transformer)" if is_uvit
             else " (one entry per level)")
    raise UserError(f"{arch}.channel_multiplier has {len(mult)} entries and "
                    f"{arch}.num_res_blocks has {len(blocks)}; channel_multiplier needs "
                    f"{want}{extra}")
  h, w = image_hw(image_size)
  downsamples = len(mult) - 1
  factor = p.factor * 2 ** downsamples
  if h % factor or w % factor or h < factor or w < factor:
    raise UserError(
        f"image size {h}x{w} is not divisible by {factor} = patching ({model.patching_type!r}: "
        f"{p.factor}) x 2^{downsamples} (len({arch}.channel_multiplier) - 1 downsamplings); "
        "change the image size, patching_type or the number of levels")
  res = level_resolutions(model, (h, w))
  widths = [model.base_channels * m for m in mult]
  if model.attn_resolutions:
    attn = _ints(f"{arch}.attn_resolutions", model.attn_resolutions, 1)
    conv_levels = res[:-1] if is_uvit else res
    for r in attn:
      if r not in conv_levels:
        raise UserError(f"{arch}.attn_resolutions contains {r}, but the "
                        f"{'conv ' if is_uvit else ''}levels are at resolutions {conv_levels} "
                        f"for {h}x{w} images with patching_type={model.patching_type!r}")
      ch = widths[res.index(r)]
      if ch % model.num_heads:
        raise UserError(f"{arch}.num_heads={model.num_heads} does not divide the {ch} channels "
                        f"of the attention level at resolution {r}")
  if not is_uvit and getattr(model, "middle_block", False) and widths[-1] % model.num_heads:
    raise UserError(f"{arch}.num_heads={model.num_heads} does not divide the {widths[-1]} "
                    "channels of the middle block's attention (or set UNet.middle_block=False)")
  if is_uvit:
    ch = widths[-1]
    if model.num_transformer_blocks < 0:
      raise UserError(f"{arch}.num_transformer_blocks must be >= 0")
    if ch % model.num_heads:
      raise UserError(f"{arch}.num_heads={model.num_heads} does not divide the {ch} channels of "
                      "the transformer (base_channels * channel_multiplier[-1])")
    if not 0.0 <= model.transformer_dropout < 1.0:
      raise UserError(f"{arch}.transformer_dropout={model.transformer_dropout} must be in [0, 1)")
    if model.text_channels < 0:
      raise UserError(f"{arch}.text_channels must be >= 0 (0 = no text cross-attention)")
  if image_channels < 1:
    raise UserError(f"images need >= 1 channel, got {image_channels}")
