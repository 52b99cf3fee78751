"""Forward FLOPs per image of a UNet / UViT configuration, for model-FLOPs utilisation (MFU).

Counts 2 x multiply-accumulates of every convolution, dense layer and attention matmul (q k^T and
attention x v); normalisation, activations, the DWT and other elementwise work are not counted
(the usual MFU convention). A training step costs 3x the forward pass (forward + backward).
Counts are of the model's function, not of an implementation: up-sampling counts its nearest x2
then 3x3 conv (9 taps per output pixel) also where ``upsample_impl='transposed'`` computes the
same map with 4 (layers.Upsample; at the benchmark shape 3.7% of the forward FLOPs are not done).

The count is analytic (no JAX); tests/test_models_flops.py checks it against a count of the traced
jaxpr (tests/jaxpr_flops.py) and XLA's cost analysis.
"""
from __future__ import annotations

from typing import Any, Sequence

from core.models.patching import parse_patching
from core.models.validate import image_hw, validate


def _conv(h: int, w: int, k: int, cin: int, cout: int) -> float:
  return 2.0 * h * w * k * k * cin * cout


def _dense(tokens: int, cin: int, cout: int) -> float:
  return 2.0 * tokens * cin * cout


def _attention(tokens: int, c: int, ctx_tokens: int | None = None, ctx_dim: int | None = None
               ) -> float:
  s = tokens if ctx_tokens is None else ctx_tokens
  d = c if ctx_dim is None else ctx_dim
  proj = _dense(tokens, c, c) * 2 + _dense(s, d, c) * 2        # q, out; k, v
  return proj + 2.0 * 2.0 * tokens * s * c                      # q k^T and weights @ v


def _resblock(h: int, w: int, cin: int, cout: int, emb: int) -> float:
  f = _conv(h, w, 3, cin, cout) + _conv(h, w, 3, cout, cout) + _dense(1, emb, 2 * cout)
  if cin != cout:
    f += _dense(h * w, cin, cout)
  return f


def _mlp(tokens: int, c: int, emb: int, expansion: int = 4) -> float:
  return _dense(tokens, c, expansion * c) * 2 + _dense(1, emb, 2 * expansion * c)


def _transformer_block(tokens: int, c: int, emb: int, text: tuple[int, int] | None) -> float:
  f = _mlp(tokens, c, emb) + _attention(tokens, c)
  if text is not None:
    f += _attention(tokens, c, *text)
  return f


def forward_flops(model: Any, image_size: int | Sequence[int], image_channels: int = 3,
                  text_len: int = 0, text_dim: int = 0) -> float:
  """Forward FLOPs for one image (2 x MACs of convs, dense layers and attention matmuls)."""
  validate(model, image_size, image_channels)
  is_uvit = hasattr(model, "num_transformer_blocks")
  hh, ww = image_hw(image_size)
  p = parse_patching(model.patching_type)
  e = model.emb_channels
  widths = [model.base_channels * m for m in model.channel_multiplier]
  attn = set(int(r) for r in model.attn_resolutions)
  sizes = [(hh // p.factor // 2 ** i, ww // p.factor // 2 ** i) for i in range(len(widths))]
  res = [min(s) for s in sizes]

  total = _dense(1, model.base_channels, e) + _dense(1, e, e)      # logSNR MLP
  text = None
  if is_uvit and model.text_channels > 0:
    total += _dense(text_len, text_dim, model.text_channels)
    text = (text_len, model.text_channels)

  h0, w0 = sizes[0]
  if p.kind == "conv":
    total += _conv(h0, w0, p.size, image_channels, widths[0])       # k x k, stride k
    total += _conv(h0, w0, p.size, widths[0], image_channels)       # transposed, same shape
  else:
    total += _conv(h0, w0, 3, p.channels(image_channels), widths[0])
    total += _conv(h0, w0, 3, widths[0], p.channels(image_channels))

  def level_block(i: int) -> float:
    h, w = sizes[i]
    if res[i] in attn:
      if is_uvit:
        return _transformer_block(h * w, widths[i], e, text)
      return _resblock(h, w, widths[i], widths[i], e) + _attention(h * w, widths[i])
    return _resblock(h, w, widths[i], widths[i], e)

  blocks = list(model.num_res_blocks)
  levels = len(blocks)
  for i in range(levels):
    up_blocks = blocks[i] if is_uvit else blocks[i] + 1
    total += (blocks[i] + up_blocks) * level_block(i)
    if is_uvit or i < levels - 1:   # down- and upsampling between level i and i + 1
      (h, w), (h2, w2) = sizes[i], sizes[i + 1]
      total += _conv(h2, w2, 3, widths[i], widths[i + 1])           # avg-pool, conv
      total += _conv(h, w, 3, widths[i + 1], widths[i])             # nearest x2, conv
  if not is_uvit and getattr(model, "middle_block", False):   # ResBlock, attention, ResBlock
    h, w = sizes[-1]
    total += 2 * _resblock(h, w, widths[-1], widths[-1], e) + _attention(h * w, widths[-1])
  if is_uvit:
    th, tw = sizes[-1]
    total += model.num_transformer_blocks * _transformer_block(th * tw, widths[-1], e, text)
    if getattr(model, "shared_modulation", False) and model.num_transformer_blocks:
      # one scale/shift projection for the whole stack instead of one per block
      total -= (model.num_transformer_blocks - 1) * _dense(1, e, 8 * widths[-1])
  return float(total)
