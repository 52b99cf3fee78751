"""logSNR noise schedules: cosine, shifted cosine (Eq. 5) and interpolated (Eq. 6), Appendix A.

A schedule maps diffusion time t in [0, 1] to log SNR(t) = log(alpha_t^2 / sigma_t^2), decreasing
from logsnr_max at t=0 (almost clean) to logsnr_min at t=1 (almost pure noise). The process is
variance preserving: alpha_t^2 = sigmoid(logsnr), sigma_t^2 = sigmoid(-logsnr) (Section 3.1).

Shifts are applied to the whole clipped cosine schedule, so the endpoints move with it (Appendix A:
"the minimum and maximum logsnr hyperparameters are shifted along with the entire schedule").
Models that embed logsnr linearly need the resulting range: :func:`schedule_range`.

Interpolated schedule, where the paper contradicts itself (NOTES.md item 1): Eq. 6 puts the weaker
shift (noise_d_high, e.g. 256) at t=1, the Appendix A code puts the stronger shift (noise_d_low,
e.g. 32) at t=1. We follow the appendix (``order='appendix'``), which matches the prose ("starting
at shift 32 and interpolating to shift 256"); ``order='eq6'`` gives the Eq. 6 reading.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError

ORDERS = ("appendix", "eq6")
NAMES = ("cosine", "cosine_shifted", "cosine_interpolated")


def _as_float(t):
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.float32)
  return t


def _check_positive(setting: str, value) -> None:
  """Raises UserError unless a (static) resolution setting is a positive number."""
  if value is None:
    raise UserError(f"{setting} is not set; give it a positive resolution in pixels, e.g. "
                    f"{setting}=64")
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    if hasattr(value, "shape"):  # A traced or array value: cannot be checked statically.
      return
    raise UserError(f"{setting}={value!r} is not a number; give a positive resolution in pixels")
  if not value > 0:
    raise UserError(f"{setting}={value!r} must be a positive resolution in pixels (e.g. 32, 64, "
                    f"256)")


def _check_range(logsnr_min, logsnr_max) -> None:
  if isinstance(logsnr_min, numbers.Real) and isinstance(logsnr_max, numbers.Real):
    if not logsnr_min < logsnr_max:
      raise UserError(f"logsnr_min={logsnr_min} must be smaller than logsnr_max={logsnr_max} "
                      "(paper: -15 and +15)")


def shift(image_d, noise_d) -> float:
  """The log-SNR shift 2*log(noise_d/image_d) of Eq. 5 (reference resolution noise_d)."""
  _check_positive("image_d", image_d)
  _check_positive("noise_d", noise_d)
  if isinstance(image_d, numbers.Real) and isinstance(noise_d, numbers.Real):
    return 2.0 * math.log(noise_d / image_d)
  return 2.0 * jnp.log(jnp.asarray(noise_d, jnp.float32) / image_d)


def logsnr_cosine(t, logsnr_min=-15., logsnr_max=15.):
  """Cosine schedule with boundaries (Appendix A): -2 log tan(t_min + t (t_max - t_min)).

  t_min = atan(exp(-logsnr_max/2)), t_max = atan(exp(-logsnr_min/2)), so logsnr(0) = logsnr_max and
  logsnr(1) = logsnr_min. Without boundaries this is the alpha-cosine schedule -2 log tan(pi t/2).
  """
  _check_range(logsnr_min, logsnr_max)
  t = _as_float(t)
  t_min = math.atan(math.exp(-0.5 * logsnr_max))
  t_max = math.atan(math.exp(-0.5 * logsnr_min))
  # theta = t_min + t (t_max - t_min). Near pi/2, tan(theta) loses float32 precision, so there we
  # use -2 log tan(theta) = 2 log tan(pi/2 - theta) with pi/2 - theta interpolated from the
  # complementary angles atan(exp(logsnr/2)); both forms are exact at their endpoint.
  theta = (1.0 - t) * t_min + t * t_max
  phi = (1.0 - t) * math.atan(math.exp(0.5 * logsnr_max)) + t * math.atan(
      math.exp(0.5 * logsnr_min))
  return jnp.where(theta < 0.25 * math.pi, -2.0 * jnp.log(jnp.tan(theta)),
                   2.0 * jnp.log(jnp.tan(phi)))


def logsnr_shifted(t, image_d, noise_d, logsnr_min=-15., logsnr_max=15.):
  """Shifted cosine schedule (Eq. 5): logsnr_cosine(t) + 2 log(noise_d / image_d).

  The shift applies to the clipped schedule, so its range is [logsnr_min, logsnr_max] + shift.
  """
  return logsnr_cosine(t, logsnr_min, logsnr_max) + shift(image_d, noise_d)


def logsnr_interpolated(t, image_d, noise_d_low, noise_d_high, logsnr_min=-15., logsnr_max=15.,
                        order="appendix"):
  """Interpolated shifted schedule (Eq. 6 / Appendix A), linear in t in log-SNR space.

  order='appendix' (default, this project's reading): t * shifted(noise_d_low) + (1 - t) *
  shifted(noise_d_high), i.e. t=1 (noise) uses the stronger shift to noise_d_low (e.g. 32) and t=0
  the weaker shift to noise_d_high (e.g. 256). order='eq6': the two shifts swapped, as Eq. 6 prints.
  """
  if order not in ORDERS:
    raise UserError(f"schedule order={order!r} is unknown; use one of {', '.join(ORDERS)}")
  t = _as_float(t)
  logsnr_low = logsnr_shifted(t, image_d, noise_d_low, logsnr_min, logsnr_max)
  logsnr_high = logsnr_shifted(t, image_d, noise_d_high, logsnr_min, logsnr_max)
  if order == "eq6":
    logsnr_low, logsnr_high = logsnr_high, logsnr_low
  return t * logsnr_low + (1.0 - t) * logsnr_high


def alpha_sigma(logsnr):
  """Variance-preserving (alpha, sigma): alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
  logsnr = _as_float(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


@gin.configurable("schedule")
def get_schedule(name: str = "cosine", image_d=None, noise_d=None, noise_d_low=None,
                 noise_d_high=None, logsnr_min: float = -15., logsnr_max: float = 15.,
                 order: str = "appendix") -> Callable:
  """Returns the schedule t -> logsnr named by ``name`` (gin: ``schedule.name`` etc.).

  name: 'cosine' (Appendix A), 'cosine_shifted' (Eq. 5; needs image_d and noise_d) or
  'cosine_interpolated' (Eq. 6; needs image_d, noise_d_low, noise_d_high and takes ``order``).
  Settings the named schedule does not use are ignored. All settings are checked here, so a bad
  config fails before any training starts.
  """
  _check_range(logsnr_min, logsnr_max)
  bounds = dict(logsnr_min=float(logsnr_min), logsnr_max=float(logsnr_max))
  if name == "cosine":
    fn = lambda t: logsnr_cosine(t, **bounds)
  elif name == "cosine_shifted":
    _check_positive("schedule.image_d", image_d)
    _check_positive("schedule.noise_d", noise_d)
    fn = lambda t: logsnr_shifted(t, image_d, noise_d, **bounds)
  elif name == "cosine_interpolated":
    _check_positive("schedule.image_d", image_d)
    _check_positive("schedule.noise_d_low", noise_d_low)
    _check_positive("schedule.noise_d_high", noise_d_high)
    if order not in ORDERS:
      raise UserError(f"schedule.order={order!r} is unknown; use one of {', '.join(ORDERS)}")
    fn = lambda t: logsnr_interpolated(t, image_d, noise_d_low, noise_d_high, order=order, **bounds)
  else:
    raise UserError(f"schedule.name={name!r} is unknown; use one of {', '.join(NAMES)}")
  fn.__name__ = f"logsnr_{name}"
  return fn


def schedule_range(schedule: Callable | None = None, num: int = 4097) -> tuple[float, float]:
  """(logsnr_min, logsnr_max) actually reached by ``schedule`` on t in [0, 1].

  ``schedule`` defaults to the gin-configured :func:`get_schedule`. For shifted schedules this is
  the shifted range (Appendix A), which the U-ViT 'linear' logsnr embedding needs. Evaluated on a
  grid including both endpoints, so it is exact for monotone schedules and safe for others.
  """
  if schedule is None:
    schedule = get_schedule()
  # Concrete even when called while a model is being traced (gin evaluates @schedule_range()
  # whenever the module is constructed, including flax's clones inside init/apply).
  with jax.ensure_compile_time_eval():
    values = np.asarray(schedule(jnp.linspace(0.0, 1.0, num)), dtype=np.float64)
  return float(values.min()), float(values.max())
