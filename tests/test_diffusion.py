"""Forward process, conversions and losses (Sections 2, 3.1 Eq. 4, 3.2, Appendix A)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import diffusion, schedules
from core.errors import UserError

PARAMS = ("x", "eps", "v")


def _np_alpha_sigma(logsnr):
  logsnr = np.asarray(logsnr, np.float64).reshape(-1, 1, 1, 1)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def test_diffuse_marginal_statistics():
  # q(z_t | x) = N(alpha_t x, sigma_t^2 I) (Eq. 1), checked from many noise draws.
  n = 20000
  x = jnp.broadcast_to(jnp.asarray([-0.8, 0.1, 0.5, 1.0]).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  logsnr = jnp.full((n,), 0.7)
  eps = jax.random.normal(jax.random.PRNGKey(0), x.shape)
  z = np.asarray(diffusion.diffuse(x, logsnr, eps), np.float64)
  alpha, sigma = _np_alpha_sigma(0.7)
  np.testing.assert_allclose(z.mean(0), alpha[0] * np.asarray(x[0]), atol=0.02)
  np.testing.assert_allclose(z.var(0), np.full((2, 2, 1), sigma.item()**2), rtol=0.05)


@pytest.mark.parametrize("s", [2, 4])
def test_eq4_average_pooling_multiplies_snr_by_s_squared(s):
  # Eq. 4: with x constant within s x s windows, average pooling z_t leaves the signal alpha x and
  # divides the noise variance by s^2, so SNR^{d/s} = SNR^d * s^2. Estimated from samples.
  n, low = 4000, 4

  @jax.jit
  def sample(key):
    key_x, key_eps = jax.random.split(key)
    x_low = jax.random.uniform(key_x, (1, low, low, 1), minval=-1, maxval=1)
    x = jnp.repeat(jnp.repeat(x_low, s, axis=1), s, axis=2)  # Upsampled: constant in windows.
    x = jnp.broadcast_to(x, (n,) + x.shape[1:])
    z = diffusion.diffuse(x, logsnr, jax.random.normal(key_eps, x.shape))
    return x_low, x[0], z, diffusion.avg_pool_to(z, low)

  logsnr = 1.3
  x_low, x, z, z_pooled = sample(jax.random.PRNGKey(1))

  def snr(samples, signal):
    samples = np.asarray(samples, np.float64).reshape(n, -1)
    signal = np.asarray(signal, np.float64).reshape(-1)
    mean = samples.mean(0)
    alpha_hat = (mean @ signal) / (signal @ signal)  # Least-squares slope of the mean on x.
    return alpha_hat**2 / samples.var(0).mean()

  snr_full = snr(z, x)
  snr_pooled = snr(z_pooled, x_low[0])
  np.testing.assert_allclose(snr_full, np.exp(logsnr), rtol=0.03)
  np.testing.assert_allclose(np.log(snr_pooled / snr_full), 2 * np.log(s), atol=0.05)


def test_conversions_recover_truth():
  key = jax.random.PRNGKey(2)
  kx, ke = jax.random.split(key)
  logsnr = jnp.linspace(-8.0, 8.0, 9)
  x = jax.random.uniform(kx, (9, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(ke, x.shape)
  alpha, sigma = _np_alpha_sigma(logsnr)
  xn, en = np.asarray(x, np.float64), np.asarray(eps, np.float64)
  v = alpha * en - sigma * xn  # Definition of v (Salimans & Ho, 2022).

  @jax.jit
  def all_conversions(x, eps, v, logsnr):
    z = diffusion.diffuse(x, logsnr, eps)
    out = {"z": z, "v_target": diffusion.v_target(x, eps, logsnr),
           "x_from_v": diffusion.x_from_v(z, v, logsnr),
           "eps_from_v": diffusion.eps_from_v(z, v, logsnr),
           "v_from_x": diffusion.v_from_x(z, x, logsnr),
           "v_from_eps": diffusion.v_from_eps(z, eps, logsnr)}
    for src, truth in (("x", x), ("eps", eps), ("v", v)):
      for dst in PARAMS:
        out[f"{src}->{dst}"] = diffusion.convert(truth, z, logsnr, src, dst)
    return out

  got = all_conversions(x, eps, jnp.asarray(v, jnp.float32), logsnr)
  np.testing.assert_allclose(got["z"], alpha * xn + sigma * en, atol=1e-5)
  np.testing.assert_allclose(got["v_target"], v, atol=1e-5)
  np.testing.assert_allclose(got["x_from_v"], xn, atol=1e-5)
  np.testing.assert_allclose(got["eps_from_v"], en, atol=1e-5)
  np.testing.assert_allclose(got["v_from_x"], v, atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(got["v_from_eps"], v, atol=1e-3, rtol=1e-4)
  want = {"x": xn, "eps": en, "v": v}
  for src in PARAMS:
    for dst in PARAMS:
      np.testing.assert_allclose(got[f"{src}->{dst}"], want[dst], atol=2e-3, rtol=1e-4)
  with pytest.raises(UserError, match="parametrization"):
    diffusion.convert(x, x, logsnr, "score", "x")


def np_pool(a, s):
  """Direct average pooling with explicit loops over output pixels."""
  b, d, _, c = a.shape
  k = d // s
  out = np.zeros((b, s, s, c))
  for i in range(s):
    for j in range(s):
      out[:, i, j, :] = a[:, i * k:(i + 1) * k, j * k:(j + 1) * k, :].mean(axis=(1, 2))
  return out


def np_multiscale(target, pred, base):
  d = target.shape[1]
  total = np.zeros(target.shape[0])
  s = min(base, d)
  while s <= d:
    total += np.mean((np_pool(target, s) - np_pool(pred, s))**2, axis=(1, 2, 3)) / s
    s *= 2
  return total


@pytest.mark.parametrize("d,base", [(16, 4), (8, 2), (32, 32), (16, 8)])
def test_multiscale_mse_matches_formula(d, base):
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  target = jax.random.normal(k1, (3, d, d, 2))
  pred = jax.random.normal(k2, (3, d, d, 2)) + 0.3
  want = np_multiscale(np.asarray(target, np.float64), np.asarray(pred, np.float64), base)
  fn = jax.jit(lambda a, b: (diffusion.multiscale_mse(a, b, base, per_example=True),
                             diffusion.multiscale_mse(a, b, base)))
  per_example, mean = fn(target, pred)
  np.testing.assert_allclose(per_example, want, rtol=1e-5)
  np.testing.assert_allclose(mean, want.mean(), rtol=1e-5)
  assert diffusion.multiscale_resolutions(d, base)[0] == base
  assert diffusion.multiscale_resolutions(d, base)[-1] == d


def test_multiscale_single_scale_is_mse_over_base():
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  target = jax.random.normal(k1, (2, 32, 32, 3))
  pred = jax.random.normal(k2, (2, 32, 32, 3))
  mse = np.mean((np.asarray(target, np.float64) - np.asarray(pred, np.float64))**2)
  np.testing.assert_allclose(diffusion.multiscale_mse(target, pred, 32), mse / 32, rtol=1e-5)
  # d < base: documented fallback to the single scale s = d.
  np.testing.assert_allclose(diffusion.multiscale_mse(target[:, :8, :8], pred[:, :8, :8], 32),
                             np.mean((np.asarray(target - pred)[:, :8, :8])**2) / 8, rtol=1e-5)


@pytest.mark.parametrize("d,base", [(48, 32), (96, 32), (40, 8)])
def test_multiscale_bad_resolution(d, base):
  x = jnp.zeros((1, d, d, 1))
  with pytest.raises(UserError, match="power of two"):
    diffusion.multiscale_mse(x, x, base)


def _oracle_single_point(x0):
  """Exact v for a data set holding one image x0: x_hat = x0 whatever z_t is."""
  return lambda z, logsnr: diffusion.v_from_x(z, x0, logsnr)


@pytest.mark.parametrize("loss_type,multiscale", [("eps_mse", False), ("eps_mse", True),
                                                   ("v_mse", True)])
def test_loss_vanishes_for_exact_model(loss_type, multiscale):
  x0 = jax.random.uniform(jax.random.PRNGKey(5), (8, 16, 16, 3), minval=-1, maxval=1)
  # Keep logsnr in a range where (alpha z - x0) / sigma is well conditioned in float32.
  logsnr_fn = functools.partial(schedules.logsnr_cosine, logsnr_min=-10.0, logsnr_max=10.0)
  loss_fn = jax.jit(functools.partial(diffusion.diffusion_loss, _oracle_single_point(x0),
                                      logsnr_fn=logsnr_fn, loss_type=loss_type,
                                      multiscale=multiscale, multiscale_base=4))
  loss, aux = loss_fn(x0, jax.random.PRNGKey(6))
  assert float(loss) < 1e-5
  assert aux["loss"].shape == (8,)
  np.testing.assert_allclose(aux["logsnr"], logsnr_fn(aux["t"]), atol=1e-5)
  if multiscale:
    assert sorted(k for k in aux if k.startswith("loss_s")) == ["loss_s16", "loss_s4", "loss_s8"]


def test_loss_expected_value_for_zero_prediction():
  # v_hat = 0: eps_hat = sigma z, so eps - eps_hat = alpha v and the eps loss is alpha^2 E[v^2] with
  # E[v^2] = alpha^2 + sigma^2 x^2 per pixel; the v loss is E[v^2]. Many pixels make the
  # per-example mean concentrate.
  b, d = 16, 64
  x = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, d * d * 3).reshape(1, d, d, 3), (b, d, d, 3))
  zero = lambda z, logsnr: jnp.zeros_like(z)
  mean_x2 = float(np.mean(np.asarray(x[0], np.float64)**2))
  for loss_type in ("eps_mse", "v_mse"):
    loss, aux = jax.jit(functools.partial(diffusion.diffusion_loss, zero,
                                          logsnr_fn=schedules.logsnr_cosine,
                                          loss_type=loss_type))(x, jax.random.PRNGKey(7))
    a2 = 1 / (1 + np.exp(-np.asarray(aux["logsnr"], np.float64)))
    ev2 = a2 + (1 - a2) * mean_x2
    want = a2 * ev2 if loss_type == "eps_mse" else ev2
    np.testing.assert_allclose(aux["loss"], want, rtol=0.06, atol=1e-6)
    np.testing.assert_allclose(loss, np.mean(aux["loss"]), rtol=1e-6)
  t = np.asarray(aux["t"])
  assert t.min() >= 0 and t.max() <= 1 and len(np.unique(t)) == b


def test_per_example_loss_against_numpy():
  ks = jax.random.split(jax.random.PRNGKey(8), 3)
  x = jax.random.uniform(ks[0], (4, 8, 8, 1), minval=-1, maxval=1)
  eps = jax.random.normal(ks[1], x.shape)
  v_pred = jax.random.normal(ks[2], x.shape)
  logsnr = jnp.asarray([-5.0, -1.0, 2.0, 6.0])
  z = diffusion.diffuse(x, logsnr, eps)
  alpha, sigma = _np_alpha_sigma(logsnr)
  xn, en, vn, zn = (np.asarray(a, np.float64) for a in (x, eps, v_pred, z))
  eps_hat = sigma * zn + alpha * vn

  @jax.jit
  def both(x, eps, z, logsnr, v_pred):
    return (diffusion.per_example_loss(x, eps, z, logsnr, v_pred, loss_type="eps_mse")[0],
            diffusion.per_example_loss(x, eps, z, logsnr, v_pred, loss_type="v_mse",
                                       multiscale=True, multiscale_base=2))

  got, (got_ms, terms) = both(x, eps, z, logsnr, v_pred)
  np.testing.assert_allclose(got, np.mean((en - eps_hat)**2, axis=(1, 2, 3)), rtol=1e-5)
  got = got_ms
  v = alpha * en - sigma * xn
  np.testing.assert_allclose(got, np_multiscale(v, vn, 2), rtol=1e-5)
  assert sorted(terms) == [2, 4, 8]
  with pytest.raises(UserError, match="loss_type"):
    diffusion.per_example_loss(x, eps, z, logsnr, v_pred, loss_type="l1")
