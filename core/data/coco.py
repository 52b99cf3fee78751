"""MS-COCO captions as a text-to-image source (Table 8, Figure 8: zero-shot COCO FID@30K).

Reads the standard layout ``<root>/{train,val}<year>/<file>.jpg`` plus
``<root>/annotations/captions_{train,val}<year>.json`` into a :class:`core.data.sources.Source`:
``train<year>`` -> split 'train', ``val<year>`` -> split 'eval', one item per image holding ALL
its captions (COCO has about five; the input pipeline draws one per step). Images keep COCO's file
names as keys (``val2014/COCO_val2014_000000000042.jpg``). The paper evaluates zero-shot on COCO
(it trains on other data), so the 'eval' split is what matters: its records give the FID
reference statistics (``python -m eval.reference``) and its captions the 30K evaluation captions
(:mod:`core.data.captions`). COCO images are about 640x480, smaller than a 512x512 target: such
images are an error unless ``upscale=true`` (BICUBIC, as ADM upscales).

The year: 2014 when both are present. The paper's FID@30K draws "30K randomly sampled texts from
the MSCOCO validation set, computed against the full validation set", and the results it compares
with (GLIDE, Imagen, Parti, Muse, eDiff-I) use val2014: 40,504 images, 202,654 captions. val2017
has 5,000 images and 25,014 captions, so 30K captions repeat some and the reference is 5K images:
:func:`check_paper_eval_set` refuses it at paper scale.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from core.data import records, sources
from core.data.records import SPLITS
from core.errors import UserError, first_line
from core.io import storage

SPLIT_DIRS = {"train": "train", "eval": "val"}
YEARS = (2014, 2017)
# The validation set the paper's FID@30K and the literature it compares with use (module doc).
PAPER_YEAR = 2014


def find_year(root: str, splits: Sequence[str]) -> int:
  """The COCO release under ``root`` whose caption files exist for ``splits`` (2014 first)."""
  for year in YEARS:
    if all(os.path.isfile(captions_file(root, s, year)) for s in splits):
      return year
  # Name the release the user has part of (its missing file), else the paper's.
  year = next((y for y in YEARS if any(os.path.isfile(captions_file(root, s, y))
                                       for s in SPLIT_DIRS)), PAPER_YEAR)
  want = ", ".join(os.path.relpath(captions_file(root, s, year), root) for s in splits
                   if not os.path.isfile(captions_file(root, s, year)))
  raise UserError(f"src={root!r} has no COCO captions file ({want}); download "
                  f"annotations_trainval{year}.zip from cocodataset.org and unzip it into {root}")


def captions_file(root: str, split: str, year: int) -> str:
  return os.path.join(root, "annotations", f"captions_{SPLIT_DIRS[split]}{year}.json")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      j = json.load(f)
    if not isinstance(j, dict) or not isinstance(j.get("images"), list) or \
       not isinstance(j.get("annotations"), list):
      raise ValueError("no 'images' and 'annotations' lists")
    return j
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not a COCO captions file ({first_line(e)}); download it "
                    f"again from cocodataset.org (annotations_trainval<year>.zip)") from None


def coco_source(root: str, *, splits: Sequence[str] = SPLITS) -> sources.Source:
  """Every image of ``splits`` with all its captions; a caption whose image file is missing, or
  an image entry without caption, is a UserError (the download is incomplete)."""
  if not os.path.isdir(root):
    raise UserError(f"src={root!r} is not a directory; pass src=<COCO root> holding train2014/, "
                    f"val2014/ and annotations/")
  year = find_year(root, splits)
  items: dict[str, list[sources.Item]] = {}
  for split in splits:
    j = _read_json(captions_file(root, split, year))
    folder = f"{SPLIT_DIRS[split]}{year}"
    names = {int(im["id"]): im["file_name"] for im in j["images"]}
    caps: dict[int, list[str]] = {}
    for a in sorted(j["annotations"], key=lambda a: a.get("id", 0)):
      if int(a["image_id"]) not in names:
        raise UserError(f"{captions_file(root, split, year)}: caption {a.get('id')} refers to "
                        f"image {a['image_id']}, which is not in its image list; download the "
                        f"captions file again")
      caps.setdefault(int(a["image_id"]), []).append(" ".join(str(a["caption"]).split()))
    out = []
    for image_id, name in sorted(names.items(), key=lambda kv: kv[1]):
      if image_id not in caps:
        continue  # an image without caption is not a text-to-image example
      path = os.path.join(root, folder, name)
      if not os.path.isfile(path):
        ann = os.path.basename(captions_file(root, split, year))
        raise UserError(f"image {folder}/{name} (captioned in {ann}) is missing; download "
                        f"{folder}.zip from cocodataset.org and unzip it into {root}, or pass "
                        f"splits= without {split}")
      out.append(sources.Item(key=f"{folder}/{name}", label=0, path=path,
                           captions=tuple(caps[image_id])))
    items[split] = out
  return sources.Source(items=items, class_names=[],
                        description=f"coco{year}:{os.path.abspath(root)}",
                        upscale=False, origin=f"coco{year}")


def eval_year(meta: dict) -> int | None:
  """The COCO year of a prepared data set's eval split (None: not COCO)."""
  origin = (meta.get("split_origins") or {}).get("eval") or str(meta.get("source", ""))
  m = re.match(r"coco(\d{4})", origin)
  return int(m.group(1)) if m else None


def check_paper_eval_set(data_dir: str) -> None:
  """UserError unless the eval split of a paper-scale text-to-image data set is COCO val2014 (a
  data set not prepared yet is left to the trainer's error)."""
  path = storage.join(data_dir, "meta.json")
  if not storage.exists(path):
    return
  year = eval_year(records.parse_meta(storage.read_bytes(path), path, data_dir))
  if year is not None and year != PAPER_YEAR:
    raise UserError(
        f"{data_dir} evaluates on COCO val{year}: its 5,000 images and 25,014 captions make "
        f"FID@30K repeat captions against a 5K-image reference, not the paper's (and GLIDE's, "
        f"Imagen's, Parti's...) 30K captions of val2014's 40,504 images; prepare the eval split "
        f"from COCO 2014 (python -m core.data prepare src=<COCO root with val2014/> ...)")


def data_record(data_dir: str | None) -> dict:
  """What a run records of its data set (job.json "data"): meta.json's ``split_origins``,
  ``trained_on_coco`` and ``zero_shot`` (core/data/prepare.py), from which a COCO FID is said to
  be zero-shot or not; ``data_dir`` alone for a set not prepared yet. None is the built-in emoji
  set (trained and evaluated on emoji). Sets prepared before these fields: read from 'source'."""
  if data_dir is None:
    return {"data_dir": None, "split_origins": {"train": "emoji", "eval": "emoji"},
            "trained_on_coco": False, "zero_shot": False}
  path = storage.join(data_dir, "meta.json")
  if not storage.exists(path):
    return {"data_dir": data_dir}
  meta = records.parse_meta(storage.read_bytes(path), path, data_dir)
  if "split_origins" not in meta:
    origin = str(meta.get("source", "")).split(":", 1)[0]
    meta["split_origins"] = {s: origin for s in meta["counts"]}
    meta["trained_on_coco"] = origin.startswith("coco") and "train" in meta["counts"]
    meta["zero_shot"] = False if len(meta["counts"]) == 2 else None
  return {"data_dir": data_dir, **{k: meta.get(k) for k in ("split_origins", "trained_on_coco",
                                                            "zero_shot")}}
