"""The U-Net of simple diffusion (Sec. 3.3-3.4, appendix B.1), in flax linen.

Linen because parameters, optimizer state and EMA are plain pytrees that jit, shard and
checkpoint directly, and nn.remat rematerialises blocks.

Layout (choices where B.1 is silent are marked *, pinned by tests/test_models.py):
* PatchIn ('none' | 'dwt_L' | 'conv_k') to base_channels * channel_multiplier[0].
* Level i (resolution r_i = d / patch / 2^i, channels ch_i = base_channels * channel_multiplier[i]):
  down path: the level's input is kept as a skip*, then num_res_blocks[i] ResBlocks (each
  followed by self-attention if r_i is in attn_resolutions), each output kept as a skip; then
  Downsample to ch_{i+1} (not after the last level). So a level yields a+1 skips, all with ch_i
  channels, and the up path runs a+1 blocks ("a + (a+1)" blocks, Sec. 5.1 / Table 4).
* Up path, bottom level first: Upsample to ch_i (not at the bottom level), then
  num_res_blocks[i] + 1 ResBlocks each merging a popped skip as in B.2.1 ((GN(h) + GN(skip)) /
  sqrt 2, additive, not concatenation*), each followed by attention at attention levels.
* Middle block (``middle_block=True``, the default*): ResBlock, self-attention, ResBlock at the
  bottom level's resolution between the down and the up path, without skips, as in the authors'
  code lineage (google-research diffusion_distillation unet.py, and ADM / VDM before it). B.1 and
  Table 4 count the blocks of each level ("a+b"), which the lineage's num_res_blocks also counts
  without the middle block. ``middle_block=False`` drops it.
* Attention layers* (SpatialAttention) are the lineage's (ADM's AttentionBlock, the AttnBlock of
  diffusion_distillation unet.py): GroupNorm of the input, q, k, v projections without q / k
  normalisation, zero-initialised output projection, residual. The U-ViT's attention (B.2.1:
  LayerNorm without bias, LayerNorm on q and k) is the U-ViT's; B.1 does not describe the U-Net's.
* logSNR input: 'linear' over the (shifted) schedule's range by default* (conditioning.py).
* PatchOut: GroupNorm, swish, zero-init conv (transposed conv for conv patching), inverse DWT.
Dropout: ResBlocks at resolutions <= dropout_from_resolution use ``dropout`` (Sec. 3.4).
Compilation (not maths): ``scan_blocks=True`` runs each level's identical blocks as one nn.scan
(params['down3_blocks']['block'] stacked [n, ...] instead of params['down3_block<j>']),
so XLA compiles one block per level and path, not 56 (the paper configurations gin/models/unet_*
turn it on; the demo and smoke scales stay unrolled, which steps faster on the CPU).
Memory (not maths): ``remat=True`` recomputes every block in the backward pass; ``remat_policy``
('none' | 'minimal' | 'full', transformer.checkpoint_policy) sets what the blocks keep ('minimal':
convolution and projection outputs and dropout masks; None: 'full' with remat, else 'none').
Returns the v prediction in float32 (compute in ``dtype``, parameters in float32).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from core.errors import UserError
from core.models.conditioning import Conditioning
from core.models.layers import (Downsample, ResBlock, Upsample, compute_dtype, dropout_rate,
                                group_norm)
from core.models.patching import PatchIn, PatchOut
from core.models.transformer import Attention, rematerialised
from core.models.validate import level_resolutions, validate


class SpatialAttention(nn.Module):
  """x + attention(GroupNorm(x)) over the H*W positions of a feature map (the lineage's AttnBlock).

  GroupNorm (scale and bias, the ResBlocks' groups), then q, k, v projections without q / k
  normalisation, softmax(q k^T / sqrt(head_dim)) v, a zero-initialised output projection.
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = group_norm(c, self.dtype, name="norm")(x).reshape(b, h * w, c)
    t = Attention(self.num_heads, self.dtype, self.attention_impl, input_norm=False,
                  qk_norm=False, name="attn")(t)
    return x + t.reshape(b, h, w, c)


class _LevelBody(nn.Module):
  """One of a level's identical blocks, ResBlock [+ attention], as the body of an nn.scan
  (UNet.scan_blocks): (h, emb, skip) -> (h, h if keep else None)."""
  out_ch: int
  dropout: float
  deterministic: bool
  dtype: Any
  attention: bool
  num_heads: int
  attention_impl: str
  keep: bool

  @nn.compact
  def __call__(self, h, emb, skip):
    h = ResBlock(self.out_ch, self.dropout, self.deterministic, self.dtype, name="block")(
        h, emb, skip)
    if self.attention:
      h = SpatialAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(h)
    return h, (h if self.keep else None)


@gin.configurable("UNet")
class UNet(nn.Module):
  """Class-conditional U-Net (B.1). Call: (z, logsnr, label=None, text_emb=None, train=False)."""
  base_channels: int = 128
  emb_channels: int = 1024
  channel_multiplier: Sequence[int] = (1, 2, 4, 8, 8)
  num_res_blocks: Sequence[int] = (3, 4, 4, 12, 4)
  attn_resolutions: Sequence[int] = (8, 16)
  num_heads: int = 4
  dropout: float = 0.1
  dropout_from_resolution: int | None = 16
  patching_type: str = "none"
  num_classes: int = 0
  logsnr_input_type: str = "linear"
  logsnr_range: Sequence[float] = (-15.0, 15.0)
  dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"
  upsample_impl: str = "auto"
  middle_block: bool = True
  scan_blocks: bool = False
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array, logsnr: jax.Array, label: jax.Array | None = None,
               text_emb: jax.Array | None = None, train: bool = False) -> jax.Array:
    if z.ndim != 4:
      raise UserError(f"UNet input must be NHWC [B, H, W, C], got shape {z.shape}")
    if text_emb is not None:
      raise UserError("the UNet has no text cross-attention; use model.arch='uvit' with "
                      "UViT.text_channels > 0 for text-to-image")
    validate(self, z.shape[1:3], z.shape[-1])
    dt = compute_dtype(self.dtype)
    b = z.shape[0]
    res = level_resolutions(self, z.shape[1:3])
    widths = [self.base_channels * m for m in self.channel_multiplier]
    attn = set(int(r) for r in self.attn_resolutions)
    det = not train
    policy = self.remat_policy or ("full" if self.remat else "none")
    block_cls = rematerialised(ResBlock, policy)
    attn_cls = rematerialised(SpatialAttention, policy)

    cond = Conditioning(self.emb_channels, self.base_channels, self.logsnr_input_type,
                        tuple(self.logsnr_range), self.num_classes, dt, name="cond")
    emb = cond(logsnr, label, b)
    h = PatchIn(self.patching_type, widths[0], dt, name="patch_in")(z.astype(dt))

    def block(i, name, h, skip=None):
      rate = dropout_rate(res[i], self.dropout, self.dropout_from_resolution)
      h = block_cls(widths[i], rate, det, dt, name=name)(h, emb, skip)
      if res[i] in attn:
        h = attn_cls(self.num_heads, dt, self.attention_impl, name=name + "_attn")(h)
      return h

    def level(i, name, h, skips=None):
      """nn.scan over the level's blocks, parameters stacked: params[name]['block' | 'attn'].

      Down path: returns (h, [every block's output]); up path: block k merges skips[k]."""
      body = rematerialised(_LevelBody, policy, prevent_cse=False)
      scan = nn.scan(body, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, 0),
                     length=len(skips) if skips else self.num_res_blocks[i])
      rate = dropout_rate(res[i], self.dropout, self.dropout_from_resolution)
      h, ys = scan(widths[i], rate, det, dt, res[i] in attn, self.num_heads, self.attention_impl,
                   keep=skips is None, name=name)(h, emb, None if skips is None else
                                                  jnp.stack(skips))
      return h, ([] if ys is None else list(ys))

    n = len(widths)
    hs = []
    for i in range(n):
      hs.append(h)
      if self.scan_blocks and self.num_res_blocks[i]:
        h, outs = level(i, f"down{i}_blocks", h)
        hs.extend(outs)
      for j in range(0 if self.scan_blocks else self.num_res_blocks[i]):
        h = block(i, f"down{i}_block{j}", h)
        hs.append(h)
      if i < n - 1:
        h = Downsample(widths[i + 1], dt, name=f"down{i}_resample")(h)
    if self.middle_block:
      rate = dropout_rate(res[-1], self.dropout, self.dropout_from_resolution)
      h = block_cls(widths[-1], rate, det, dt, name="mid_block0")(h, emb)
      h = attn_cls(self.num_heads, dt, self.attention_impl, name="mid_attn")(h)
      h = block_cls(widths[-1], rate, det, dt, name="mid_block1")(h, emb)
    for i in reversed(range(n)):
      if i < n - 1:
        h = Upsample(widths[i], dt, self.upsample_impl, name=f"up{i}_resample")(h)
      if self.scan_blocks:
        skips = [hs.pop() for _ in range(self.num_res_blocks[i] + 1)]
        h, _ = level(i, f"up{i}_blocks", h, skips)
        continue
      for j in range(self.num_res_blocks[i] + 1):
        h = block(i, f"up{i}_block{j}", h, skip=hs.pop())
    assert not hs
    return PatchOut(self.patching_type, z.shape[-1], dt, name="patch_out")(h)
