"""Ancestral DDPM sampler and classifier-free guidance (Appendix A).

The step samples p(z_s | z_t) = q(z_s | z_t, x = x_hat) (Eq. 3), with the corrections of NOTES.md
item 2 to the appendix pseudo-code:

  mu       = e^{l_t - l_s} (alpha_s / alpha_t) z_t + (1 - e^{l_t - l_s}) alpha_s x_hat
  min_lvar = log(-expm1(l_t - l_s)) + log_sigmoid(-l_s)   # posterior variance of Eq. 3
  max_lvar = log(-expm1(l_t - l_s)) + log_sigmoid(-l_t)   # sigma_{t|s}^2 of Eq. 2
  var      = exp(noise_param * max_lvar + (1 - noise_param) * min_lvar)

noise_param is 0.2 by default, 1.0 for the MSCOCO FID evaluation. x_hat is clipped to [-1, 1] at
every step (static clipping; dynamic clipping of Saharia et al. 2022 is an option) and the last
step returns the clipped mean prediction x_hat without noise.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp

from core.diffusion import expand_like, x_from_v
from core.errors import UserError


def guided(pred_cond, pred_uncond, guidance_scale):
  """Classifier-free guidance (Eq. 7): w cond + (1 - w) uncond with the reported scale w = 1 + eta.

  Works the same on eps, v or x predictions (the combination is affine with weights summing to 1).
  """
  return guidance_scale * pred_cond + (1.0 - guidance_scale) * pred_uncond


def guided_v_fn(model_fn: Callable, cond: Any, null_cond: Any, guidance_scale) -> Callable:
  """Wraps a conditional model into a guided v_fn(z, logsnr) for the sampler.

  model_fn(z, logsnr, cond) -> v (closes over params); cond and null_cond are pytrees with a leading
  batch axis (e.g. int labels and the null label num_classes). Both calls are batched into one
  model call of batch 2B. A static guidance_scale of 1 calls the model once, without null_cond.
  """
  if isinstance(guidance_scale, numbers.Real) and guidance_scale == 1:
    return lambda z, logsnr: model_fn(z, logsnr, cond)

  def v_fn(z, logsnr):
    b = z.shape[0]
    logsnr = jnp.broadcast_to(logsnr, (b,))
    both = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)
    v = model_fn(jnp.concatenate([z, z], axis=0), jnp.concatenate([logsnr, logsnr]), both)
    return guided(v[:b], v[b:], guidance_scale)

  return v_fn


def clip_static(x):
  """Static clipping of x_hat to [-1, 1] (Appendix A)."""
  return jnp.clip(x, -1.0, 1.0)


def clip_dynamic(x, quantile: float):
  """Dynamic clipping (Saharia et al., 2022): s = max(1, quantile of |x| per example),

  x -> clip(x, -s, s) / s.
  """
  b = x.shape[0]
  s = jnp.quantile(jnp.abs(x).reshape(b, -1), quantile, axis=1)
  s = expand_like(jnp.maximum(s, 1.0), x)
  return jnp.clip(x, -s, s) / s


def ddpm_posterior(z_t, x_hat, logsnr_t, logsnr_s, noise_param=0.2):
  """Mean and log-variance of the DDPM step p(z_s | z_t) = q(z_s | z_t, x_hat) (Eq. 3), s < t.

  noise_param interpolates the log-variance between the posterior variance of Eq. 3 (0) and the
  forward transition variance sigma_{t|s}^2 = (1 - e^{l_t - l_s}) sigma_t^2 of Eq. 2 (1).
  """
  lt, ls = expand_like(logsnr_t, z_t), expand_like(logsnr_s, z_t)
  ratio = jnp.exp(lt - ls)  # SNR_t / SNR_s in (0, 1].
  alpha_s = jnp.sqrt(jax.nn.sigmoid(ls))
  alpha_st = jnp.exp(0.5 * (jax.nn.log_sigmoid(ls) - jax.nn.log_sigmoid(lt)))  # alpha_s/alpha_t
  mean = ratio * alpha_st * z_t + (-jnp.expm1(lt - ls)) * alpha_s * x_hat
  log_one_minus_ratio = jnp.log(-jnp.expm1(lt - ls))
  min_lvar = log_one_minus_ratio + jax.nn.log_sigmoid(-ls)
  max_lvar = log_one_minus_ratio + jax.nn.log_sigmoid(-lt)
  lvar = noise_param * max_lvar + (1.0 - noise_param) * min_lvar
  return mean, lvar


def ddpm_step(z_t, x_hat, logsnr_t, logsnr_s, rng, noise_param=0.2):
  """One ancestral step: z_s = mu + exp(lvar / 2) * N(0, I) from :func:`ddpm_posterior`."""
  mean, lvar = ddpm_posterior(z_t, x_hat, logsnr_t, logsnr_s, noise_param)
  noise = jax.random.normal(rng, z_t.shape, dtype=z_t.dtype)
  return mean + jnp.exp(0.5 * lvar) * noise


def predict_x(v_fn: Callable, z, logsnr, clip_x: bool = True, dynamic_clip: float | None = None):
  """x_hat = alpha z - sigma v_fn(z, logsnr), clipped (dynamic clipping takes precedence)."""
  logsnr = jnp.broadcast_to(logsnr, (z.shape[0],))
  x_hat = x_from_v(z, v_fn(z, logsnr), logsnr)
  if dynamic_clip is not None:
    return clip_dynamic(x_hat, dynamic_clip)
  return clip_static(x_hat) if clip_x else x_hat


@gin.configurable("ddpm_sample",
                  allowlist=["num_steps", "noise_param", "clip_x", "dynamic_clip", "lowest_idx"])
def ddpm_sample(v_fn: Callable, rng, shape, *, logsnr_fn: Callable, num_steps: int,
                noise_param: float = 0.2, clip_x: bool = True, dynamic_clip: float | None = None,
                lowest_idx: int = 0, dtype=jnp.float32):
  """Ancestral DDPM sampling (Appendix A): z_1 ~ N(0, I), steps t = i/N -> s = (i-1)/N for i = N
  down to lowest_idx + 1, then the clipped mean prediction x_hat at t = lowest_idx / N.

  v_fn(z [B,H,W,C], logsnr [B]) -> v (closes over params and conditioning; wrap with
  :func:`guided_v_fn` for guidance). It is called num_steps - lowest_idx + 1 times (twice that
  batch with guidance). The loop is a ``lax.fori_loop``, so v_fn is traced twice
  (loop body and final prediction) whatever num_steps is, and the whole call can be jitted with
  v_fn, shape and the keyword settings static. Returns x in [-1, 1] when clipping.
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise UserError(f"num_steps={num_steps!r} must be an integer >= 1 (sampler steps)")
  if lowest_idx not in (0, 1):
    raise UserError(f"lowest_idx={lowest_idx!r} must be 0 or 1 (Appendix A)")
  if isinstance(noise_param, numbers.Real) and not 0.0 <= noise_param <= 1.0:
    raise UserError(f"noise_param={noise_param!r} must be in [0, 1] (paper: 0.2, 1.0 for COCO)")
  if dynamic_clip is not None and not 0.0 < dynamic_clip <= 1.0:
    raise UserError(f"dynamic_clip={dynamic_clip!r} must be a quantile in (0, 1], e.g. 0.995, or "
                    f"None")
  if len(shape) != 4:
    raise UserError(f"sample shape {tuple(shape)} must be NHWC (batch, height, width, channels)")
  init_rng, step_rng = jax.random.split(rng)
  z = jax.random.normal(init_rng, tuple(shape), dtype=dtype)

  def body(j, z_t):
    i = num_steps - j
    u_t = i.astype(dtype) / num_steps
    u_s = (i - 1).astype(dtype) / num_steps
    logsnr_t, logsnr_s = logsnr_fn(u_t), logsnr_fn(u_s)
    x_hat = predict_x(v_fn, z_t, logsnr_t, clip_x, dynamic_clip)
    return ddpm_step(z_t, x_hat, logsnr_t, logsnr_s, jax.random.fold_in(step_rng, i), noise_param)

  z = jax.lax.fori_loop(0, num_steps - lowest_idx, body, z)
  logsnr_lowest = logsnr_fn(jnp.asarray(lowest_idx / num_steps, dtype))
  return predict_x(v_fn, z, logsnr_lowest, clip_x, dynamic_clip)


def to_uint8(x):
  """[-1, 1] samples to the uint8 pixels a saved PNG would hold (round to nearest, clip)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
