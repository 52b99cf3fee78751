"""The U-ViT of simple diffusion (Sec. 3.5, Fig. 7, appendix B.2 / B.2.1), in flax linen.

Linen because parameters, optimizer state and EMA are plain pytrees that jit, shard and
checkpoint directly, and nn.scan + nn.remat stack the 36 transformer blocks into one compiled body.

Following the pseudo-code ``uvit(x, logsnr)`` of B.2.1:
* PatchIn (EmbedInput) to ch_0 = base_channels * channel_multiplier[0].
* Down path: for level i (len(num_res_blocks) levels), num_res_blocks[i] ResBlocks at
  ch_i, each output kept as a skip; then downsample to ch_{i+1}. channel_multiplier therefore has
  one more entry than num_res_blocks: its last entry is the transformer's width (16 -> 2048).
* Transformer: flatten to tokens, add a learned position embedding (normal(0.01)), then
  num_transformer_blocks transformer blocks (MLP block then self-attention, [then cross-attention
  on text]) with residual connections only — no skips (B.2). Stacked with nn.scan. Each MLP block
  has its own scale/shift projection (the literal B.2.1 reading, 2.47B parameters at paper size);
  ``shared_modulation=True`` shares one projection across the stack (1.89B).
* Up path, bottom level first: upsample to ch_i (the garbled ``channel_multiplier[i_level 1]``
  of the listing read as channel_multiplier[i_level], NOTES.md item 4), then num_res_blocks[i]
  ResBlocks each merging one popped skip (so the up path has as many blocks as the down path, as
  in the listing).
* ProjectOutput (PatchOut) to the image channels, float32.

Text to image (Sec. 3.6 / 5.2; reading documented in gin/models/uvit_t2i.gin): text_channels > 0
projects the T5 embeddings once (LayerNorm, Dense) and adds cross-attention to every transformer
block. "We also replaced convolutional layers with self-attention at the 32 resolution feature
maps": conv levels whose resolution is in ``attn_resolutions`` use transformer blocks (MLP block
+ self-attention [+ cross-attention]) instead of ResBlocks, keeping the U-Net skip connections (the
skip enters the MLP block's normalised input like a ResBlock's, (LN(x) + LN(skip)) / sqrt 2), in
line with Sec. 3.5: MLP blocks replace convolutions where self-attention is used. Such a level has
no convolution to tell its tokens apart by position, so, as where the 16x16 tokens enter the
transformer, a learned position embedding (``down{i}_pos_emb``, [H*W, C], normal(0.01)) is added
where its down path starts; the up path's blocks get positions from its skips and from the
transformer's residual stream (the paper is silent; README choices table).
The text mask ([B, T] bool, True on real tokens) keeps padding out of the cross-attention, and
an all-False mask (the null text of guidance) removes the cross-attention update (transformer.py).
portrait_conditioning=True adds the 'portrait mode' flag of the 384x640 model (Sec. 5) to the
conditioning vector (conditioning.py). Feature maps may be non-square (H x W, e.g. 384x640 -> 24x40
tokens at the transformer after dwt_1 and three downsamplings).
Dropout: ResBlocks / MLP blocks at resolutions <= dropout_from_resolution use ``dropout``; the
middle transformer uses ``transformer_dropout`` (B.2: 0.2).
Memory (not maths): ``remat=True`` recomputes every block's activations in the backward pass;
``remat_policy`` ('none' | 'minimal' | 'full', transformer.py) sets what the transformer blocks
keep, whatever ``remat`` says of the ResBlocks (None: 'full' with remat, else 'none').
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from core.errors import UserError
from core.models.conditioning import Conditioning, TextProjection
from core.models.layers import Downsample, ResBlock, Upsample, compute_dtype, dropout_rate
from core.models.patching import PatchIn, PatchOut
from core.models.transformer import TransformerBlock, TransformerStack, rematerialised
from core.models.validate import level_resolutions, validate


class SpatialTransformerBlock(nn.Module):
  """A TransformerBlock applied to a feature map [B, H, W, C] (tokens = H*W), optional skip."""
  num_heads: int
  dropout: float = 0.0
  cross_attention: bool = False
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, emb, text=None, skip=None, text_mask=None):
    b, h, w, c = x.shape
    tok = lambda a: None if a is None else a.reshape(b, h * w, a.shape[-1])
    block = TransformerBlock(self.num_heads, self.dropout, self.cross_attention,
                             self.deterministic, self.dtype, self.attention_impl, name="block")
    t = block(tok(x), emb, text, tok(skip), None, text_mask)
    return t.reshape(b, h, w, c)


@gin.configurable("UViT")
class UViT(nn.Module):
  """U-ViT (B.2). Call: (z, logsnr, label=None, text_emb=None, train=False, text_mask=None,
  portrait=None) -> v, float32."""
  base_channels: int = 128
  emb_channels: int = 1024
  channel_multiplier: Sequence[int] = (1, 2, 4, 16)
  num_res_blocks: Sequence[int] = (2, 2, 2)
  num_transformer_blocks: int = 36
  num_heads: int = 4
  transformer_dropout: float = 0.2
  dropout: float = 0.0
  dropout_from_resolution: int | None = None
  attn_resolutions: Sequence[int] = ()
  patching_type: str = "none"
  num_classes: int = 0
  text_channels: int = 0
  logsnr_input_type: str = "linear"
  logsnr_range: Sequence[float] = (-15.0, 15.0)
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str | None = None
  scan: bool = True
  attention_impl: str = "auto"
  upsample_impl: str = "auto"
  shared_modulation: bool = False
  portrait_conditioning: bool = False

  @nn.compact
  def __call__(self, z: jax.Array, logsnr: jax.Array, label: jax.Array | None = None,
               text_emb: jax.Array | None = None, train: bool = False,
               text_mask: jax.Array | None = None, portrait: jax.Array | None = None) -> jax.Array:
    if z.ndim != 4:
      raise UserError(f"UViT input must be NHWC [B, H, W, C], got shape {z.shape}")
    validate(self, z.shape[1:3], z.shape[-1])
    dt = compute_dtype(self.dtype)
    b = z.shape[0]
    res = level_resolutions(self, z.shape[1:3])
    widths = [self.base_channels * m for m in self.channel_multiplier]
    attn = set(int(r) for r in self.attn_resolutions)
    det = not train
    cross = self.text_channels > 0
    if cross and text_emb is None:
      raise UserError("UViT.text_channels > 0 (text cross-attention) but text_emb is None; "
                      "pass text_emb=[B, T, D] (e.g. T5-XXL, D=4096)")

    cond = Conditioning(self.emb_channels, self.base_channels, self.logsnr_input_type,
                        tuple(self.logsnr_range), self.num_classes, dt,
                        self.portrait_conditioning, name="cond")
    emb = cond(logsnr, label, b, portrait)
    text = (TextProjection(self.text_channels, dt, name="text_proj")(text_emb.astype(dt))
            if cross else None)
    policy = self.remat_policy or ("full" if self.remat else "none")
    res_cls = nn.remat(ResBlock) if self.remat else ResBlock
    tf_cls = rematerialised(SpatialTransformerBlock, policy)

    def block(i, name, h, skip=None):
      rate = dropout_rate(res[i], self.dropout, self.dropout_from_resolution)
      if res[i] in attn:
        return tf_cls(self.num_heads, rate, cross, det, dt, self.attention_impl, name=name)(
            h, emb, text, skip, text_mask if cross else None)
      return res_cls(widths[i], rate, det, dt, name=name)(h, emb, skip)

    def add_positions(name, h):
      """h + a learned position embedding [H*W, C] (normal(0.01)), as at the transformer."""
      _, hh, ww, c = h.shape
      pos = self.param(name, nn.initializers.normal(0.01), (hh * ww, c), jnp.float32)
      return h + pos.astype(dt).reshape(1, hh, ww, c)

    h = PatchIn(self.patching_type, widths[0], dt, name="patch_in")(z.astype(dt))
    levels = len(self.num_res_blocks)
    hs = []
    for i in range(levels):
      if res[i] in attn and self.num_res_blocks[i]:
        h = add_positions(f"down{i}_pos_emb", h)
      for j in range(self.num_res_blocks[i]):
        h = block(i, f"down{i}_block{j}", h)
        hs.append(h)
      h = Downsample(widths[i + 1], dt, name=f"down{i}_resample")(h)

    h = add_positions("pos_emb", h)
    _, th, tw, tc = h.shape
    tokens = h.reshape(b, th * tw, tc)
    tokens = TransformerStack(self.num_transformer_blocks, self.num_heads,
                              self.transformer_dropout, cross, det, dt, self.attention_impl,
                              scan=self.scan, remat_policy=policy,
                              shared_modulation=self.shared_modulation, name="transformer")(
                                  tokens, emb, text, text_mask if cross else None)
    h = tokens.reshape(b, th, tw, tc)

    for i in reversed(range(levels)):
      h = Upsample(widths[i], dt, self.upsample_impl, name=f"up{i}_resample")(h)
      for j in range(self.num_res_blocks[i]):
        h = block(i, f"up{i}_block{j}", h, skip=hs.pop())
    assert not hs
    return PatchOut(self.patching_type, z.shape[-1], dt, name="patch_out")(h)
