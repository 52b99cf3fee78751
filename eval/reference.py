"""FID reference statistics (mu, sigma) of a prepared data set's splits, cached beside the data.

FID train and FID eval (Section 5) compare samples with the 'train' and 'eval' splits. Each
split's statistics are computed once per extractor and resize mode (streamed in batches) and
cached as ``<data_dir>/fid_stats/<split>_<extractor>_<resize>.npz`` with their provenance; an
external .npz (e.g. ADM's reference batches) declares its convention.

    python -m eval.reference data_dir=DIR split=train [source=auto ...]
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from core.cli import Option, parse, parse_bool
from core.data.pipeline import iter_split
from core.errors import UserError, run_main
from core.io import storage
from eval.fid import (RunningStats, _read_npz, check_convention, feature_stats, load_stats,
                      load_stats_meta, psd_sqrt, remember_sqrt, save_stats)
from eval.inception import RESIZE_MODES, FeatureExtractor
from eval.metrics import validate_images

PROVENANCE = ("extractor", "resize_mode", "num_images", "split")
ADM_EXTRACTOR = "tf:inception-2015-12-05"  # ADM's evaluator: the TF graph itself
MAX_KID_FEATURES = 10000

# (data_dir, split, limit) -> batches of uint8 images [b, H, W, 3].
ReadBatches = Callable[[str, str, "int | None"], Iterable[np.ndarray]]


def _safe(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def stats_cache_path(data_dir: str, split: str, extractor_name: str, resize_mode: str,
                     max_images: int | None = None) -> str:
  """``<data_dir>/fid_stats/<split>_<extractor>_<resize_mode>[_first<max_images>].npz``."""
  suffix = f"_first{max_images}" if max_images else ""
  name = f"{_safe(split)}_{_safe(extractor_name)}_{_safe(resize_mode)}{suffix}.npz"
  return storage.join(data_dir, "fid_stats", name)


def read_split_batches(data_dir: str, split: str, limit: int | None = None,
                       batch_size: int = 500) -> Iterable[np.ndarray]:
  """The split's images in file order, in batches (core.data.pipeline.iter_split)."""
  for batch in iter_split(data_dir, split, batch_size=batch_size, limit=limit):
    yield batch["image"]


@dataclasses.dataclass
class Reference:
  """A FID/KID reference: Gaussian statistics, features for KID (or None) and their provenance.

  ``meta`` holds 'extractor', 'resize_mode', 'num_images' and 'split' (what every results row and
  cache file records); ``description`` is the file it came from (recorded as the row's reference).
  """
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None
  meta: dict[str, Any]
  description: str


def _sample_keep(count: int, batch_len: int, kept: int, limit: int, rng) -> np.ndarray:
  """Reservoir sampling (Algorithm R), batched: which rows of this batch enter which reservoir slot
  (-1: not kept). Deterministic given the rng, so a recomputed cache keeps the same features."""
  slots = np.full(batch_len, -1)
  for i in range(batch_len):
    seen = count + i
    if kept + i < limit and seen < limit:
      slots[i] = seen
    else:
      j = int(rng.integers(0, seen + 1))
      if j < limit:
        slots[i] = j
  return slots


