"""Convolutional building blocks: the ResBlock of appendix B.2.1 and the resampling layers.

Written in flax linen: parameters, optimizer state and EMA are plain pytrees that jit, shard and
checkpoint directly, and nn.scan / nn.remat stack and rematerialise blocks. Parameters are always
float32; ``dtype`` sets the compute dtype (bfloat16 for speed). Normalisation statistics are
computed in float32 whatever the compute dtype.

Choices where the paper is silent (stated here, pinned by tests/test_models.py):
* NormalizeWithBias in a ResBlock is GroupNorm with learned scale and bias and gcd(C, 32) groups
  (``group_norm.max_groups``, 32: the paper's widths of 128 and up give groups of >= 4 channels).
  Scaled-down models lower it (gin/scales/demo.gin): at width 32, 32 groups normalise one channel
  each, which on a 1x1 feature map is a single value, so every block of such a level would output
  a constant whatever its input.
* Dropout sits after the second swish, before the zero-initialised output convolution (the
  pseudo-code of B.2.1 omits it; this is where DDPM / ADM put it). Whether a block uses dropout is
  decided by its resolution: :func:`dropout_rate` (Sec. 3.4, Table 3).
* Downsample = 2x2 average pooling followed by a 3x3 convolution to the next level's channels
  ("downsampling ... in our case with average pooling", Sec. 3.1); Upsample = nearest-neighbour 2x
  followed by a 3x3 convolution (on accelerators computed as the equal transposed convolution
  with a folded kernel: ``upsample_impl``).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from core.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: Any) -> Any:
  """'float32' | 'bfloat16' | 'float16' (or a numpy dtype) -> jnp dtype; UserError otherwise."""
  if not isinstance(name, str):
    name = jnp.dtype(name).name
  if name not in DTYPES:
    raise UserError(f"dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
  return DTYPES[name]


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups for ``channels``: gcd(channels, max_groups) (32 groups for the paper's)."""
  if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
    raise UserError(f"group_norm.max_groups={max_groups!r} must be an integer >= 1 (the paper: 32)")
  return math.gcd(channels, max_groups)


def dropout_rate(resolution: int, dropout: float, dropout_from_resolution: int | None) -> float:
  """Dropout of a module at ``resolution``: ``dropout`` iff resolution <= dropout_from_resolution.

  Sec. 3.4 / 5.1: "if the starting resolution is 32, then dropout is applied to modules operating
  on resolutions 32x32, 16x16 and 8x8". None means no dropout anywhere.
  """
  if dropout_from_resolution is None or dropout <= 0.0:
    return 0.0
  return float(dropout) if resolution <= dropout_from_resolution else 0.0


DROPOUT_MASK = "dropout_mask"   # checkpoint_name of every dropout mask (remat policies keep it)
CONV_OUTPUT = "conv_output"     # checkpoint_name of a ResBlock's convolution outputs


