"""5/3 DWT against PyWavelets 'bior2.2' and the JPEG2000 lifting steps; exact inverse; layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from core.errors import UserError
from core.models import patching
from core.models.patching import (
    PatchIn, PatchOut, depth_to_space, lift53, parse_patching, space_to_depth)

# Jitted once per shape: op-by-op dispatch of the lifting steps is slow on a shared CPU.
dwt53 = jax.jit(patching.dwt53, static_argnums=1)
idwt53 = jax.jit(patching.idwt53, static_argnums=1)


def _lifting_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """JPEG2000 5/3 lifting on a 1-D signal, written out sample by sample (ISO 15444-1 F.3.8)."""
  n = len(x)
  ext = lambda i: x[-i] if i < 0 else (x[2 * (n - 1) - i] if i >= n else x[i])  # whole-sample
  d = np.array([x[2 * k + 1] - 0.5 * (ext(2 * k) + ext(2 * k + 2)) for k in range(n // 2)])
  dext = lambda k: d[-k - 1] if k < 0 else d[k]   # d[-1] = d[0] under the same extension
  s = np.array([x[2 * k] + 0.25 * (dext(k - 1) + d[k]) for k in range(n // 2)])
  return s, d


def test_1d_lifting_matches_jpeg2000_steps_and_pywavelets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 20))
  s, d = jax.jit(lift53, static_argnums=1)(jnp.asarray(x, jnp.float32), 1)
  for row in range(3):
    s_ref, d_ref = _lifting_reference(x[row])
    np.testing.assert_allclose(s[row], s_ref, atol=1e-5)
    np.testing.assert_allclose(d[row], d_ref, atol=1e-5)
    # PyWavelets 'bior2.2' with whole-sample symmetric extension ('reflect'): same transform up
    # to normalisation (cA = sqrt2 s, cD = -d / sqrt2) and one extra boundary coefficient.
    ca, cd = pywt.dwt(x[row], "bior2.2", mode="reflect")
    np.testing.assert_allclose(s[row], ca[1:11] / np.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(d[row], -cd[1:11] * np.sqrt(2), atol=1e-5)
    # Periodization differs only at the borders: the interior agrees too.
    ca_p, cd_p = pywt.dwt(x[row], "bior2.2", mode="periodization")
    np.testing.assert_allclose(s[row][1:-1], ca_p[1:-1] / np.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(d[row][1:-1], -cd_p[1:-1] * np.sqrt(2), atol=1e-5)


def test_one_level_2d_matches_pywavelets_subbands():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 16, 12, 3)).astype(np.float32)
  y = np.asarray(dwt53(jnp.asarray(x), 1))
  assert y.shape == (2, 8, 6, 12)
  ll, lh, hl, hh = np.split(y, 4, axis=-1)          # [LL, LH, HL, HH] x C channels
  ca, (ch, cv, cd) = pywt.dwt2(x, "bior2.2", mode="reflect", axes=(1, 2))
  sl = (slice(None), slice(1, 9), slice(1, 7))
  np.testing.assert_allclose(ll, ca[sl] / 2, atol=1e-5)
  np.testing.assert_allclose(lh, -ch[sl], atol=1e-5)
  np.testing.assert_allclose(hl, -cv[sl], atol=1e-5)
  np.testing.assert_allclose(hh, 2 * cd[sl], atol=1e-5)


def test_two_level_layout_coarse_bands_then_space_to_depth_details():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 16, 16, 2)).astype(np.float32)
  y = np.asarray(dwt53(jnp.asarray(x), 2))
  assert y.shape == (1, 4, 4, 2 * 16)
  one = np.asarray(dwt53(jnp.asarray(x), 1))               # level-1 bands at 8x8
  two = np.asarray(dwt53(jnp.asarray(one[..., :2]), 1))   # level 2 from LL1
  np.testing.assert_allclose(y[..., :8], two, atol=1e-6)  # coarsest LL, LH, HL, HH
  fine = np.asarray(space_to_depth(jnp.asarray(one[..., 2:]), 2))
  # Each finer band is space-to-depth'ed separately: [s2d(LH1), s2d(HL1), s2d(HH1)].
  for b in range(3):
    band = one[..., 2 + 2 * b: 4 + 2 * b]
    np.testing.assert_allclose(y[..., 8 + 8 * b: 16 + 8 * b],
                               np.asarray(space_to_depth(jnp.asarray(band), 2)), atol=1e-6)
  assert fine.shape == (1, 4, 4, 24)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_dwt_exactly_invertible(levels):
  rng = np.random.default_rng(levels)
  x = rng.normal(size=(2, 32, 24, 3)).astype(np.float32)
  y = dwt53(jnp.asarray(x), levels)
  f = 2 ** levels
  assert y.shape == (2, 32 // f, 24 // f, 3 * 4 ** levels)
  np.testing.assert_allclose(np.asarray(idwt53(y, levels)), x, atol=2e-5)


def test_space_to_depth_round_trip():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  for f in (1, 2, 4):
    assert np.array_equal(np.asarray(depth_to_space(space_to_depth(x, f), f)), np.asarray(x))


def test_dwt_is_linear_and_lowpass_keeps_constants():
  """JPEG2000 normalisation: a constant image gives LL = constant, all details 0."""
  x = jnp.full((1, 8, 8, 1), 0.7)
  y = np.asarray(dwt53(x, 2))
  np.testing.assert_allclose(y[..., 0], 0.7, atol=1e-6)
  np.testing.assert_allclose(y[..., 1:], 0.0, atol=1e-6)


def test_parse_patching_spellings_and_errors():
  assert parse_patching("none").factor == 1
  assert parse_patching("dwt_2") == parse_patching("dwt_5/3_2")
  assert parse_patching("dwt_5/3_2").factor == 4
  assert parse_patching("conv_4").factor == 4
  assert parse_patching("dwt_1").channels(3) == 12
  for bad in ("dwt", "dwt_0", "conv_1", "wavelet_2", "patch_4"):
    with pytest.raises(UserError, match="patching_type"):
      parse_patching(bad)
  with pytest.raises(UserError, match="divisible"):
    patching.dwt53(jnp.zeros((1, 12, 12, 3)), 3)


@pytest.mark.parametrize("ptype,shape", [("none", (1, 16, 16, 8)), ("dwt_2", (1, 4, 4, 8)),
                                         ("conv_4", (1, 4, 4, 8))])
def test_patch_in_out_shapes(ptype, shape):
  x = jnp.ones((1, 16, 16, 3))
  pin, pout = PatchIn(ptype, 8), PatchOut(ptype, 3)
  h, _ = jax.eval_shape(pin.init_with_output, jax.random.key(0), x)
  assert h.shape == shape
  y, _ = jax.eval_shape(pout.init_with_output, jax.random.key(1), h)
  assert y.shape == x.shape and y.dtype == jnp.float32
