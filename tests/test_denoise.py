"""eval.denoise: per-logSNR x-prediction errors against closed forms (Gaussian data). Its CLI on a
real (tiny) trained run is in tests/test_eval_worker.py, beside that module's trained run."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from core import diffusion
from eval import denoise


def test_errors_equal_the_gaussian_closed_forms():
  """x ~ N(0, s^2) per pixel: the Bayes denoiser x_hat = alpha s^2 / (alpha^2 s^2 + sigma^2) z has
  MSE s^2 sigma^2 / (alpha^2 s^2 + sigma^2); alpha z has (1 - alpha^2)^2 s^2 + alpha^2 sigma^2; the
  mean image has s^2 (1 - 1/B)."""
  s, b = 0.5, 512
  x = s * jax.random.normal(jax.random.key(1), (b, 8, 8, 3))

  def bayes_v(z, logsnr):
    a2 = jax.nn.sigmoid(logsnr)[:, None, None, None]
    x_hat = jnp.sqrt(a2) * s ** 2 / (a2 * s ** 2 + (1 - a2)) * z
    return diffusion.v_from_x(z, x_hat, logsnr)

  rows = denoise.denoise_errors(bayes_v, x, [-5.0, 0.0, 3.0], jax.random.key(2))
  for r in rows:
    a2 = float(jax.nn.sigmoid(r["logsnr"]))
    s2 = 1 - a2
    np.testing.assert_allclose(r["mse_model"], s ** 2 * s2 / (a2 * s ** 2 + s2), rtol=0.03)
    np.testing.assert_allclose(r["mse_alpha_z"], (1 - a2) ** 2 * s ** 2 + a2 * s2, rtol=0.03)
    np.testing.assert_allclose(r["mse_data_mean"], s ** 2 * (1 - 1 / b), rtol=0.03)
  # The verdict the CLI prints: where the input informs (logSNR 0, 3) the Bayes denoiser beats
  # both baselines; a model that copies its input (v = 0: x_hat = alpha z) loses to one.
  lines = denoise.format_rows(rows).splitlines()[1:]
  assert "beats both" in lines[1] and "beats both" in lines[2]
  copy = denoise.denoise_errors(lambda z, logsnr: jnp.zeros_like(z), x, [0.0], jax.random.key(2))
  assert "loses" in denoise.format_rows(copy).splitlines()[1]


def test_a_swapped_condition_costs_its_closed_form():
  """x = mu_i + s n with a per-example mean mu_i (the "condition"): the Bayes denoiser told mu_i
  has MSE s^2 sigma^2 / (alpha^2 s^2 + sigma^2); told the next example's mu, it pays in addition
  (1 - k alpha)^2 mean((mu' - mu)^2), k = alpha s^2 / (alpha^2 s^2 + sigma^2)."""
  s, b = 0.3, 512
  mu = jax.random.uniform(jax.random.key(3), (b, 1, 1, 3), minval=-0.6, maxval=0.6)
  x = mu + s * jax.random.normal(jax.random.key(4), (b, 8, 8, 3))

  def told(m):
    def v_fn(z, logsnr):
      a2 = jax.nn.sigmoid(logsnr)[:, None, None, None]
      k = jnp.sqrt(a2) * s ** 2 / (a2 * s ** 2 + (1 - a2))
      return diffusion.v_from_x(z, m + k * (z - jnp.sqrt(a2) * m), logsnr)
    return v_fn

  swapped = jnp.roll(mu, 1, axis=0)
  rows = denoise.denoise_errors(told(mu), x, [-3.0, 0.0, 2.0], jax.random.key(5),
                                others={"swapped": told(swapped)})
  for r in rows:
    a2 = float(jax.nn.sigmoid(r["logsnr"]))
    k = a2 ** 0.5 * s ** 2 / (a2 * s ** 2 + 1 - a2)
    own = s ** 2 * (1 - a2) / (a2 * s ** 2 + 1 - a2)
    np.testing.assert_allclose(r["mse_model"], own, rtol=0.03)
    extra = (1 - k * a2 ** 0.5) ** 2 * float(jnp.mean((swapped - mu) ** 2))
    np.testing.assert_allclose(r["mse_swapped"], own + extra, rtol=0.03)
  assert "own / swapped condition 0." in denoise.format_rows(rows).splitlines()[1]
