"""Conditioning: logSNR embedding, class embedding (with a null class) and text projection.

The network is conditioned on logSNR(t) rather than t (the schedules are defined in logSNR,
Sec. 3.1), on an ImageNet class (Sec. 5) and, for text-to-image, on T5-XXL embeddings (Sec. 3.6).

logsnr_input_type (how the scalar logSNR becomes features), as in the authors' code lineage
(google-research diffusion_distillation unet.py): logSNR is first mapped to u in [0, 1], then u
gets the DDPM timestep embedding, sinusoidal features of 1000 u (u plays diffusion time):
* 'linear': u = (logsnr - lo) / (hi - lo), [lo, hi] = logsnr_range, the clipped (and shifted)
  schedule's [logsnr_min, logsnr_max] (appendix A: "care needs to be taken when these endpoints are
  used to define the embedding"; gin binds it with ``@schedule_range()``). B.2 names it for the
  U-ViT; we use it for the U-Net too (README choices table).
* 'sigmoid': u = sigmoid(logsnr) (= alpha_t^2).
* 'inv_cos': u = (2/pi) arctan(exp(-logsnr/2)), the time at which the unshifted cosine schedule
  has this logSNR (logsnr clipped to [-20, 20] first).
The features (width = base_channels) go through Dense(emb) -> swish -> Dense(emb); the class
embedding is added and a swish applied; every block then reads its own Dense of this vector.

Portrait flag (Sec. 5, the 384x640 text-to-image model: portrait images are rotated at preparation
and a 'portrait mode' flag set): with portrait=True an nn.Embed over {0: landscape, 1: portrait} is
added to the vector like the class embedding (the lineage's way of adding a discrete condition);
the flag is geometry, not content, so guidance keeps it in the unconditional pass too.

Classes: nn.Embed over num_classes + 1 entries, index num_classes is the null class used for
classifier-free guidance (label=None means all-null). num_classes=0: unconditional, label ignored.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from core.errors import UserError

LOGSNR_INPUT_TYPES = ("linear", "sigmoid", "inv_cos")


def sinusoidal_features(x: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """[B] -> [B, dim]: [sin(x f_k), cos(x f_k)], f_k = max_period^(-k/(dim/2-1)) (DDPM Eq.)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    feats = jnp.pad(feats, ((0, 0), (0, 1)))
  return feats


def logsnr_to_unit(logsnr: jax.Array, input_type: str,
                   logsnr_range: Sequence[float] = (-15.0, 15.0)) -> jax.Array:
  """logSNR -> u in [0, 1] for the chosen logsnr_input_type (see module docstring)."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if input_type == "linear":
    lo, hi = float(logsnr_range[0]), float(logsnr_range[1])
    return (logsnr - lo) / (hi - lo)
  if input_type == "sigmoid":
    return jax.nn.sigmoid(logsnr)
  if input_type == "inv_cos":
    return jnp.arctan(jnp.exp(-0.5 * jnp.clip(logsnr, -20.0, 20.0))) / (0.5 * jnp.pi)
  raise UserError(f"logsnr_input_type={input_type!r} is unknown; use one of "
                  f"{', '.join(LOGSNR_INPUT_TYPES)}")


def logsnr_features(logsnr: jax.Array, dim: int, input_type: str,
                    logsnr_range: Sequence[float] = (-15.0, 15.0)) -> jax.Array:
  """logSNR [B] -> [B, dim]: the timestep embedding of 1000 u, u = logsnr_to_unit(logsnr)."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if logsnr.ndim == 0:
    logsnr = logsnr[None]
  return sinusoidal_features(1000.0 * logsnr_to_unit(logsnr, input_type, logsnr_range), dim)


class Conditioning(nn.Module):
  """logSNR (+ class) -> conditioning vector [B, emb_channels] consumed by every block."""
  emb_channels: int
  feature_dim: int
  logsnr_input_type: str = "linear"
  logsnr_range: Sequence[float] = (-15.0, 15.0)
  num_classes: int = 0
  dtype: Any = jnp.float32
  portrait: bool = False

  @nn.compact
  def __call__(self, logsnr: jax.Array, label: jax.Array | None, batch: int,
               portrait: jax.Array | None = None) -> jax.Array:
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32).reshape(-1), (batch,))
    feats = logsnr_features(logsnr, self.feature_dim, self.logsnr_input_type, self.logsnr_range)
    dense = lambda name: nn.Dense(self.emb_channels, dtype=self.dtype, param_dtype=jnp.float32,
                                  name=name)
    emb = dense("logsnr_dense0")(feats)
    emb = dense("logsnr_dense1")(nn.swish(emb))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((batch,), self.num_classes, jnp.int32)
      label = jnp.broadcast_to(jnp.asarray(label, jnp.int32).reshape(-1), (batch,))
      emb = emb + nn.Embed(self.num_classes + 1, self.emb_channels, dtype=self.dtype,
                           param_dtype=jnp.float32, name="class_emb")(label)
    if self.portrait:
      flag = jnp.zeros((batch,), jnp.int32) if portrait is None else portrait
      flag = jnp.broadcast_to(jnp.asarray(flag, jnp.int32).reshape(-1), (batch,))
      emb = emb + nn.Embed(2, self.emb_channels, dtype=self.dtype, param_dtype=jnp.float32,
                           name="portrait_emb")(jnp.clip(flag, 0, 1))
    return nn.swish(emb)


class TextProjection(nn.Module):
  """T5 embeddings [B, T, D] -> LayerNorm -> Dense(text_channels), shared by all cross-attention."""
  text_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text_emb: jax.Array) -> jax.Array:
    if text_emb.ndim != 3:
      raise UserError(f"text_emb must be [batch, tokens, dim], got shape {text_emb.shape}")
    t = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm")(text_emb)
    return nn.Dense(self.text_channels, dtype=self.dtype, param_dtype=jnp.float32,
                    name="dense")(t)
