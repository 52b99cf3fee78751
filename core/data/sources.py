"""Image sources to prepare: a folder of class folders or a flat folder (ImageNet's layouts:
core/data/imagenet.py).

Labels are the indices of the sorted class folder names; a folder is split by a hash of each
relative path, so the split is deterministic. A key is the file's relative path as text: bytes
of a file name that are not UTF-8 become ``\\xNN`` escapes (the file is still read by its name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Sequence

from core.data.records import SPLITS
from core.errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image of a source: a stable key (relative path or file name), its label, its bytes (and
  captions).

  Exactly one of ``path`` (a file to read) and ``data`` (the file's bytes) is set.
  """
  key: str
  label: int
  path: str | None = None
  data: bytes | None = None
  captions: tuple[str, ...] = ()  # text-to-image sources: every caption of the image
  offset: int = -1  # >= 0: the image is ``size`` bytes at this offset of ``path`` (a tar member)
  size: int = 0

  def content(self) -> str | bytes:
    """What to decode: the bytes (given, or read from a tar member in place) or the path."""
    if self.data is not None:
      return self.data
    if self.offset >= 0:
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        return f.read(self.size)
    return self.path


@dataclasses.dataclass
class Source:
  """Images to prepare, per split, plus the label set."""
  items: dict[str, list[Item]]
  class_names: list[str]
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # found while listing
  skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  upscale: bool = True  # False: an image smaller than the target size is an error (COCO)
  # What the images are ('coco2014', 'imagenet', 'folder', ...): meta.json's split_origins, from
  # which it says whether a model trained on the set is evaluated zero-shot.
  origin: str = ""
  # A source whose eval split comes from elsewhere (prepare eval_src=): per split, if set.
  split_origin: dict[str, str] = dataclasses.field(default_factory=dict)
  split_upscale: dict[str, bool] = dataclasses.field(default_factory=dict)

  def origin_of(self, split: str) -> str:
    return self.split_origin.get(split, self.origin)

  def upscale_of(self, split: str) -> bool:
    return self.split_upscale.get(split, self.upscale)


def merge(train: Source, evaluation: Source) -> Source:
  """The train split of ``train`` and the eval split of ``evaluation`` as one Source."""
  items = {s: v for s, v in train.items.items() if s == "train"}
  items.update({s: v for s, v in evaluation.items.items() if s == "eval"})
  parts = {"train": train, "eval": evaluation}
  return Source(
      items=items, class_names=train.class_names,
      description=f"train: {train.description}; eval: {evaluation.description}",
      skipped={s: parts[s].skipped.get(s, 0) for s in items},
      skipped_examples={s: parts[s].skipped_examples.get(s, []) for s in items},
      upscale=train.upscale and evaluation.upscale, origin=train.origin,
      split_origin={s: parts[s].origin_of(s) for s in items},
      split_upscale={s: parts[s].upscale_of(s) for s in items})


def safe_key(name: str) -> str:
  """``name`` as UTF-8-encodable text: the bytes of a file name that are not UTF-8 (which Python
  holds as lone surrogates) become ``\\xNN`` escapes."""
  return os.fsencode(name).decode("utf-8", "backslashreplace")


def hash_fraction(key: str) -> float:
  """A deterministic number in [0, 1) from a key (first 8 bytes of its SHA-256)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, eval_fraction: float) -> str:
  """'eval' for about eval_fraction of keys (by hash), else 'train'."""
  return "eval" if hash_fraction(key) < eval_fraction else "train"


def _visible(name: str) -> bool:
  return not name.startswith(".")


def list_files(root: str) -> list[str]:
  """Every non-hidden regular file under root, as sorted paths relative to root."""
  out = []
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(x for x in dirs if _visible(x))
    rel = os.path.relpath(d, root)
    for f in sorted(files):
      if _visible(f):
        out.append(f if rel == "." else os.path.join(rel, f))
  return sorted(out)


def subdirs(path: str) -> list[str]:
  return sorted(x for x in os.listdir(path) if _visible(x) and os.path.isdir(os.path.join(path, x)))


def _class_folder_items(root: str, class_folders: list[str]) -> list[Item]:
  """Every file of each class folder, labelled by the folder's index."""
  return [Item(key=safe_key(f"{c}/{rel}"), label=i, path=os.path.join(root, c, rel))
          for i, c in enumerate(class_folders) for rel in list_files(os.path.join(root, c))]


def read_val_labels(path: str, class_names: list[str]) -> dict[str, int]:
  """Parses a val labels file -> {file stem: label}: '<image file> <class>' lines, whitespace or
  comma separated, a header line allowed (Kaggle's LOC_val_solution.csv as it is)."""
  if not os.path.isfile(path):
    raise UserError(f"val_labels={path!r} does not exist; pass a file of '<image file> <wnid>' "
                    f"lines")
  index = {c: i for i, c in enumerate(class_names)}
  labels: dict[str, int] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"val_labels={path!r} is not UTF-8 text (byte {e.start}); pass a text file "
                    f"of '<image file> <wnid>' lines") from None
  for n, line in enumerate(lines, 1):
    line = line.strip()
    if not line:
      continue
    fields = line.split(",", 1) if "," in line else line.split(None, 1)
    if len(fields) < 2 or not fields[1].split():
      raise UserError(f"val_labels={path!r} line {n} is not '<image file> <class>': {line[:80]!r}")
    name, cls = fields[0].strip(), fields[1].split()[0]
    if cls not in index:
      if n == 1:  # a header line such as 'ImageId,PredictionString'
        continue
      raise UserError(f"val_labels={path!r} line {n}: class {cls!r} is not a train class folder "
                      f"name")
    labels[os.path.splitext(os.path.basename(name))[0]] = index[cls]
  return labels


def scan_folder(src: str, *, eval_fraction: float | None = None, val_labels: str | None = None,
                splits: Sequence[str] = SPLITS) -> Source:
  """Lists an image folder (class folders, or flat: unconditional) as a Source, split by hash."""
  if not os.path.isdir(src):
    raise UserError(f"src={src!r} is not a directory; pass an image folder, an ImageNet root "
                    f"(train/, val/), or src=emoji")
  if val_labels:
    raise UserError(f"val_labels= labels the flat val images of an ImageNet layout and {src!r} "
                    f"is not one (no train/<class>/ folders or ImageNet tars); drop val_labels")
  items: dict[str, list[Item]] = {s: [] for s in splits}
  frac = 0.1 if eval_fraction is None else eval_fraction
  if not 0.0 <= frac < 1.0:
    raise UserError(f"eval_fraction={frac} must be in [0, 1)")
  raw = subdirs(src)
  class_names = [safe_key(c) for c in raw]
  if raw:
    listed = _class_folder_items(src, raw)
  else:
    listed = [Item(key=safe_key(rel), label=0, path=os.path.join(src, rel))
              for rel in list_files(src)]
  for it in listed:
    s = split_of(it.key, frac)
    if s in items:
      items[s].append(it)
  desc = f"folder:{os.path.abspath(src)} (eval_fraction={frac})"
  return Source(items=items, class_names=class_names, description=desc,
                skipped={s: 0 for s in splits}, skipped_examples={s: [] for s in splits},
                origin="folder")