def reference_stats(data_dir: str, split: str, extractor, *, max_images: int | None = None,
                    recompute: bool = False, read_batches: ReadBatches | None = None,
                    max_kid_features: int = MAX_KID_FEATURES) -> Reference:
  """``split`` of ``data_dir`` under ``extractor``, from the cache or computed once and cached.

  Args:
    data_dir: a prepared data set (python -m core.data prepare), local or gs://.
    split: 'train' for FID train, 'eval' for FID eval.
    extractor: an eval.inception.FeatureExtractor (its name and resize_mode key the cache).
    max_images: only the first this many images of the split (file order: the split is in source
      order, so a prefix of a class-sorted split is not class-balanced); None uses all.
    recompute: ignore and overwrite an existing cache file (e.g. after preparing the data again).
    read_batches: (data_dir, split, limit) -> iterable of uint8 image batches; default
      :func:`read_split_batches`.
    max_kid_features: the cache keeps the features of at most this many images (a uniform random
      subset of the split, for KID); mu and sigma always cover every image.
  """
  path = stats_cache_path(data_dir, split, extractor.name, extractor.resize_mode, max_images)
  if not recompute and storage.exists(path):
    cached = _load_cached(path)
    if cached is not None:
      return cached
  running = RunningStats()
  kept = np.zeros((0, 0), np.float32)
  rng = np.random.default_rng(0)
  try:
    for images in (read_batches or read_split_batches)(data_dir, split, max_images):
      feats = extractor.features(validate_images(images, min_count=1))[0]
      if kept.shape[1] == 0:
        kept = np.zeros((0, feats.shape[1]), np.float32)
      slots = _sample_keep(running.count, len(feats), len(kept), max_kid_features, rng)
      grow = slots[slots >= len(kept)]
      if len(grow):
        kept = np.concatenate([kept, np.zeros((grow.max() + 1 - len(kept), feats.shape[1]),
                                              np.float32)])
      kept[slots[slots >= 0]] = feats[slots >= 0]
      running.update(feats)
  except FileNotFoundError as e:  # storage.NotFoundError and core.data errors are UserErrors
    raise UserError(f"no data for split '{split}' of {data_dir} ({e}); prepare the data set with "
                    "python -m core.data prepare, or pass a reference .npz with mu and "
                    "sigma") from None
  if running.count < 2:
    raise UserError(f"split '{split}' of {data_dir} has {running.count} images; FID reference "
                    "statistics need at least 2 (prepare more data or pass a reference .npz)")
  mu, sigma = running.stats()
  meta = {"extractor": extractor.name, "resize_mode": extractor.resize_mode, "split": split,
          "num_images": running.count}
  save_stats(path, mu, sigma, features=kept, sigma_sqrt=psd_sqrt(sigma), **meta)
  return Reference(mu, sigma, kept, meta, path)


def _load_cached(path: str) -> Reference | None:
  """A cache file written by :func:`reference_stats`; None for an older layout (recompute)."""
  mu, sigma = load_stats(path)
  meta = load_stats_meta(path)
  z = _read_npz(path)
  if "features" not in z.files or not all(k in meta for k in PROVENANCE):
    return None
  if "sigma_sqrt" in z.files:
    remember_sqrt(sigma, z["sigma_sqrt"])
  return Reference(mu, sigma, np.asarray(z["features"]), {k: meta[k] for k in PROVENANCE}, path)


def load_reference(path: str, extractor, *, split: str, convention: str | None = None) -> Reference:
  """A reference given as an .npz: ours (provenance inside), or ADM-style (``mu``/``sigma``, or
  raw ``arr_0`` images).

  ``convention`` declares the resize mode an ADM-style ``mu``/``sigma`` file was computed with
  (its network: the TF-2015 Inception graph; ADM's reference batches: 'legacy_tensorflow').
  Statistics whose convention is unknown or differs from ``extractor``'s are refused in one line.
  Raw ``arr_0`` images are passed through ``extractor`` itself, so they always match.
  """
  z = _read_npz(path)
  ours = {"extractor": extractor.name, "resize_mode": extractor.resize_mode}
  if "mu" not in z.files and "arr_0" in z.files:
    images = validate_images(z["arr_0"])
    feats = extractor.features(images)[0]
    mu, sigma = feature_stats(feats)
    meta = dict(ours, split=split, num_images=len(images))
    return Reference(mu, sigma, _subset(feats), meta, path)
  mu, sigma = load_stats(path)
  meta = load_stats_meta(path)
  if "extractor" in meta and "resize_mode" in meta:
    if convention and convention != meta["resize_mode"]:
      raise UserError(f"{path} records resize {meta['resize_mode']} but "
                      f"ref_convention={convention} "
                      "was declared; drop ref_convention= (the file's own record is used)")
  elif convention:
    meta.update(extractor=ADM_EXTRACTOR, resize_mode=convention)
  else:
    raise UserError(f"{path} has mu/sigma without a record of how they were computed; declare it "
                    f"with ref_convention=legacy_tensorflow (ADM's reference batches) or "
                    f"ref_convention=clean (clean-fid)")
  check_convention(ours, meta, what=path)
  feats = np.asarray(z["features"]) if "features" in z.files else None
  meta.setdefault("split", split)
  meta.setdefault("num_images", None)
  return Reference(mu, sigma, feats, {k: meta.get(k) for k in PROVENANCE}, path)


