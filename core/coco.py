"""MS-COCO captions as a text-to-image source (Table 8, Figure 8: zero-shot COCO FID@30K).

Reads the standard layout ``<root>/{train,val}<year>/<file>.jpg`` plus
``<root>/annotations/captions_{train,val}<year>.json`` (year 2017 or 2014; found automatically)
into a :class:`core.data.Source`: ``train<year>`` -> split 'train', ``val<year>`` -> split 'eval',
one item per image holding ALL its captions (COCO has about five; the input pipeline draws one
per step). Images keep COCO's file names as keys (``val2017/000000000139.jpg``). The paper
evaluates zero-shot on COCO (it trains on other data), so the 'eval' split is what matters: its
records give the FID reference statistics (``python -m eval.reference``) and its captions the
30K evaluation captions (:mod:`core.captions`). COCO images are about 640x480, smaller than a
512x512 target: such images are an error unless ``upscale=true`` (BICUBIC, as ADM upscales).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from core import data
from core.errors import UserError

SPLIT_DIRS = {"train": "train", "eval": "val"}
YEARS = (2017, 2014)


def is_coco_source(src: str) -> bool:
  return src == "coco" or src.startswith("coco:")


def find_year(root: str, splits: Sequence[str]) -> int:
  """The COCO release under ``root`` whose caption files exist for ``splits`` (2017 first)."""
  for year in YEARS:
    if all(os.path.isfile(captions_file(root, s, year)) for s in splits):
      return year
  want = ", ".join(os.path.relpath(captions_file(root, s, YEARS[0]), root) for s in splits)
  raise UserError(f"src={root!r} has no COCO captions file ({want}); download "
                  f"annotations_trainval2017.zip from cocodataset.org and unzip it into {root}")


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
    raise UserError(f"{path} is not a COCO captions file ({data._first_line(e)}); download it "  # pylint: disable=protected-access
                    f"again from cocodataset.org (annotations_trainval<year>.zip)") from None


def coco_source(root: str, *, splits: Sequence[str] = data.SPLITS) -> data.Source:
  """Every image of ``splits`` with all its captions; a caption whose image file is missing, or
  an image entry without caption, is a UserError (the download is incomplete)."""
  if not os.path.isdir(root):
    raise UserError(f"src={root!r} is not a directory; pass src=<COCO root> holding train2017/, "
                    f"val2017/ and annotations/")
  year = find_year(root, splits)
  items: dict[str, list[data.Item]] = {}
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
        raise UserError(f"image {folder}/{name} (captioned in {os.path.basename(captions_file(root, split, year))}) "
                        f"is missing; download {folder}.zip from cocodataset.org and unzip it into "
                        f"{root}, or pass splits= without {split}")
      out.append(data.Item(key=f"{folder}/{name}", label=0, path=path,
                           captions=tuple(caps[image_id])))
    items[split] = out
  return data.Source(items=items, class_names=[], description=f"coco{year}:{os.path.abspath(root)}",
                     upscale=False)