class Dropout(nn.Dropout):
  """flax's nn.Dropout (same random stream and outputs) whose mask is named :data:`DROPOUT_MASK`.

  A rematerialisation policy can then keep the mask (one byte per element) instead of drawing
  its random bits again in the backward pass (transformer.py, remat_policy='minimal').
  """

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jax.random.bernoulli(rng, p=keep_prob, shape=shape)
    mask = checkpoint_name(jnp.broadcast_to(mask, inputs.shape), DROPOUT_MASK)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class GroupNorm(nn.Module):
  """flax.linen.GroupNorm (its statistics, parameters and parameter names), reduced in two stages.

  Per-channel sums over the positions first, then over each group's channels; mean and variance
  as flax computes them (float32, E[x^2] - E[x]^2). flax reduces [B, ..., G, C/G] over the
  positions and the C/G axis in one strided reduction, which XLA's CPU backend runs slowly: on
  the demo U-Net the norms were a fifth of a training step (README, "Where its time goes").
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise UserError(f"GroupNorm: {self.num_groups} groups do not divide {channels} channels")
    size = channels // self.num_groups
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    xf = x.reshape(x.shape[0], -1, channels).astype(jnp.promote_types(x.dtype, jnp.float32))
    count = xf.shape[1] * size

    def group_mean(per_channel):                   # [B, C] sums -> [B, 1, C] group means
      g = per_channel.reshape(-1, self.num_groups, size).sum(-1) / count
      return jnp.repeat(g, size, axis=-1)[:, None, :]

    mean = group_mean(xf.sum(1))
    var = jnp.maximum(group_mean(jnp.square(xf).sum(1)) - jnp.square(mean), 0.0)
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


@gin.configurable("group_norm", allowlist=["max_groups"])
def group_norm(channels: int, dtype: Any, name: str | None = None, max_groups: int = 32
               ) -> GroupNorm:
  """GroupNorm over ``channels`` with :func:`num_groups` groups (at most ``max_groups``)."""
  return GroupNorm(num_groups=num_groups(channels, max_groups), epsilon=1e-5, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def conv3x3(features: int, dtype: Any, zero: bool = False, name: str | None = None) -> nn.Conv:
  kw = {"kernel_init": nn.initializers.zeros} if zero else {}
  return nn.Conv(features, (3, 3), padding="SAME", dtype=dtype, param_dtype=jnp.float32,
                 name=name, **kw)


class ResBlock(nn.Module):
  """Residual block of appendix B.2.1 with scale/shift conditioning on ``emb``.

  h = GN(x); [skip: h = (h + GN(skip)) / sqrt(2)]; swish; conv3x3; GN(h) * (1 + scale) + shift
  with (scale, shift) = Dense(2 out_ch)(emb); swish; dropout; conv3x3 (zero-init);
  return proj(x) + h, proj a 1x1 conv only when the channel count changes. A fresh block is the
  identity map (zero-init output conv).
  """
  out_ch: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    c_in = x.shape[-1]
    h = group_norm(c_in, self.dtype, name="norm_in")(x)
    if skip is not None:
      s = group_norm(skip.shape[-1], self.dtype, name="norm_skip")(skip)
      h = (h + s) / math.sqrt(2.0)
    h = nn.swish(h)
    h = checkpoint_name(conv3x3(self.out_ch, self.dtype, name="conv_in")(h), CONV_OUTPUT)
    emb_out = nn.Dense(2 * self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                       name="emb_proj")(emb)[:, None, None, :]
    scale, shift = jnp.split(emb_out, 2, axis=-1)
    h = group_norm(self.out_ch, self.dtype, name="norm_out")(h) * (1.0 + scale) + shift
    h = nn.swish(h)
    if self.dropout > 0.0:
      h = Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = checkpoint_name(conv3x3(self.out_ch, self.dtype, zero=True, name="conv_out")(h),
                        CONV_OUTPUT)
    if c_in != self.out_ch:
      x = nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32, name="skip_proj")(x)
    return x + h


class Downsample(nn.Module):
  """2x2 average pooling, then a 3x3 conv to ``out_ch`` (the pseudo-code's downsample(h, ch))."""
  out_ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return conv3x3(self.out_ch, self.dtype, name="conv")(x)


UPSAMPLE_IMPLS = ("auto", "nearest", "transposed")
# Tap t of the folded 4-tap kernel sums these taps of the 3x3 one (see Upsample).
_FOLD = ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.0))


def upsample_impl(impl: str) -> str:
  """'auto' -> 'nearest' on the CPU, 'transposed' elsewhere; UserError for an unknown name."""
  if impl not in UPSAMPLE_IMPLS:
    raise UserError(f"upsample_impl={impl!r} is unknown; use one of {', '.join(UPSAMPLE_IMPLS)}")
  if impl == "auto":
    return "nearest" if jax.default_backend() == "cpu" else "transposed"
  return impl


def fold_upsample_kernel(kernel: jax.Array) -> jax.Array:
  """[3, 3, in, out] kernel of "nearest x2, then 3x3 conv" -> the [4, 4, in, out] kernel of the
  same map as a stride-2 transposed convolution: W = F K F^T per channel pair, F = _FOLD."""
  fold = jnp.asarray(_FOLD, kernel.dtype)
  return jnp.einsum("ty,xz,yzio->txio", fold, fold, kernel)


class _FoldedUpsampleConv(nn.Module):
  """The 3x3 conv after a nearest x2 upsampling, computed as one transposed convolution.

  Output pixel (2i + a, 2j + b) of "repeat, then 3x3 SAME conv" reads input rows i - 1, i (a = 0)
  or i, i + 1 (a = 1) with the 3x3 kernel's rows summed as in _FOLD; a convolution of the input
  dilated by 2 (lhs_dilation, zeros between pixels) with the folded 4x4 kernel and padding 2 is
  that map. Parameters are nn.Conv's (kernel [3, 3, in, out], bias; same names and initialisers),
  so checkpoints of either implementation load in the other.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    w = fold_upsample_kernel(kernel).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1, 1), ((2, 2), (2, 2)),
                                     lhs_dilation=(2, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv to ``out_ch``.

  ``impl`` (UPSAMPLE_IMPLS) only changes how it is computed: 'nearest' materialises the 4x input
  and convolves it (9 taps per output pixel); 'transposed' is the same function as one transposed
  convolution with a folded kernel (4 non-zero taps per output pixel, no 4x input; equal to float
  rounding). 'auto' picks 'transposed' on accelerators and 'nearest' on the CPU, where XLA runs
  the transposed form's kernel gradient on a slow generic path.
  """
  out_ch: int
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if upsample_impl(self.impl) == "transposed":
      return _FoldedUpsampleConv(self.out_ch, self.dtype, name="conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv3x3(self.out_ch, self.dtype, name="conv")(x)
