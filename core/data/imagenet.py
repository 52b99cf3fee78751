"""ImageNet (ILSVRC2012) from the layouts it is distributed in, labelled in the standard order.

Train: the download ``ILSVRC2012_img_train.tar`` (a tar of 1,000 ``<wnid>.tar``, read in place:
nothing is extracted), or ``train/<wnid>/`` folders (extracted; Kaggle's
``ILSVRC/Data/CLS-LOC/train``; ADM's files, ``<wnid>_<n>.JPEG``, are in such folders too).
Val: ``ILSVRC2012_img_val.tar`` (read in place) or ``val/``, as class folders ``val/<wnid>/`` or
flat, labelled by, in this order: ``val_labels=`` (a devkit, or a file of ``<image> <wnid>`` lines
such as Kaggle's LOC_val_solution.csv); the devkit beside the images (``ILSVRC2012_devkit_t12/``
or ``ILSVRC2012_devkit_t12.tar.gz``: ``data/ILSVRC2012_validation_ground_truth.txt`` gives line
by line the ILSVRC2012 ID, 1..1000, of ``ILSVRC2012_val_<line>.JPEG``, and ``data/meta.mat``'s
``synsets`` the wnid of each ID); Kaggle's ``LOC_val_solution.csv``; or file names that begin
with their wnid (``<wnid>_ILSVRC2012_val_<n>.JPEG``: ADM's ``image_datasets`` takes the class of
a file from the part of its name before the first underscore).

Labels are the indices of the sorted wnids (the standard 0..999) in every layout, and a list of
the classes that comes with the data (the devkit's 1,000 leaf synsets, Kaggle's
LOC_synset_mapping.txt) must equal the train classes. Keys are ``train/<wnid>/<file>`` and
``val/<ILSVRC2012_val_n.JPEG>`` in every layout and items are sorted by key, so every layout of
the same images gives the same records. Any other ``train/<class>/`` + ``val/`` folder is read
the same way, with its folder names as classes.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Iterator, Sequence

import scipy.io

from core.data.records import SPLITS
from core.data.sources import Item, Source, list_files, read_val_labels, safe_key, subdirs
from core.errors import UserError, first_line

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_DIR = os.path.join("ILSVRC", "Data", "CLS-LOC")
KAGGLE_LABELS = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")


def _base(src: str) -> str:
  """Where train/ and val/ (or the tars) are: Kaggle's ILSVRC/Data/CLS-LOC, else src."""
  kaggle = os.path.join(src, KAGGLE_DIR)
  return kaggle if os.path.isdir(kaggle) else src


def is_imagenet(src: str) -> bool:
  """Whether ``src`` is one of this module's layouts (train/ of class folders, the tars, Kaggle)."""
  base = _base(src)
  train = os.path.join(base, "train")
  return (os.path.isdir(train) and bool(subdirs(train))) or any(
      os.path.isfile(os.path.join(base, t)) for t in (TRAIN_TAR, VAL_TAR))


# ---------------------------------------------------------------------------------------------
# Tars read in place: each image is a byte range of the (uncompressed) download.


def _tar_files(path: str, start: int = 0) -> Iterator[tuple[str, int, int]]:
  """(member name, offset of its data in the file, size) of each regular file of the tar that
  begins at byte ``start`` of ``path``."""
  try:
    with open(path, "rb") as f:
      f.seek(start)
      with tarfile.open(fileobj=f, mode="r:") as t:
        for m in t:
          if m.isfile():
            yield m.name, m.offset_data, m.size
  except tarfile.TarError as e:
    raise UserError(f"{path} is not a readable uncompressed tar ({first_line(e)}); download it "
                    f"again (ImageNet's tars are read in place, without extracting)") from None


def _train_tar_classes(path: str) -> list[tuple[str, int]]:
  """(wnid, offset of its inner tar) of each ``<wnid>.tar`` in the train download, by wnid."""
  out = [(os.path.basename(n)[:-len(".tar")], off) for n, off, _ in _tar_files(path)
         if n.endswith(".tar")]
  if not out:
    raise UserError(f"{path} holds no <wnid>.tar files; it is not {TRAIN_TAR}")
  return sorted(out)


# ---------------------------------------------------------------------------------------------
# Val labels.


def _read_member(tar_path: str, suffix: str) -> bytes:
  with tarfile.open(tar_path, "r:*") as t:
    for m in t:
      if m.isfile() and m.name.endswith(suffix):
        return t.extractfile(m).read()
  raise UserError(f"{tar_path} has no {suffix}; pass the ILSVRC2012 devkit "
                  f"({DEVKIT}.tar.gz or its folder)")


