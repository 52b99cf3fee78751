"""Image sources to prepare: a folder of class folders, a flat folder, the ImageNet layout.

Labels are the indices of the sorted class folder names; a folder without train/ and val/ is
split by a hash of each relative path, so the split is deterministic. A flat ImageNet ``val/``
takes ``val_labels=<file>`` (``<file name> <wnid>`` lines; Kaggle's LOC_val_solution.csv as is).
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


@dataclasses.dataclass
class Source:
  """Images to prepare, per split, plus the label set."""
  items: dict[str, list[Item]]
  class_names: list[str]
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # found while listing
  skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  upscale: bool = True  # False: an image smaller than the target size is an error (COCO)


def hash_fraction(key: str) -> float:
  """A deterministic number in [0, 1) from a key (first 8 bytes of its SHA-256)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, eval_fraction: float) -> str:
  """'eval' for about eval_fraction of keys (by hash), else 'train'."""
  return "eval" if hash_fraction(key) < eval_fraction else "train"


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _list_files(root: str) -> list[str]:
  """Every non-hidden regular file under root, as sorted paths relative to root."""
  out = []
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(x for x in dirs if _visible(x))
    rel = os.path.relpath(d, root)
    for f in sorted(files):
      if _visible(f):
        out.append(f if rel == "." else os.path.join(rel, f))
  return sorted(out)


def _subdirs(path: str) -> list[str]:
  return sorted(x for x in os.listdir(path) if _visible(x) and os.path.isdir(os.path.join(path, x)))


def _class_folder_items(root: str, class_names: list[str], key_prefix: str) -> list[Item]:
  index = {c: i for i, c in enumerate(class_names)}
  items = []
  for c in _subdirs(root):
    if c not in index:
      raise UserError(f"class folder {os.path.join(root, c)!r} is not one of the "
                      f"{len(class_names)} "
                      f"training classes; check src= (val classes must match train classes)")
    for rel in _list_files(os.path.join(root, c)):
      items.append(Item(key=f"{key_prefix}{c}/{rel}", label=index[c],
                        path=os.path.join(root, c, rel)))
  return items


def read_val_labels(path: str, class_names: list[str]) -> dict[str, int]:
  """Parses a val labels file -> {file stem: label}. See the module docstring for the format."""
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
  """Lists an image folder (class folders, flat, or the ImageNet train/val layout) as a Source."""
  if not os.path.isdir(src):
    raise UserError(f"src={src!r} is not a directory; pass an image folder, an ImageNet root "
                    f"(train/, val/), or src=emoji")
  items: dict[str, list[Item]] = {s: [] for s in splits}
  skipped: dict[str, int] = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  train_dir, val_dir = os.path.join(src, "train"), os.path.join(src, "val")
  if os.path.isdir(train_dir) and _subdirs(train_dir):  # ImageNet layout
    if eval_fraction is not None:
      raise UserError(f"eval_fraction= does not apply to {src!r}: it has train/ and val/ folders, "
                      f"whose val/ images form the eval split; drop eval_fraction")
    class_names = _subdirs(train_dir)
    if "train" in items:
      items["train"] = _class_folder_items(train_dir, class_names, "train/")
    if "eval" in items:
      if not os.path.isdir(val_dir):
        raise UserError(f"{src!r} has train/ but no val/ folder for the eval split; add val/ or "
                        f"pass splits=train")
      if _subdirs(val_dir):
        items["eval"] = _class_folder_items(val_dir, class_names, "val/")
      else:
        if not val_labels:
          raise UserError(f"{val_dir!r} is a flat folder; pass val_labels=<file of '<image> "
                          f"<wnid>' lines> (e.g. LOC_val_solution.csv) or pass splits=train")
        labels = read_val_labels(val_labels, class_names)
        for rel in _list_files(val_dir):
          stem = os.path.splitext(os.path.basename(rel))[0]
          if stem in labels:
            items["eval"].append(Item(key=f"val/{rel}", label=labels[stem],
                                      path=os.path.join(val_dir, rel)))
          else:
            skipped["eval"] += 1
            if len(examples["eval"]) < 10:
              examples["eval"].append(f"val/{rel}: no entry in val_labels")
    desc = f"imagenet-layout:{os.path.abspath(src)}"
  else:
    frac = 0.1 if eval_fraction is None else eval_fraction
    if not 0.0 <= frac < 1.0:
      raise UserError(f"eval_fraction={frac} must be in [0, 1)")
    class_names = _subdirs(src)
    if class_names:
      listed = _class_folder_items(src, class_names, "")
    else:
      listed = [Item(key=rel, label=0, path=os.path.join(src, rel)) for rel in _list_files(src)]
    for it in listed:
      s = split_of(it.key, frac)
      if s in items:
        items[s].append(it)
    desc = f"folder:{os.path.abspath(src)} (eval_fraction={frac})"
  return Source(items=items, class_names=class_names, description=desc, skipped=skipped,
                skipped_examples=examples)