def _subset(feats: np.ndarray, limit: int = MAX_KID_FEATURES) -> np.ndarray:
  if len(feats) <= limit:
    return np.asarray(feats, np.float32)
  idx = np.sort(np.random.default_rng(0).choice(len(feats), limit, replace=False))
  return np.asarray(feats[idx], np.float32)


def has_kid_features(reference: str | None) -> bool:
  """Whether a reference gives KID: split statistics do (they keep features); a given .npz does
  when it holds ``features`` or raw ``arr_0`` images (ADM's mu/sigma alone do not)."""
  if not reference or reference == "auto":
    return True
  files = _read_npz(reference).files
  return "features" in files or ("arr_0" in files and "mu" not in files)


def get_reference(reference: str | None, *, data_dir: str | None, split: str, extractor,
                  max_images: int | None = None, read_batches: ReadBatches | None = None,
                  convention: str | None = None) -> Reference:
  """A reference given as a .npz path, or (None, '', 'auto') the cached statistics of ``split``."""
  if reference and reference != "auto":
    return load_reference(reference, extractor, split=split, convention=convention)
  if not data_dir:
    raise UserError(f"no FID reference for split '{split}': set data_dir to a prepared data set or "
                    "pass a reference .npz with mu and sigma")
  return reference_stats(data_dir, split, extractor, max_images=max_images,
                         read_batches=read_batches)


def describe(data_dir: str | None, split: str, extractor, *, reference: str | None = None,
             max_images: int | None = None) -> str:
  """What a result was measured against, for results.jsonl: the reference .npz when one was given,
  else the cache file of the split's statistics (it names data set, split, extractor and resize)."""
  if reference and reference != "auto":
    return reference
  return stats_cache_path(data_dir or "", split, extractor.name, extractor.resize_mode, max_images)


def main(argv: Sequence[str]) -> int:
  """Precomputes and caches the FID reference statistics of one split of a prepared data set."""
  options = [
      Option("data_dir", None, "prepared data set (python -m core.data prepare), local or gs://"),
      Option("split", "train", "split to summarise: train (FID train) or eval (FID eval)"),
      Option("source", "auto", "Inception weights: auto, clean-fid, fid-helper or a .pt path"),
      Option("resize", "legacy_tensorflow", "how images are resized to 299x299: legacy_tensorflow "
             "(the TF graph's bilinear, the paper's and ADM's convention) or clean (clean-fid)",
             choices=RESIZE_MODES),
      Option("max_images", 0, "use only the first this many images; 0 = all", parse=int),
      Option("batch_size", 50, "images per Inception forward pass", parse=int),
      Option("recompute", False, "overwrite an existing cache file", parse=parse_bool),
  ]
  opts, _ = parse(argv, options, prog="eval.reference", description=main.__doc__ or "")
  if not opts["data_dir"]:
    raise UserError("data_dir is required: data_dir=<prepared data set>")
  extractor = FeatureExtractor(opts["source"], resize_mode=opts["resize"],
                               batch_size=opts["batch_size"])
  max_images = opts["max_images"] or None
  reference_stats(opts["data_dir"], opts["split"], extractor, max_images=max_images,
                  recompute=opts["recompute"])
  print(stats_cache_path(opts["data_dir"], opts["split"], extractor.name, extractor.resize_mode,
                         max_images))
  return 0


if __name__ == "__main__":
  run_main(main)
