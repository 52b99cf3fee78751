"""eval.inception_score against its closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from core.errors import UserError
from eval.inception_score import inception_score, softmax


def entropy(p: np.ndarray) -> np.ndarray:
  return -np.sum(scipy.special.xlogy(p, p), axis=-1)


def test_uniform_predictions_score_one():
  mean, std = inception_score(np.full((100, 1008), 1 / 1008), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 1000])
def test_confident_balanced_predictions_over_k_classes_score_k(k):
  splits = 10
  labels = np.arange(splits * k * 2) % k  # every split holds each class twice
  probs = np.eye(1008)[labels]
  mean, std = inception_score(probs, splits=splits)
  assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_confident_imbalanced_predictions_score_exp_entropy_of_class_frequencies():
  freq = np.array([0.5, 0.25, 0.125, 0.125])
  probs = np.eye(10)[np.repeat(np.arange(4), (freq * 64).astype(int))]
  mean, std = inception_score(probs, splits=1)
  assert mean == pytest.approx(np.exp(entropy(freq)), rel=1e-12) and std == 0.0


def test_equals_exp_of_marginal_entropy_minus_mean_conditional_entropy():
  # E_x KL(p(y|x) || p(y)) = H(p(y)) - E_x H(p(y|x)), an independent form of each split's score.
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(20, 0.3), size=103)
  splits = 4
  n = len(probs)
  per_split = [np.exp(entropy(part.mean(0)) - entropy(part).mean())
               for part in (probs[i * n // splits:(i + 1) * n // splits] for i in range(splits))]
  mean, std = inception_score(probs, splits=splits)
  assert mean == pytest.approx(np.mean(per_split), rel=1e-12)
  assert std == pytest.approx(np.std(per_split), rel=1e-9)


def test_softmax_matches_scipy_and_is_stable():
  logits = np.random.default_rng(1).normal(scale=30, size=(5, 1008)).astype(np.float32)
  p = softmax(logits)
  np.testing.assert_allclose(p, scipy.special.softmax(logits.astype(np.float64), axis=1), rtol=1e-12, atol=1e-300)
  assert np.all(np.isfinite(softmax(logits * 1e3)))


def test_bad_inputs_are_user_errors():
  logits = np.random.default_rng(2).normal(size=(20, 10))
  with pytest.raises(UserError, match="softmax"):
    inception_score(logits)
  with pytest.raises(UserError, match="at least 10 samples"):
    inception_score(np.full((5, 3), 1 / 3), splits=10)
  with pytest.raises(UserError, match=r"\[N, classes\]"):
    inception_score(np.full(30, 1 / 30))