def _devkit_file(devkit: str, rel: str) -> bytes:
  if os.path.isdir(devkit):
    path = os.path.join(devkit, rel)
    if not os.path.isfile(path):
      raise UserError(f"{devkit} has no {rel}; pass the ILSVRC2012 devkit folder "
                      f"({DEVKIT}/ with data/)")
    with open(path, "rb") as f:
      return f.read()
  return _read_member(devkit, rel)


def is_devkit(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, META)) if os.path.isdir(path) else
          os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar")))


def devkit_wnids(devkit: str) -> dict[int, str]:
  """{ILSVRC2012 ID (1..1000): wnid} of the devkit's leaf synsets (data/meta.mat)."""
  try:
    synsets = scipy.io.loadmat(io.BytesIO(_devkit_file(devkit, META)),
                               squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel()
            if int(s["num_children"]) == 0}
  except (ValueError, KeyError, IndexError, TypeError) as e:
    raise UserError(f"{devkit}: {META} is not the ILSVRC2012 devkit's synsets "
                    f"({first_line(e)}); download {DEVKIT}.tar.gz again") from None


def devkit_val_labels(devkit: str) -> tuple[dict[str, str], list[str]]:
  """({val file stem: wnid}, the devkit's sorted wnids) from the devkit's ground truth."""
  wnids = devkit_wnids(devkit)
  lines = _devkit_file(devkit, GROUND_TRUTH).decode("ascii", "replace").split()
  try:
    out = {f"ILSVRC2012_val_{n:08d}": wnids[int(v)] for n, v in enumerate(lines, 1)}
  except (ValueError, KeyError) as e:
    raise UserError(f"{devkit}: {GROUND_TRUTH} holds {e}, which is not an ILSVRC2012 ID of "
                    f"{META}; download {DEVKIT}.tar.gz again") from None
  return out, sorted(wnids.values())


def _kaggle_synsets(path: str) -> list[str]:
  with open(path, encoding="utf-8", errors="replace") as f:
    return sorted(line.split()[0] for line in f if line.strip())


# ---------------------------------------------------------------------------------------------
# The source.


class _Val:
  """The flat val images (a folder or the val tar) and how they are labelled."""

  def __init__(self, src: str, base: str, val_labels: str | None):
    self.src, self.base, self.val_labels = src, base, val_labels
    self.dir = os.path.join(base, "val")
    self.tar = os.path.join(base, VAL_TAR)

  def files(self) -> list[tuple[str, Item]]:
    """(file name, an item without label) of each val image, from val/ or else the val tar."""
    if os.path.isdir(self.dir):
      return [(os.path.basename(rel), Item(key="", label=-1, path=os.path.join(self.dir, rel)))
              for rel in list_files(self.dir)]
    return [(os.path.basename(n), Item(key="", label=-1, path=self.tar, offset=off, size=size))
            for n, off, size in _tar_files(self.tar)]

  def labeller(self, class_names: list[str]) -> tuple[str, object]:
    """(how val is labelled, {file stem: wnid} or None for wnid-prefixed names)."""
    given = self.val_labels
    devkits = [os.path.join(d, n) for d in (self.base, self.src)
               for n in (DEVKIT, DEVKIT + ".tar.gz")]
    if given and is_devkit(given):
      return f"devkit {given}", self._devkit(given, class_names)
    if given:
      index = read_val_labels(given, class_names)
      return f"val_labels={given}", {k: class_names[v] for k, v in index.items()}
    found = next((d for d in devkits if os.path.exists(d) and is_devkit(d)), None)
    if found:
      return f"devkit {found}", self._devkit(found, class_names)
    csv = next((p for p in (os.path.join(self.src, KAGGLE_LABELS),
                            os.path.join(self.base, KAGGLE_LABELS)) if os.path.isfile(p)), None)
    if csv:
      index = read_val_labels(csv, class_names)
      return f"{KAGGLE_LABELS}", {k: class_names[v] for k, v in index.items()}
    return "wnid file name prefixes (ADM)", None

  @staticmethod
  def _devkit(devkit: str, class_names: list[str]) -> dict[str, str]:
    labels, wnids = devkit_val_labels(devkit)
    _check_classes(class_names, wnids, f"the devkit {devkit}")
    return labels


def _check_classes(class_names: list[str], listed: list[str], where: str) -> None:
  if class_names != listed:
    missing = sorted(set(listed) - set(class_names))
    extra = sorted(set(class_names) - set(listed))
    raise UserError(f"the train classes ({len(class_names)}) are not the {len(listed)} of {where}"
                    + (f"; missing from train: {', '.join(missing[:3])}" if missing else "")
                    + (f"; not in it: {', '.join(extra[:3])}" if extra else "")
                    + "; the labels would not be the standard 0..999 order: complete train/ "
                      "(or the train tar)")


