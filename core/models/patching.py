"""Input/output "patching": the 5/3 wavelet transform (DWT) and strided-conv patching (Sec. 3.3).

To avoid high resolution feature maps the network down-samples the image as its very first step
and up-samples as its very last (paper Sec. 3.3, Table 5). Two ways:

* ``dwt_L``: L levels of the invertible, linear LeGall / CDF 5/3 wavelet of JPEG2000 (PyWavelets
  'bior2.2'), computed with the two lifting steps of JPEG2000 (ISO 15444-1 Annex F, reversible
  5/3 without the integer rounding)::

      predict  d[n] = x[2n+1] - (x[2n] + x[2n+2]) / 2
      update   s[n] = x[2n]   + (d[n-1] + d[n]) / 4

  Boundary handling: whole-sample symmetric extension (x[-1] = x[1], x[N] = x[N-2]), as JPEG2000
  prescribes; this is PyWavelets' mode='reflect'. Normalisation: JPEG2000's (low-pass DC gain 1,
  so the coarsest band looks like an average-pooled image). Relation to PyWavelets, per axis:
  ``s = cA / sqrt(2)`` and ``d = -sqrt(2) cD`` (PyWavelets' reflect mode also emits one extra
  boundary coefficient on each side, ``cA[1:1+N/2]`` are ours). In 2-D: LL = cA/2, LH = -cH,
  HL = -cV, HH = 2 cD. Pinned by tests/test_patching.py. The transform is exactly invertible
  (up to float rounding): the inverse undoes the two lifting steps in reverse order.

  Layout of L levels on the channel axis (Sec. 3.3, Fig. 6): the coarsest four subbands at
  d/2^L, ordered [LL, LH, HL, HH] (LH = detail along height, = PyWavelets' cH), each with the
  image's C channels, followed by the finer detail subbands [LH, HL, HH] of level L-1, ..., 1,
  each space-to-depth reshaped to d/2^L (block order (dy, dx, c)). Total C * 4^L channels.

* ``conv_k``: a k x k convolution with stride k as the first layer and an identically shaped
  transposed convolution as the last (ViT-style patching).

* ``none``: a 3 x 3 convolution in and out at full resolution.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core.errors import UserError
from core.models.layers import conv3x3, group_norm

PATCHING_HELP = ("'none', 'dwt_<L>' (also 'dwt_5/3_<L>', L >= 1 levels of the 5/3 wavelet) or "
                 "'conv_<k>' (k x k conv patching, k >= 2)")


@dataclasses.dataclass(frozen=True)
class Patching:
  """A parsed patching_type: kind in {'none', 'dwt', 'conv'} and the spatial reduction factor."""
  kind: str
  levels: int = 0   # DWT levels
  size: int = 1     # conv patch size

  @property
  def factor(self) -> int:
    """By how much height and width shrink: 2^levels for the DWT, k for conv patching."""
    if self.kind == "dwt":
      return 2 ** self.levels
    return self.size

  def channels(self, image_channels: int) -> int:
    """Channels of the patched input that the network's first layer sees."""
    if self.kind == "dwt":
      return image_channels * 4 ** self.levels
    return image_channels


def parse_patching(patching_type: str) -> Patching:
  """Parses 'none' | 'dwt_L' | 'dwt_5/3_L' | 'conv_k' (paper appendix B spelling accepted)."""
  s = str(patching_type).strip().lower()
  if s in ("none", ""):
    return Patching("none")
  m = re.fullmatch(r"dwt(?:_5/3)?_(\d+)", s)
  if m and int(m.group(1)) >= 1:
    return Patching("dwt", levels=int(m.group(1)))
  m = re.fullmatch(r"conv_(\d+)(?:x\d+)?", s)
  if m and int(m.group(1)) >= 2:
    return Patching("conv", size=int(m.group(1)))
  raise UserError(f"patching_type={patching_type!r} is unknown; use {PATCHING_HELP}")


# ---------------------------------------------------------------------------------------------
# 1-D lifting along one axis.

def _shift_next(a: jax.Array, axis: int) -> jax.Array:
  """a[n+1] with whole-sample symmetric extension at the end of the even samples (x[N]=x[N-2])."""
  n = a.shape[axis]
  tail = jax.lax.slice_in_dim(a, n - 1, n, axis=axis)
  return jnp.concatenate([jax.lax.slice_in_dim(a, 1, n, axis=axis), tail], axis=axis)


def _shift_prev(a: jax.Array, axis: int) -> jax.Array:
  """a[n-1] with symmetric extension at the start of the odd samples (d[-1] = d[0])."""
  n = a.shape[axis]
  head = jax.lax.slice_in_dim(a, 0, 1, axis=axis)
  return jnp.concatenate([head, jax.lax.slice_in_dim(a, 0, n - 1, axis=axis)], axis=axis)


