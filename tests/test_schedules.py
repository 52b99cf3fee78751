"""Noise schedules against closed forms (Section 2, Eq. 5, Eq. 6, Appendix A)."""
from __future__ import annotations

import math

import gin
import jax
import numpy as np
import pytest

from core import schedules
from core.errors import UserError

T = np.linspace(0.0, 1.0, 201)
ATOL = 2e-4  # float32 evaluation vs float64 closed forms.


def np_cosine(t, lmin=-15.0, lmax=15.0):
  """Appendix A closed form, float64."""
  t_min, t_max = math.atan(math.exp(-0.5 * lmax)), math.atan(math.exp(-0.5 * lmin))
  return -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))


@pytest.mark.parametrize("lmin,lmax", [(-15.0, 15.0), (-10.0, 12.0), (-20.0, 5.0)])
def test_cosine_closed_form_and_endpoints(lmin, lmax):
  got = np.asarray(schedules.logsnr_cosine(T, lmin, lmax), np.float64)
  np.testing.assert_allclose(got, np_cosine(T, lmin, lmax), atol=ATOL, rtol=1e-5)
  assert abs(got[0] - lmax) < ATOL and abs(got[-1] - lmin) < ATOL


def test_cosine_inverse_is_affine_in_t():
  # Independent characterization: atan(sigma/alpha) = atan(exp(-logsnr/2)) moves linearly in t
  # between atan(exp(-logsnr_max/2)) and atan(exp(-logsnr_min/2)).
  theta = np.arctan(np.exp(-0.5 * np.asarray(schedules.logsnr_cosine(T), np.float64)))
  lo, hi = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
  np.testing.assert_allclose(theta, lo + T * (hi - lo), atol=1e-6)


def test_cosine_without_boundaries_is_alpha_cosine():
  # Section 2: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) -> logsnr = -2 log tan(pi t / 2).
  t = T[1:-1]
  got = np.asarray(schedules.logsnr_cosine(t, -60.0, 60.0), np.float64)
  np.testing.assert_allclose(got, -2.0 * np.log(np.tan(np.pi * t / 2)), atol=1e-4, rtol=1e-5)
  alpha, sigma = schedules.alpha_sigma(got)
  np.testing.assert_allclose(alpha, np.cos(np.pi * t / 2), atol=1e-5)
  np.testing.assert_allclose(sigma, np.sin(np.pi * t / 2), atol=1e-5)


@pytest.mark.parametrize("fn", [
    lambda t: schedules.logsnr_cosine(t),
    lambda t: schedules.logsnr_shifted(t, 512, 64),
    lambda t: schedules.logsnr_interpolated(t, 512, 32, 256),
    lambda t: schedules.logsnr_interpolated(t, 512, 32, 256, order="eq6"),
])
def test_monotone_decreasing(fn):
  vals = np.asarray(fn(np.linspace(0.0, 1.0, 2001)))
  assert np.all(np.diff(vals) < 0)


def test_alpha_sigma_variance_preserving():
  logsnr = np.linspace(-20.0, 20.0, 101)
  alpha, sigma = (np.asarray(a, np.float64) for a in schedules.alpha_sigma(logsnr))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(alpha**2, 1.0 / (1.0 + np.exp(-logsnr)), rtol=1e-5)
  mid = np.abs(logsnr) <= 12  # SNR = alpha^2 / sigma^2 = exp(logsnr), where float32 resolves it.
  np.testing.assert_allclose(np.log(alpha[mid]**2 / sigma[mid]**2), logsnr[mid], atol=2e-3)


@pytest.mark.parametrize("image_d,noise_d", [(128, 64), (512, 64), (256, 32), (64, 64), (32, 64)])
def test_shifted_is_cosine_plus_shift(image_d, noise_d):
  diff = np.asarray(schedules.logsnr_shifted(T, image_d, noise_d), np.float64) - np_cosine(T)
  np.testing.assert_allclose(diff, 2.0 * np.log(noise_d / image_d), atol=ATOL)
  # Endpoints are shifted along with the schedule (Appendix A).
  rng = schedules.schedule_range(lambda t: schedules.logsnr_shifted(t, image_d, noise_d))
  np.testing.assert_allclose(rng, np.array([-15.0, 15.0]) + 2 * np.log(noise_d / image_d),
                             atol=ATOL)


def test_shifted_paper_example_128_shift64():
  # Section 3.1: log SNR_shift64^{128x128}(t) = -2 log tan(pi t / 2) + 2 log(64 / 128).
  t = T[1:-1]
  got = np.asarray(schedules.logsnr_shifted(t, 128, 64, -60.0, 60.0), np.float64)
  np.testing.assert_allclose(got, -2 * np.log(np.tan(np.pi * t / 2)) + 2 * np.log(0.5), atol=1e-4)


