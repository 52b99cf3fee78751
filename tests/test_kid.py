"""eval.kid: KID against clean-fid's kernel_distance and a direct O(n^2) float64 formula."""
from __future__ import annotations

import ast
import importlib.util
import os

import numpy as np
import pytest

from core.errors import UserError
from eval.kid import kid, kid_subsets


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with k(a, b) = (a.b/d + 1)^3, by loops."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  d = x.shape[1]
  k = lambda a, b: (float(a @ b) / d + 1.0) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return kxx + kyy - 2 * kxy


def test_all_features_in_one_subset_equal_the_direct_formula():
  rng = np.random.default_rng(0)
  x = np.abs(rng.normal(size=(30, 16)))
  y = np.abs(rng.normal(0.3, 1.2, size=(30, 16)))
  # m = n: every subset is a permutation of all features, and MMD^2 is permutation invariant.
  values = kid_subsets(x, y, num_subsets=3, max_subset_size=1000)
  np.testing.assert_allclose(values, direct_mmd2(x, y), rtol=1e-12)


def clean_fid_kernel_distance():
  """clean-fid's own ``kernel_distance``, taken from its installed source (cleanfid.fid imports
  torchvision at the top, which this environment does not need otherwise)."""
  spec = importlib.util.find_spec("cleanfid")
  if spec is None:
    pytest.skip("clean-fid is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "fid.py")
  tree = ast.parse(open(path, encoding="utf-8").read())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "kernel_distance")
  scope = {"np": np}
  exec(compile(ast.Module([fn], []), path, "exec"), scope)  # pylint: disable=exec-used
  return scope["kernel_distance"]


def test_matches_clean_fid_kernel_distance():
  kernel_distance = clean_fid_kernel_distance()
  rng = np.random.default_rng(1)
  a = np.abs(rng.normal(size=(120, 64)))  # float64: clean-fid's sums lose ~1e-5 in float32
  b = np.abs(rng.normal(0.2, 1.0, size=(90, 64)))
  np.random.seed(7)  # clean-fid draws from the global RNG, in the order kid_subsets follows
  theirs = kernel_distance(a, b, num_subsets=10, max_subset_size=50)
  ours, std = kid(a, b, num_subsets=10, max_subset_size=50, seed=7)
  assert ours == pytest.approx(theirs, rel=1e-10)
  assert std > 0


def test_unbiased_near_zero_for_the_same_distribution_and_positive_otherwise():
  rng = np.random.default_rng(2)
  same = [kid(np.abs(rng.normal(size=(200, 32))), np.abs(rng.normal(size=(200, 32))),
              num_subsets=20)[0] for _ in range(5)]
  assert abs(np.mean(same)) < 3 * np.std(same) + 1e-4
  shifted, std = kid(np.abs(rng.normal(size=(200, 32))), np.abs(rng.normal(0.5, 1, size=(200, 32))),
                     num_subsets=20)
  assert shifted > 10 * max(abs(np.mean(same)), std)


def test_bad_shapes_are_one_line_errors():
  with pytest.raises(UserError, match="dimensions differ") as e:
    kid(np.zeros((4, 3)), np.zeros((4, 5)))
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"N >= 2"):
    kid(np.zeros((1, 3)), np.zeros((4, 3)))