def lift53(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """One level of the 1-D 5/3 wavelet along ``axis`` (even length): (low s, high d)."""
  if x.shape[axis] % 2:
    raise UserError(f"the 5/3 DWT needs an even size, got {x.shape[axis]} on axis {axis}; "
                    "make the image size divisible by 2^levels")
  even = jax.lax.slice_in_dim(x, 0, None, stride=2, axis=axis)
  odd = jax.lax.slice_in_dim(x, 1, None, stride=2, axis=axis)
  d = odd - 0.5 * (even + _shift_next(even, axis))
  s = even + 0.25 * (_shift_prev(d, axis) + d)
  return s, d


def unlift53(s: jax.Array, d: jax.Array, axis: int) -> jax.Array:
  """Inverse of :func:`lift53`: undoes the update, then the predict step, and interleaves."""
  even = s - 0.25 * (_shift_prev(d, axis) + d)
  odd = d + 0.5 * (even + _shift_next(even, axis))
  stacked = jnp.stack([even, odd], axis=axis + 1)  # [..., n, 2, ...]
  shape = list(even.shape)
  shape[axis] *= 2
  return stacked.reshape(shape)


def _dwt2(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One 2-D level on NHWC: (LL, LH, HL, HH); first letter = height axis, second = width axis."""
  lo_h, hi_h = lift53(x, axis=1)
  ll, detail_w = lift53(lo_h, axis=2)   # low along H; low / high along W
  detail_h, hh = lift53(hi_h, axis=2)   # high along H; low / high along W
  # 'LH' = detail along height (high on H, low on W), PyWavelets' cH; 'HL' = its cV.
  return ll, detail_h, detail_w, hh


def _idwt2(ll, detail_h, detail_w, hh) -> jax.Array:
  lo_h = unlift53(ll, detail_w, axis=2)
  hi_h = unlift53(detail_h, hh, axis=2)
  return unlift53(lo_h, hi_h, axis=1)


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/f, W/f, f*f*C], channel order (dy, dx, c)."""
  if f == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
  """Inverse of :func:`space_to_depth`."""
  if f == 1:
    return x
  b, h, w, c = x.shape
  c0 = c // (f * f)
  x = x.reshape(b, h, w, f, f, c0).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c0)


def dwt53(x: jax.Array, levels: int) -> jax.Array:
  """L-level 2-D 5/3 DWT, NHWC [B,H,W,C] -> [B,H/2^L,W/2^L,C*4^L] (Sec. 3.3, Fig. 6)."""
  if levels < 1:
    raise UserError(f"dwt levels must be >= 1, got {levels}")
  f = 2 ** levels
  if x.shape[1] % f or x.shape[2] % f:
    raise UserError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by 2^{levels}={f} "
                    f"(patching_type='dwt_{levels}')")
  details = []
  ll = x
  for _ in range(levels):
    ll, lh, hl, hh = _dwt2(ll)
    details.append((lh, hl, hh))
  out = [ll, *details[-1]]
  for lvl in range(levels - 2, -1, -1):  # finer levels, coarse to fine
    s = 2 ** (levels - 1 - lvl)
    out.extend(space_to_depth(band, s) for band in details[lvl])
  return jnp.concatenate(out, axis=-1)


def idwt53(y: jax.Array, levels: int) -> jax.Array:
  """Inverse of :func:`dwt53`: [B,h,w,C*4^L] -> [B,h*2^L,w*2^L,C]."""
  if levels < 1:
    raise UserError(f"dwt levels must be >= 1, got {levels}")
  c4 = y.shape[-1]
  if c4 % (4 ** levels):
    raise UserError(f"idwt53 input has {c4} channels, not a multiple of 4^{levels}")
  c = c4 // 4 ** levels
  ll, lh, hl, hh = jnp.split(y[..., :4 * c], 4, axis=-1)
  rest = y[..., 4 * c:]
  offset = 0
  x = _idwt2(ll, lh, hl, hh)
  for lvl in range(levels - 2, -1, -1):
    s = 2 ** (levels - 1 - lvl)
    width = 3 * c * s * s
    bands = jnp.split(rest[..., offset:offset + width], 3, axis=-1)
    offset += width
    lh, hl, hh = (depth_to_space(b, s) for b in bands)
    x = _idwt2(x, lh, hl, hh)
  return x


# ---------------------------------------------------------------------------------------------
# The network's first and last layers.


class PatchIn(nn.Module):
  """First layer: image [B,H,W,C] -> features [B,H/f,W/f,out_ch] (the pseudo-code's EmbedInput).

  'none': 3x3 conv; 'dwt_L': dwt53 then 3x3 conv; 'conv_k': k x k conv with stride k.
  """
  patching_type: str
  out_ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = parse_patching(self.patching_type)
    if p.kind == "dwt":
      x = dwt53(x.astype(jnp.float32), p.levels)
    if p.kind == "conv":
      return nn.Conv(self.out_ch, (p.size, p.size), strides=(p.size, p.size), padding="VALID",
                     dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    return conv3x3(self.out_ch, self.dtype, name="conv")(x)


class PatchOut(nn.Module):
  """Last layer (ProjectOutput): GroupNorm, swish, zero-init conv to the patched channels, unpatch.

  'none': 3x3 conv to C; 'dwt_L': 3x3 conv to C*4^L then idwt53; 'conv_k': transposed k x k conv
  with stride k (the identically shaped counterpart of PatchIn's). Returns float32.
  """
  patching_type: str
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    p = parse_patching(self.patching_type)
    h = nn.swish(group_norm(h.shape[-1], self.dtype, name="norm")(h))
    if p.kind == "conv":
      y = nn.ConvTranspose(self.out_channels, (p.size, p.size), strides=(p.size, p.size),
                           padding="VALID", kernel_init=nn.initializers.zeros, dtype=self.dtype,
                           param_dtype=jnp.float32, name="conv")(h)
      return y.astype(jnp.float32)
    y = conv3x3(p.channels(self.out_channels), self.dtype, zero=True, name="conv")(h)
    y = y.astype(jnp.float32)
    if p.kind == "dwt":
      y = idwt53(y, p.levels)
    return y