def imagenet_source(src: str, *, eval_fraction: float | None = None,
                    val_labels: str | None = None, splits: Sequence[str] = SPLITS) -> Source:
  """Lists ``src`` (one of the module docstring's layouts) as a Source."""
  if eval_fraction is not None:
    raise UserError(f"eval_fraction= does not apply to {src!r}: it has train/ and val/ folders "
                    f"(or ImageNet's tars), whose val images form the eval split; drop "
                    f"eval_fraction")
  base = _base(src)
  train_dir, train_tar = os.path.join(base, "train"), os.path.join(base, TRAIN_TAR)
  have_dir = os.path.isdir(train_dir) and bool(subdirs(train_dir))
  if have_dir:
    raw = subdirs(train_dir)
    class_names, where = [safe_key(c) for c in raw], "train/"
  elif os.path.isfile(train_tar):
    tar_classes = _train_tar_classes(train_tar)
    class_names, where = [safe_key(w) for w, _ in tar_classes], TRAIN_TAR
  else:
    raise UserError(f"{src!r} has neither train/<wnid>/ folders nor {TRAIN_TAR}: the classes "
                    f"(and their standard order) come from the training set")
  synsets = os.path.join(src, KAGGLE_SYNSETS)
  if os.path.isfile(synsets):
    _check_classes(class_names, _kaggle_synsets(synsets), synsets)
  index = {c: i for i, c in enumerate(class_names)}
  items: dict[str, list[Item]] = {s: [] for s in splits}
  skipped = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  how = {}
  if "train" in items:
    if have_dir:
      for c, name in zip(raw, class_names):
        items["train"] += [Item(key=safe_key(f"train/{name}/{rel}"), label=index[name],
                                path=os.path.join(train_dir, c, rel))
                           for rel in list_files(os.path.join(train_dir, c))]
    else:
      for w, start in tar_classes:
        items["train"] += [Item(key=safe_key(f"train/{w}/{os.path.basename(n)}"),
                                label=index[safe_key(w)], path=train_tar, offset=off, size=size)
                           for n, off, size in _tar_files(train_tar, start)]
    how["train"] = where
  if "eval" in items:
    val = _Val(src, base, val_labels)
    if os.path.isdir(val.dir) and subdirs(val.dir):
      for c in subdirs(val.dir):
        name = safe_key(c)
        if name not in index:
          raise UserError(f"class folder {os.path.join(val.dir, c)!r} is not one of the "
                          f"{len(class_names)} training classes; check src= (val classes must "
                          f"match train classes)")
        items["eval"] += [Item(key=safe_key(f"val/{name}/{rel}"), label=index[name],
                               path=os.path.join(val.dir, c, rel))
                          for rel in list_files(os.path.join(val.dir, c))]
      how["eval"] = "val/<class>/"
    elif os.path.isdir(val.dir) or os.path.isfile(val.tar):
      by, labels = val.labeller(class_names)
      for name, item in val.files():
        name = safe_key(name)
        stem = os.path.splitext(name)[0]
        wnid, key = (labels.get(stem), name) if labels is not None else _prefixed(name, index)
        if wnid is None or wnid not in index:
          skipped["eval"] += 1
          if len(examples["eval"]) < 10:
            examples["eval"].append(f"val/{name}: " + ("no entry in " + by if labels is not None
                                                       else "its name does not begin with a "
                                                            "train class and '_'"))
          continue
        items["eval"].append(Item(key=f"val/{key}", label=index[wnid], path=item.path,
                                  offset=item.offset, size=item.size))
      if labels is None and not items["eval"] and skipped["eval"]:
        raise UserError(f"cannot label the flat val images of {src!r}: pass val_labels=<the "
                        f"ILSVRC2012 devkit ({DEVKIT}.tar.gz or folder), or a file of "
                        f"'<image> <wnid>' lines such as {KAGGLE_LABELS}>, put the devkit in "
                        f"{src}, or pass splits=train (docs/data_sources.md)")
      how["eval"] = f"{'val/' if os.path.isdir(val.dir) else VAL_TAR} labelled by {by}"
    else:
      raise UserError(f"{src!r} has no val/ folder or {VAL_TAR} for the eval split; add one or "
                      f"pass splits=train")
  for s in items:
    items[s].sort(key=lambda it: it.key)
  desc = f"imagenet:{os.path.abspath(src)} (" + "; ".join(f"{s}: {h}" for s, h in how.items()) + ")"
  return Source(items=items, class_names=class_names, description=desc, skipped=skipped,
                skipped_examples=examples, origin="imagenet")


def _prefixed(name: str, index: dict[str, int]) -> tuple[str | None, str]:
  """(wnid, key) of an ADM-style val file ``<wnid>_<rest>``; the key drops the wnid when the rest
  is an ILSVRC2012 val file name (the same key as in the other layouts)."""
  wnid, _, rest = name.partition("_")
  if wnid not in index or not rest:
    return None, name
  return wnid, rest if VAL_NAME.fullmatch(rest) else name
