"""The paper's sample metrics in one call: FID train, FID eval and Inception Score (Tables 2-9).

FID train compares samples with training-set statistics, FID eval with the evaluation split
(ImageNet: 50K validation images); IS is mean +- std over splits. Features come from one
eval.inception.FeatureExtractor, whose ``name`` the caller records with each result.
:func:`sample_metrics` adds what small-n evaluations need: each FID with a bootstrap std over
samples, and KID (unbiased, std over subsets) against each reference that carries features.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import UserError
from eval.fid import (bootstrap_fid, check_convention, feature_stats, fid_from_features,
                      frechet_distance)
from eval.kid import kid
from eval.inception_score import inception_score, softmax

Stats = tuple[np.ndarray, np.ndarray]


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


def compute_metrics(images_uint8: Any, *, extractor, ref_train: Stats | None = None,
                    ref_eval: Stats | None = None, is_splits: int = 10) -> dict[str, Any]:
  """FID against each given reference and IS of uint8 NHWC samples.

  Returns {'fid_train': float | None, 'fid_eval': float | None, 'is': (mean, std) | None}; an entry
  is None when its reference is not given or, for IS, when the extractor has no logits
  (extractor.has_logits is False: IS is then unavailable, never approximated).
  """
  images = validate_images(images_uint8)
  if getattr(extractor, "has_logits", False) and len(images) < is_splits:
    raise UserError(f"Inception Score with is_splits={is_splits} needs at least {is_splits} "
                    f"samples; got {len(images)} (lower is_splits or evaluate more samples)")
  features, logits = extractor.features(images)
  mu, sigma = feature_stats(features)
  result: dict[str, Any] = {"fid_train": None, "fid_eval": None, "is": None}
  for key, ref in (("fid_train", ref_train), ("fid_eval", ref_eval)):
    if ref is not None:
      result[key] = frechet_distance(mu, sigma, ref[0], ref[1])
  if logits is not None:
    result["is"] = inception_score(softmax(logits), splits=is_splits)
  return result


def sample_metrics(features: np.ndarray, logits: np.ndarray | None, references: dict[str, Any], *,
                   provenance: dict[str, Any], is_splits: int = 10, bootstrap: int = 20,
                   seed: int = 0) -> dict[str, tuple[float, float | None, str | None]]:
  """Every metric of one set of sample features: {metric: (value, std, std_kind)}.

  Args:
    features: pool3 features [n, 2048] of the samples; logits: [n, C] or None (no IS).
    references: {'train': Reference, 'eval': Reference} (eval.reference.Reference); each gives
      ``fid_<split>`` (std: bootstrap over samples, ``bootstrap`` resamples; 0 = no spread) and,
      when it carries features, ``kid_<split>`` (std over subsets).
    provenance: the samples' {'extractor', 'resize_mode'}: a reference of another convention is
      refused (eval.fid.check_convention).
  """
  out: dict[str, tuple[float, float | None, str | None]] = {}
  for split, ref in references.items():
    check_convention(provenance, ref.meta, what=ref.description)
    value = fid_from_features(features, ref.mu, ref.sigma)
    std = (float(np.std(bootstrap_fid(features, ref.mu, ref.sigma, num_resamples=bootstrap,
                                      seed=seed))) if bootstrap > 1 else None)
    out[f"fid_{split}"] = (value, std, "bootstrap" if std is not None else None)
    if ref.features is not None and len(ref.features) >= 2:
      k, k_std = kid(features, ref.features, seed=seed)
      out[f"kid_{split}"] = (k, k_std, "subsets")
  if logits is not None:
    if len(logits) < is_splits:
      raise UserError(f"Inception Score with is_splits={is_splits} needs at least {is_splits} "
                      f"samples; got {len(logits)} (lower is_splits or evaluate more samples)")
    m, s = inception_score(softmax(logits), splits=is_splits)
    out["is"] = (m, s, "splits")
  return out
