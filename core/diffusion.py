"""Forward process, prediction conversions and training losses (Sections 2, 3.2 and Appendix A).

Images are NHWC. ``logsnr`` is a scalar or a per-example vector of shape [B]; it is broadcast over
H, W, C. With alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr):

  z = alpha x + sigma eps                      (Eq. 1, :func:`diffuse`)
  v = alpha eps - sigma x                      (Salimans & Ho, 2022)
  x = alpha z - sigma v,   eps = sigma z + alpha v
  v = (alpha z - x) / sigma = (eps - sigma z) / alpha

Losses are unweighted (w(t) = 1) with t ~ U(0, 1) per example. 'eps_mse' is the U-Net default
(eps_hat = sigma z + alpha v_hat, Appendix A), 'v_mse' the U-ViT default (mean_loss_type='v_mse',
Appendix B). The multiscale loss of Section 3.2 is applied to whichever target the loss type uses.
Its L^{s x s} averages over the C channels as well as the s x s pixels: the paper's
(1/s^2) ||D_s[eps] - D_s[eps_hat]||^2 divided by C. The factor is the same at every scale, so the
weighting between scales (1/s) is the paper's; the total is the paper's loss / C.
"""
from __future__ import annotations

from typing import Callable

import gin
import jax
import jax.numpy as jnp

from core.errors import UserError
from core.schedules import alpha_sigma

PARAMS = ("x", "eps", "v")
LOSS_TYPES = ("eps_mse", "v_mse")


def expand_like(a, x):
  """Reshapes a scalar or a per-example [B] vector so that it broadcasts against NHWC ``x``."""
  a = jnp.asarray(a, dtype=jnp.result_type(x))
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _alpha_sigma(logsnr, x):
  alpha, sigma = alpha_sigma(expand_like(logsnr, x))
  return alpha, sigma


def diffuse(x, logsnr, eps):
  """z_t = alpha_t x + sigma_t eps, a sample of q(z_t | x) (Eq. 1) for eps ~ N(0, I)."""
  alpha, sigma = _alpha_sigma(logsnr, x)
  return alpha * x + sigma * eps


def v_target(x, eps, logsnr):
  """v = alpha eps - sigma x, the regression target of the v-parametrization."""
  alpha, sigma = _alpha_sigma(logsnr, x)
  return alpha * eps - sigma * x


def x_from_v(z, v, logsnr):
  """x_hat = alpha z - sigma v_hat (Section 2)."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return alpha * z - sigma * v


def eps_from_v(z, v, logsnr):
  """eps_hat = sigma z + alpha v_hat (Section 2, Appendix A loss)."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return sigma * z + alpha * v


def v_from_x(z, x, logsnr):
  """v_hat = (alpha z - x_hat) / sigma."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return (alpha * z - x) / sigma


def v_from_eps(z, eps, logsnr):
  """v_hat = (eps_hat - sigma z) / alpha."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return (eps - sigma * z) / alpha


def convert(pred, z, logsnr, src: str, dst: str):
  """Converts a prediction between the 'x', 'eps' and 'v' parametrizations given z_t and logsnr."""
  for p in (src, dst):
    if p not in PARAMS:
      raise UserError(f"parametrization {p!r} is unknown; use one of {', '.join(PARAMS)}")
  if src == dst:
    return pred
  v = {"v": lambda: pred, "x": lambda: v_from_x(z, pred, logsnr),
       "eps": lambda: v_from_eps(z, pred, logsnr)}[src]()
  return {"v": lambda: v, "x": lambda: x_from_v(z, v, logsnr),
          "eps": lambda: eps_from_v(z, v, logsnr)}[dst]()


