"""The paper's sample metrics as small evaluators: FID train / FID eval, KID, IS (Tables 2-9).

Each evaluator is built once per evaluation and called on the samples' Inception features (and
logits), yielding (name, value) pairs: ``fid_<split>`` against one reference split (ImageNet
train statistics, or the 50K validation images for FID eval) with ``fid_<split>_std`` from a
bootstrap over samples; ``kid_<split>`` (unbiased, the small-n metric) with its std over subsets;
``is`` with ``is_std`` over splits. eval.worker orchestrates: it samples, extracts features once
and records what the evaluators yield.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from core.errors import UserError
from eval.fid import bootstrap_fid, check_convention, fid_from_features
from eval.kid import kid
from eval.inception_score import inception_score, softmax

# How each metric's ``<name>_std`` is computed (recorded as the row's std_kind).
STD_KIND = {"fid": "bootstrap", "kid": "subsets", "is": "splits", "clip_score": "sem"}
Pairs = Iterator[tuple[str, float]]


def std_kind(metric: str) -> str | None:
  """How ``metric``'s std is computed (fid_train -> 'bootstrap', clip_score -> 'sem', ...)."""
  return next((kind for prefix, kind in STD_KIND.items()
               if metric == prefix or metric.startswith(prefix + "_")), None)


def validate_images(images: Any, min_count: int = 2) -> np.ndarray:
  """Returns ``images`` as a numpy uint8 [N, H, W, 3] array (N >= min_count), or raises a UserError
  naming that shape."""
  x = np.asarray(images)
  shape = list(x.shape)
  if x.dtype != np.uint8:
    raise UserError(f"samples must be uint8 images of shape [N, H, W, 3] with values 0..255; got "
                    f"{x.dtype} {shape} (convert with np.clip(np.round((x + 1) * 127.5), 0, "
                    f"255).astype(np.uint8))")
  if x.ndim != 4 or x.shape[-1] != 3:
    hint = " (channels first? transpose to NHWC)" if x.ndim == 4 and x.shape[1] == 3 else ""
    raise UserError(f"samples must be uint8 images of shape [N, H, W, 3] (NHWC, RGB); got "
                    f"{shape}{hint}")
  if x.shape[0] < min_count or x.shape[1] < 1 or x.shape[2] < 1:
    raise UserError(f"samples must be uint8 images of shape [N, H, W, 3] with N >= {min_count}; "
                    f"got {shape}")
  return x


class Fid:
  """FID of the samples against one reference split, and a bootstrap std over samples."""

  def __init__(self, split: str, reference, *, provenance: dict[str, Any], bootstrap: int = 20,
               seed: int = 0):
    check_convention(provenance, reference.meta, what=reference.description)
    self.split, self.reference, self.bootstrap, self.seed = split, reference, bootstrap, seed

  def __call__(self, features: np.ndarray, logits: np.ndarray | None = None) -> Pairs:
    ref = self.reference
    yield f"fid_{self.split}", fid_from_features(features, ref.mu, ref.sigma)
    if self.bootstrap > 1:
      spread = bootstrap_fid(features, ref.mu, ref.sigma, num_resamples=self.bootstrap,
                             seed=self.seed)
      yield f"fid_{self.split}_std", float(np.std(spread))


class Kid:
  """KID (unbiased squared MMD, cubic kernel) against one reference split's features."""

  def __init__(self, split: str, reference, *, provenance: dict[str, Any], seed: int = 0):
    check_convention(provenance, reference.meta, what=reference.description)
    self.split, self.reference, self.seed = split, reference, seed

  def __call__(self, features: np.ndarray, logits: np.ndarray | None = None) -> Pairs:
    value, std = kid(features, self.reference.features, seed=self.seed)
    yield f"kid_{self.split}", value
    yield f"kid_{self.split}_std", std


class InceptionScore:
  """Inception Score, mean and std over ``splits`` splits of the samples' logits."""

  def __init__(self, splits: int = 10):
    self.splits = splits

  def __call__(self, features: np.ndarray, logits: np.ndarray | None = None) -> Pairs:
    if logits is None:
      raise UserError("Inception Score needs the classifier's logits; this extractor has none "
                      "(use one with a logits head, or leave IS out)")
    if len(logits) < self.splits:
      raise UserError(f"Inception Score with is_splits={self.splits} needs at least {self.splits} "
                      f"samples; got {len(logits)} (lower is_splits or evaluate more samples)")
    mean, std = inception_score(softmax(logits), splits=self.splits)
    yield "is", mean
    yield "is_std", std


def evaluators(references: dict[str, Any], *, provenance: dict[str, Any], has_logits: bool,
               is_splits: int = 10, bootstrap: int = 20, seed: int = 0) -> list:
  """FID per reference split, KID where the reference carries features, IS where the extractor
  has logits (never approximated without them)."""
  out: list = []
  for split, ref in references.items():
    out.append(Fid(split, ref, provenance=provenance, bootstrap=bootstrap, seed=seed))
    if ref.features is not None and len(ref.features) >= 2:
      out.append(Kid(split, ref, provenance=provenance, seed=seed))
  if has_logits:
    out.append(InceptionScore(is_splits))
  return out

