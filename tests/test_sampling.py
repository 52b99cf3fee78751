"""DDPM sampler against the Gaussian posterior of Eq. 3, end to end on a tiny data set, guidance."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import diffusion, sampling, schedules
from core.errors import UserError


def np_posterior(z_t, x, logsnr_t, logsnr_s):
  """q(z_s | z_t, x) from first principles (Eqs. 2-3), float64."""
  a2 = lambda l: 1 / (1 + np.exp(-l))
  alpha_t, alpha_s = np.sqrt(a2(logsnr_t)), np.sqrt(a2(logsnr_s))
  sig2_t, sig2_s = 1 - a2(logsnr_t), 1 - a2(logsnr_s)
  alpha_ts = alpha_t / alpha_s
  sig2_ts = sig2_t - alpha_ts**2 * sig2_s  # Forward transition variance of Eq. 2.
  mean = alpha_ts * sig2_s / sig2_t * z_t + alpha_s * sig2_ts / sig2_t * x
  var = sig2_ts * sig2_s / sig2_t
  return mean, var, sig2_ts


# (logsnr_t, logsnr_s) pairs from the default schedule: an early, a middle and a late step.
PAIRS = [tuple(float(l) for l in schedules.logsnr_cosine(np.array(ts)))
         for ts in ((1.0, 0.99), (0.5, 0.45), (0.02, 0.0))]


@pytest.mark.parametrize("logsnr_t,logsnr_s", PAIRS)
@pytest.mark.parametrize("noise_param", [0.0, 0.2, 1.0])
def test_step_matches_posterior(logsnr_t, logsnr_s, noise_param):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.uniform(k1, (1, 4, 4, 1), minval=-1, maxval=1)
  z_t = jax.random.normal(k2, x.shape)
  mean_np, var_post, var_upper = np_posterior(np.asarray(z_t, np.float64),
                                              np.asarray(x, np.float64), logsnr_t, logsnr_s)
  # noise_param=0: posterior variance; 1: sigma_{t|s}^2; between: geometric interpolation.
  var_np = np.exp(noise_param * np.log(var_upper) + (1 - noise_param) * np.log(var_post))
  mean, lvar, zs = _posterior_and_samples(z_t, x, logsnr_t, logsnr_s, noise_param)
  np.testing.assert_allclose(mean, mean_np, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.exp(np.asarray(lvar, np.float64)), var_np, rtol=1e-3)
  # Empirical mean and variance of the sampled step (noise on).
  zs = np.asarray(zs, np.float64)  # [n, 1, 4, 4, 1]
  n = zs.shape[0]
  np.testing.assert_allclose(zs.mean(0), mean_np, atol=5 * np.sqrt(var_np / n) + 1e-6)
  np.testing.assert_allclose(zs.var(0).mean(), var_np, rtol=0.05)


@jax.jit
def _posterior_and_samples(z_t, x, logsnr_t, logsnr_s, noise_param):
  """ddpm_posterior and 4000 ddpm_step draws; one compilation for all parameters."""
  mean, lvar = sampling.ddpm_posterior(z_t, x, logsnr_t, logsnr_s, noise_param)
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  zs = jax.vmap(lambda k: sampling.ddpm_step(z_t, x, logsnr_t, logsnr_s, k, noise_param))(keys)
  return mean, lvar, zs


def test_posterior_composes_to_marginal():
  # z_t ~ q(z_t | x), z_s ~ q(z_s | z_t, x)  =>  z_s ~ q(z_s | x) = N(alpha_s x, sigma_s^2).
  n, lt, ls = 20000, -1.0, 2.0
  x = jnp.full((n, 1, 1, 1), 0.6)
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  z_t = diffusion.diffuse(x, lt, jax.random.normal(k1, x.shape))
  z_s = np.asarray(sampling.ddpm_step(z_t, x, lt, ls, k2, noise_param=0.0), np.float64)
  a2 = 1 / (1 + np.exp(-ls))
  np.testing.assert_allclose(z_s.mean(), np.sqrt(a2) * 0.6, atol=0.02)
  np.testing.assert_allclose(z_s.var(), 1 - a2, rtol=0.04)


DATA = np.array([[-0.8, 0.6, 0.2, -0.4], [0.7, 0.7, -0.7, -0.7], [0.0, -0.9, 0.9, 0.0],
                 [0.5, -0.3, -0.5, 0.8]], np.float32).reshape(4, 2, 2, 1)


def exact_v_fn(z, logsnr):
  """E[x | z_t] for the uniform distribution on DATA, as a v-prediction."""
  data = jnp.asarray(DATA)
  alpha, sigma = schedules.alpha_sigma(logsnr)  # [B]
  sq = jnp.sum((z[:, None] - alpha[:, None, None, None, None] * data[None])**2, axis=(2, 3, 4))
  w = jax.nn.softmax(-sq / (2 * sigma[:, None]**2), axis=1)  # Gaussian likelihood of each point.
  x_hat = jnp.einsum("bk,khwc->bhwc", w, data)
  return diffusion.v_from_x(z, x_hat, logsnr)


@pytest.mark.parametrize("logsnr_fn,noise_param", [
    (schedules.logsnr_cosine, 0.2),
    (functools.partial(schedules.logsnr_shifted, image_d=2, noise_d=1), 1.0),
])
def test_exact_denoiser_samples_land_on_data(logsnr_fn, noise_param):
  n = 256
  sample = jax.jit(functools.partial(sampling.ddpm_sample, exact_v_fn, shape=(n, 2, 2, 1),
                                     logsnr_fn=logsnr_fn, num_steps=128, noise_param=noise_param))
  x = np.asarray(sample(jax.random.PRNGKey(3)), np.float64)
  assert np.all(np.abs(x) <= 1.0)
  dist = np.sqrt(((x[:, None] - DATA[None])**2).sum(axis=(2, 3, 4)))  # [n, 4]
  assert dist.min(axis=1).max() < 0.02
  counts = np.bincount(dist.argmin(axis=1), minlength=4)
  assert np.all(counts > n / 4 * 0.6) and np.all(counts < n / 4 * 1.4), counts


def test_sampler_traces_model_twice_any_num_steps():
  traces = []

  def v_fn(z, logsnr):
    traces.append(1)
    return exact_v_fn(z, logsnr)

  for num_steps, lowest_idx in ((1, 0), (7, 1)):
    traces.clear()
    out = jax.jit(functools.partial(sampling.ddpm_sample, v_fn, shape=(3, 2, 2, 1),
                                    logsnr_fn=schedules.logsnr_cosine, num_steps=num_steps,
                                    lowest_idx=lowest_idx))(jax.random.PRNGKey(4))
    assert out.shape == (3, 2, 2, 1) and np.all(np.isfinite(out))
    assert len(traces) == 2


def test_clipping_every_step():
  # The model predicts x_hat = 3 at every step but the last (logsnr = 15 at t = 0), where it
  # predicts z / 2. Clipping at every step pulls z_0 to ~1, so the result is ~0.5; clipping only the
  # final prediction would give clip(3 / 2) = 1, no clipping gives 1.5.
  def v_fn(z, logsnr):
    x_hat = jnp.where(logsnr[:, None, None, None] > 14.0, 0.5 * z, 3.0)
    return diffusion.v_from_x(z, x_hat, logsnr)

  kw = dict(rng=jax.random.PRNGKey(7), shape=(2, 2, 2, 1), logsnr_fn=schedules.logsnr_cosine,
            num_steps=3)
  run = jax.jit(lambda: (sampling.ddpm_sample(v_fn, **kw),
                         sampling.ddpm_sample(v_fn, clip_x=False, **kw),
                         sampling.ddpm_sample(v_fn, dynamic_clip=0.9, **kw)))
  static, unclipped, dynamic = run()
  np.testing.assert_allclose(static, 0.5, atol=1e-2)
  np.testing.assert_allclose(unclipped, 1.5, atol=1e-2)
  np.testing.assert_allclose(dynamic, 0.5, atol=1e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps"), (dict(num_steps=-3), "num_steps"),
    (dict(num_steps=2.5), "num_steps"), (dict(num_steps=4, lowest_idx=2), "lowest_idx"),
    (dict(num_steps=4, noise_param=1.5), "noise_param"),
    (dict(num_steps=4, dynamic_clip=1.5), "dynamic_clip"),
])
def test_bad_sampler_settings(kwargs, match):
  with pytest.raises(UserError, match=match) as e:
    sampling.ddpm_sample(exact_v_fn, jax.random.PRNGKey(0), (1, 2, 2, 1),
                         logsnr_fn=schedules.logsnr_cosine, **kwargs)
  assert match in str(e.value).splitlines()[0]


def test_dynamic_clip_against_numpy():
  x = np.array([[0.2, -0.5, 3.0, -2.0], [0.1, 0.9, -0.3, 0.4]], np.float32).reshape(2, 2, 2, 1)
  got = np.asarray(sampling.clip_dynamic(jnp.asarray(x), 0.75))
  for i in range(2):
    s = max(1.0, np.quantile(np.abs(x[i]), 0.75))
    np.testing.assert_allclose(got[i], np.clip(x[i], -s, s) / s, rtol=1e-6)
  np.testing.assert_allclose(got[1], x[1])  # Within [-1, 1]: unchanged.


@pytest.mark.parametrize("w", [1.0, 1.5, 3.0, 0.0])
def test_guidance_same_in_eps_v_x(w):
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  z = jax.random.normal(ks[0], (3, 4, 4, 2))
  logsnr = jnp.asarray([-3.0, 0.5, 4.0])
  v_c, v_u = jax.random.normal(ks[1], z.shape), jax.random.normal(ks[2], z.shape)
  g_v = sampling.guided(v_c, v_u, w)
  for p in ("eps", "x"):
    c, u = (diffusion.convert(a, z, logsnr, "v", p) for a in (v_c, v_u))
    np.testing.assert_allclose(diffusion.convert(sampling.guided(c, u, w), z, logsnr, p, "v"), g_v,
                               atol=2e-4, rtol=1e-4)
  # Eq. 7 with w = 1 + eta: (1 + eta) cond - eta uncond.
  eta = w - 1
  np.testing.assert_allclose(g_v, (1 + eta) * v_c - eta * v_u, atol=1e-6)


def test_guided_v_fn_batches_cond_and_null():
  num_classes = 3
  calls = []

  def model_fn(z, logsnr, label):
    calls.append(z.shape[0])
    return z * (label[:, None, None, None].astype(jnp.float32) + 1.0) + logsnr[:, None, None, None]

  z = jax.random.normal(jax.random.PRNGKey(6), (2, 2, 2, 1))
  logsnr = jnp.asarray([0.5, -1.0])
  label = jnp.asarray([0, 2], jnp.int32)
  null = jnp.full_like(label, num_classes)
  want = 2.5 * model_fn(z, logsnr, label) - 1.5 * model_fn(z, logsnr, null)
  calls.clear()
  got = sampling.guided_v_fn(model_fn, label, null, 2.5)(z, logsnr)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert calls == [4]  # One call of batch 2B.
  np.testing.assert_allclose(sampling.guided_v_fn(model_fn, label, null, 1.0)(z, logsnr),
                             model_fn(z, logsnr, label))