def avg_pool_to(x, s: int):
  """D^{s x s}: average pooling of NHWC ``x`` (H = W = d, d divisible by s) to s x s."""
  b, h, w, c = x.shape
  return x.reshape(b, s, h // s, s, w // s, c).mean(axis=(2, 4))


def multiscale_resolutions(d: int, base: int = 32) -> list[int]:
  """The resolutions {base, 2 base, ..., d} of the multiscale loss (Section 3.2).

  d must be base * 2^k. If d < base (a toy model smaller than the base resolution) only s = d is
  used, so the loss reduces to (1/d) * mse.
  """
  if not (isinstance(base, int) and base >= 1):
    raise UserError(f"multiscale_base={base!r} must be a positive integer (paper: 32)")
  if d < base:
    return [d]
  res, s = [], base
  while s < d:
    res.append(s)
    s *= 2
  if s != d:
    raise UserError(f"multiscale loss needs the image size {d} to be multiscale_base={base} times "
                    f"a power of two; change multiscale_base or the resolution")
  return res + [d]


def multiscale_terms(target, pred, base: int = 32) -> dict[int, jax.Array]:
  """Per-example L^{s x s} = mean((D_s target - D_s pred)^2) over s x s pixels and channels."""
  if target.ndim != 4 or target.shape[1] != target.shape[2]:
    raise UserError(f"multiscale loss needs square NHWC images, got shape {tuple(target.shape)}")
  d = target.shape[1]
  return {s: jnp.mean(jnp.square(avg_pool_to(target, s) - avg_pool_to(pred, s)), axis=(1, 2, 3))
          for s in multiscale_resolutions(d, base)}


def multiscale_mse(target, pred, base: int = 32, *, per_example: bool = False):
  """Multiscale loss (Section 3.2): sum over s in {base, 2 base, ..., d} of (1/s) L^{s x s}.

  Each L^{s x s} is a mean over its s x s pixels and channels. Returns the batch mean, or the
  per-example values [B] when ``per_example``. For d < base only s = d is used.
  """
  terms = multiscale_terms(target, pred, base)
  loss = sum(term / s for s, term in terms.items())
  return loss if per_example else jnp.mean(loss)


def per_example_loss(x, eps, z, logsnr, v_pred, *, loss_type: str = "eps_mse",
                     multiscale: bool = False, multiscale_base: int = 32):
  """Per-example losses [B] and per-scale terms for a v-prediction (unweighted, Appendix A).

  Returns (loss [B], {s: L^{s x s} [B]}); the dict is empty unless ``multiscale``.
  """
  if loss_type == "eps_mse":
    target, pred = eps, eps_from_v(z, v_pred, logsnr)
  elif loss_type == "v_mse":
    target, pred = v_target(x, eps, logsnr), v_pred
  else:
    raise UserError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
  if not multiscale:
    return jnp.mean(jnp.square(target - pred), axis=tuple(range(1, target.ndim))), {}
  terms = multiscale_terms(target, pred, multiscale_base)
  return sum(term / s for s, term in terms.items()), terms


def _draw_t_eps(rng, shape, dtype):
  """t ~ U(0, 1) and eps ~ N(0, I) of ``shape`` from one key."""
  t_rng, eps_rng = jax.random.split(rng)
  return (jax.random.uniform(t_rng, shape[:1], dtype=dtype),
          jax.random.normal(eps_rng, shape, dtype=dtype))


@gin.configurable("diffusion_loss", allowlist=["loss_type", "multiscale", "multiscale_base"])
def diffusion_loss(v_fn: Callable, x, rng, *, logsnr_fn: Callable, loss_type: str = "eps_mse",
                   multiscale: bool = False, multiscale_base: int = 32):
  """Batch training loss: t ~ U(0, 1) per example, z_t ~ q(z_t | x), model v_fn(z_t, logsnr_t).

  ``rng``: one key for the batch, or one typed key per example ([B], ``jax.random.key``): each
  example's t and eps then come from its own key, whatever batch it is in (gradient accumulation,
  core/trainer.py). v_fn(z [B,H,W,C], logsnr [B]) -> v_hat (closes over params, labels, dropout
  rng). Returns (scalar mean loss, aux) with per-example arrays of shape [B] in aux: 'loss' (the
  per-example loss, for masking), 't', 'logsnr', and with ``multiscale`` the unweighted
  'loss_s{s}' terms.
  """
  if x.ndim != 4:
    raise UserError(f"diffusion_loss needs NHWC images, got shape {tuple(x.shape)}")
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:
    t, eps = jax.vmap(lambda k: _draw_t_eps(k, (1, *x.shape[1:]), x.dtype))(rng)
    t, eps = t[:, 0], eps[:, 0]
  else:
    t, eps = _draw_t_eps(rng, x.shape, x.dtype)
  logsnr = logsnr_fn(t)
  z = diffuse(x, logsnr, eps)
  v_pred = v_fn(z, logsnr)
  loss, terms = per_example_loss(x, eps, z, logsnr, v_pred, loss_type=loss_type,
                                 multiscale=multiscale, multiscale_base=multiscale_base)
  aux = {"loss": loss, "t": t, "logsnr": logsnr}
  aux.update({f"loss_s{s}": term for s, term in terms.items()})
  return jnp.mean(loss), aux