def test_shift_matches_eq4_snr_after_pooling():
  # Eq. 4 + Eq. 5: pooling a d x d image to the reference noise_d multiplies SNR by (d/noise_d)^2,
  # which gives back the unshifted schedule at the reference resolution.
  pooled = np.asarray(schedules.logsnr_shifted(T, 512, 64), np.float64) + 2 * np.log(512 / 64)
  np.testing.assert_allclose(pooled, np_cosine(T), atol=ATOL)


def test_interpolated_appendix_order():
  d, low, high = 512, 32, 256
  got = np.asarray(schedules.logsnr_interpolated(T, d, low, high), np.float64)
  s_low, s_high = 2 * np.log(low / d), 2 * np.log(high / d)
  np.testing.assert_allclose(got, T * (np_cosine(T) + s_low) + (1 - T) * (np_cosine(T) + s_high),
                             atol=ATOL)
  # t=0 (clean end) uses the weaker shift to noise_d_high, t=1 (noise) the stronger to noise_d_low.
  assert abs(got[0] - (15.0 + s_high)) < ATOL
  assert abs(got[-1] - (-15.0 + s_low)) < ATOL
  rng = schedules.schedule_range(lambda t: schedules.logsnr_interpolated(t, d, low, high))
  np.testing.assert_allclose(rng, (-15.0 + s_low, 15.0 + s_high), atol=ATOL)


def test_interpolated_eq6_order_reachable():
  d, low, high = 512, 32, 256
  got = np.asarray(schedules.logsnr_interpolated(T, d, low, high, order="eq6"), np.float64)
  s_low, s_high = 2 * np.log(low / d), 2 * np.log(high / d)
  # Eq. 6 as printed: t * shift256 + (1 - t) * shift32.
  np.testing.assert_allclose(got, np_cosine(T) + T * s_high + (1 - T) * s_low, atol=ATOL)
  assert abs(got[0] - (15.0 + s_low)) < ATOL and abs(got[-1] - (-15.0 + s_high)) < ATOL
  fn = schedules.get_schedule("cosine_interpolated", image_d=d, noise_d_low=low, noise_d_high=high,
                              order="eq6")
  np.testing.assert_allclose(np.asarray(fn(T)), got, atol=1e-6)


def test_factory_by_name_and_gin():
  np.testing.assert_allclose(schedules.get_schedule("cosine")(T), np_cosine(T), atol=ATOL)
  fn = schedules.get_schedule("cosine_shifted", image_d=256, noise_d=64)
  np.testing.assert_allclose(fn(T), np_cosine(T) + 2 * np.log(64 / 256), atol=ATOL)
  fn = schedules.get_schedule("cosine_interpolated", image_d=512, noise_d_low=32, noise_d_high=256)
  np.testing.assert_allclose(fn(T), schedules.logsnr_interpolated(T, 512, 32, 256), atol=1e-6)
  # Jittable with the t argument traced.
  np.testing.assert_allclose(jax.jit(fn)(T), fn(T), atol=1e-5)
  gin.clear_config()
  try:
    gin.parse_config(["schedule.name = 'cosine_shifted'", "schedule.image_d = 128",
                      "schedule.noise_d = 64", "schedule.logsnr_min = -10.0"])
    lo, hi = schedules.schedule_range()
    np.testing.assert_allclose((lo, hi), (-10.0 + 2 * np.log(0.5), 15.0 + 2 * np.log(0.5)),
                               atol=ATOL)
    np.testing.assert_allclose(schedules.get_schedule()(T), np_cosine(T, -10.0) + 2 * np.log(0.5),
                               atol=ATOL)
  finally:
    gin.clear_config()


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cosine_shifted", image_d=64, noise_d=0), "noise_d"),
    (dict(name="cosine_shifted", image_d=64, noise_d=-32), "noise_d"),
    (dict(name="cosine_shifted", image_d=0, noise_d=64), "image_d"),
    (dict(name="cosine_shifted", image_d=-5, noise_d=64), "image_d"),
    (dict(name="cosine_shifted", image_d=64), "noise_d"),
    (dict(name="cosine_shifted", noise_d=64), "image_d"),
    (dict(name="cosine_interpolated", image_d=64, noise_d_low=0, noise_d_high=64), "noise_d_low"),
    (dict(name="cosine_interpolated", image_d=64, noise_d_low=32, noise_d_high=256,
          order="backwards"), "order"),
    (dict(name="cosine_sifted"), "cosine_shifted"),
    (dict(name="cosine", logsnr_min=5.0, logsnr_max=-5.0), "logsnr_min"),
])
def test_bad_settings_raise_user_error(kwargs, match):
  with pytest.raises(UserError, match=match) as e:
    schedules.get_schedule(**kwargs)
  # The message's first line names the setting (gin appends its call location on later lines).
  assert match in str(e.value).splitlines()[0]


def test_direct_calls_validate_too():
  with pytest.raises(UserError, match="noise_d"):
    schedules.logsnr_shifted(0.5, 64, 0)
  with pytest.raises(UserError, match="image_d"):
    schedules.logsnr_shifted(0.5, -64, 64)
  with pytest.raises(UserError, match="order"):
    schedules.logsnr_interpolated(0.5, 512, 32, 256, order="sideways")
