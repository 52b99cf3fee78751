"""Inception Score (Salimans et al. 2016), reported by the paper as mean +- std over splits.

IS = exp(E_x KL(p(y|x) || p(y))), computed on each of ``splits`` consecutive, equal parts of the
samples with p(y) the mean prediction of that part; the result is the mean and (population)
standard deviation of the per-part scores, as in the original TF code and its StyleGAN port.
The class probabilities are the softmax of the Inception logits (eval.inception; no output bias).
"""
from __future__ import annotations

import numpy as np
from scipy.special import xlogy

from core.errors import UserError


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) of exp(mean KL(p(y|x) || p(y))) over ``splits`` parts of probs [N, classes]."""
  p = np.asarray(probs, np.float64)
  if p.ndim != 2:
    raise UserError(f"inception_score needs probabilities of shape [N, classes]; got "
                    f"{list(p.shape)}")
  if splits < 1 or p.shape[0] < splits:
    raise UserError(f"inception_score with splits={splits} needs at least {max(splits, 1)} "
                    f"samples; got {p.shape[0]} (lower is_splits or evaluate more samples)")
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
    raise UserError("inception_score needs class probabilities (rows >= 0 summing to 1); apply "
                    "eval.inception_score.softmax to logits first")
  n = p.shape[0]
  scores = []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits]
    py = part.mean(axis=0, keepdims=True)
    kl = np.sum(xlogy(part, part) - xlogy(part, py), axis=1)  # 0 log 0 = 0
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))
