"""FID reference statistics (mu, sigma) of a prepared data set's splits, cached beside the data.

The paper measures FID train against training-set statistics and FID eval against the evaluation
split (ImageNet: the 50K validation images; our prepared splits are 'train' and 'eval', see
core.data). The statistics of a split of ``data_dir`` are computed once with the given extractor,
streaming the split in batches (core.input_pipeline.iter_split; ImageNet train does not fit in
memory), and cached at ``<data_dir>/fid_stats/<split>_<extractor>_<resize_mode>.npz`` (local or
gs://, written atomically): the file name carries the network and the resize, so statistics of
different pipelines never mix. A reference can instead be an existing .npz with ``mu`` and
``sigma``, e.g. ADM's VIRTUAL_imagenet256_labeled.npz (computed with the TF graph's own bilinear
resize: pair it with resize_mode=legacy_tensorflow).

Command line (precompute): python -m eval.reference data_dir=DIR split=train [source=auto ...]
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import numpy as np

from core.errors import UserError, run_main
from eval.fid import RunningStats, load_stats, save_stats

# (data_dir, split, limit) -> batches of uint8 images [b, H, W, 3].
ReadBatches = Callable[[str, str, "int | None"], Iterable[np.ndarray]]


def _safe(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def stats_cache_path(data_dir: str, split: str, extractor_name: str, resize_mode: str,
                     max_images: int | None = None) -> str:
  """``<data_dir>/fid_stats/<split>_<extractor>_<resize_mode>[_first<max_images>].npz``."""
  from core import storage  # pylint: disable=import-outside-toplevel
  suffix = f"_first{max_images}" if max_images else ""
  name = f"{_safe(split)}_{_safe(extractor_name)}_{_safe(resize_mode)}{suffix}.npz"
  return storage.join(data_dir, "fid_stats", name)


def read_split_batches(data_dir: str, split: str, limit: int | None = None,
                       batch_size: int = 500) -> Iterable[np.ndarray]:
  """The split's images in file order, in batches (core.input_pipeline.iter_split)."""
  from core.input_pipeline import iter_split  # pylint: disable=import-outside-toplevel
  for batch in iter_split(data_dir, split, batch_size=batch_size, limit=limit):
    yield batch["image"]


def reference_stats(data_dir: str, split: str, extractor, *, max_images: int | None = None,
                    recompute: bool = False, read_batches: ReadBatches | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of ``split`` of ``data_dir`` under ``extractor``, from the cache or computed and cached.

  Args:
    data_dir: a prepared data set (python -m core.data prepare), local or gs://.
    split: 'train' for FID train, 'eval' for FID eval.
    extractor: an eval.inception.FeatureExtractor (its name and resize_mode key the cache).
    max_images: only the first this many images of the split (file order: the split is in source
      order, so a prefix of a class-sorted split is not class-balanced); None uses all.
    recompute: ignore and overwrite an existing cache file (e.g. after preparing the data again).
    read_batches: (data_dir, split, limit) -> iterable of uint8 image batches; default
      :func:`read_split_batches`.
  """
  from core import storage  # pylint: disable=import-outside-toplevel
  from eval.metrics import validate_images  # pylint: disable=import-outside-toplevel
  path = stats_cache_path(data_dir, split, extractor.name, extractor.resize_mode, max_images)
  if not recompute and storage.exists(path):
    return load_stats(path)
  running = RunningStats()
  try:
    for images in (read_batches or read_split_batches)(data_dir, split, max_images):
      running.update(extractor.features(validate_images(images, min_count=1))[0])
  except FileNotFoundError as e:  # storage.NotFoundError and input_pipeline errors are UserErrors
    raise UserError(f"no data for split '{split}' of {data_dir} ({e}); prepare the data set with "
                    "python -m core.data prepare, or pass a reference .npz with mu and sigma") from None
  if running.count < 2:
    raise UserError(f"split '{split}' of {data_dir} has {running.count} images; FID reference "
                    "statistics need at least 2 (prepare more data or pass a reference .npz)")
  mu, sigma = running.stats()
  save_stats(path, mu, sigma, extractor=extractor.name, resize_mode=extractor.resize_mode,
             split=split, num_images=running.count)
  return mu, sigma


def get_reference(reference: str | None, *, data_dir: str | None, split: str, extractor,
                  max_images: int | None = None, read_batches: ReadBatches | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A reference given as a .npz path, or (None, '' or 'auto') the cached statistics of ``split``."""
  if reference and reference != "auto":
    return load_stats(reference)  # a missing file is a UserError naming it
  if not data_dir:
    raise UserError(f"no FID reference for split '{split}': set data_dir to a prepared data set or "
                    "pass a reference .npz with mu and sigma")
  return reference_stats(data_dir, split, extractor, max_images=max_images, read_batches=read_batches)


def describe(data_dir: str | None, split: str, extractor, *, reference: str | None = None,
             max_images: int | None = None) -> str:
  """What a result was measured against, for results.jsonl: the reference .npz when one was given,
  else the cache file of the split's statistics (it names data set, split, extractor and resize)."""
  if reference and reference != "auto":
    return reference
  return stats_cache_path(data_dir or "", split, extractor.name, extractor.resize_mode, max_images)


def main(argv: Sequence[str]) -> int:
  """Precomputes and caches the FID reference statistics of one split of a prepared data set."""
  from core.cli import Option, parse, parse_bool  # pylint: disable=import-outside-toplevel
  from eval.inception import RESIZE_MODES, FeatureExtractor  # pylint: disable=import-outside-toplevel
  options = [
      Option("data_dir", None, "prepared data set (python -m core.data prepare), local or gs://"),
      Option("split", "train", "split to summarise: train (FID train) or eval (FID eval)"),
      Option("source", "auto", "Inception weights: auto, clean-fid, fid-helper or a .pt path"),
      Option("resize_mode", "clean", "how images are resized to 299x299.", choices=RESIZE_MODES),
      Option("max_images", 0, "use only the first this many images; 0 = all", parse=int),
      Option("batch_size", 50, "images per Inception forward pass", parse=int),
      Option("recompute", False, "overwrite an existing cache file", parse=parse_bool),
  ]
  opts, _ = parse(argv, options, prog="eval.reference", description=main.__doc__ or "")
  if not opts["data_dir"]:
    raise UserError("data_dir is required: data_dir=<prepared data set>")
  extractor = FeatureExtractor(opts["source"], resize_mode=opts["resize_mode"],
                               batch_size=opts["batch_size"])
  max_images = opts["max_images"] or None
  reference_stats(opts["data_dir"], opts["split"], extractor, max_images=max_images,
                  recompute=opts["recompute"])
  print(stats_cache_path(opts["data_dir"], opts["split"], extractor.name, extractor.resize_mode,
                         max_images))
  return 0


if __name__ == "__main__":
  run_main(main)
