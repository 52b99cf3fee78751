"""A folder of image + caption pairs as a text-to-image source (training data for zero-shot COCO).

The paper trains its text-to-image model on other data and evaluates it zero-shot on COCO
(Table 8). Any folder of captioned images can be that other data, in one of two layouts:

* every image with a text file of the same name beside it (``cat.jpg`` + ``cat.txt``): each
  non-empty line of the text file is one caption of the image;
* ``captions.jsonl`` at the folder's root, one JSON object a line: ``{"file": "<image path
  relative to the folder>", "caption": "..."}`` (or ``"captions": [...]``); lines naming the same
  file add captions to it.

Images without a caption are skipped and counted. The split is a hash of each relative path
(``eval_fraction``, as for an image folder); ``prepare ... eval_src=<COCO root>`` instead takes the
eval split, the reference statistics and the 30K evaluation captions from COCO's validation set.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from core.data.records import SPLITS
from core.data.sources import IMAGE_EXTENSIONS, Item, Source, list_files, safe_key, split_of
from core.errors import UserError

JSONL = "captions.jsonl"


def is_caption_folder(src: str) -> bool:
  """A folder with captions.jsonl (a folder of ``.txt`` files needs ``captions=true``)."""
  return os.path.isfile(os.path.join(src, JSONL))


def _clean(text: str) -> str:
  return " ".join(str(text).split())


def _jsonl_captions(src: str) -> dict[str, list[str]]:
  path = os.path.join(src, JSONL)
  out: dict[str, list[str]] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {e.start}); write it as UTF-8 JSON lines") \
        from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      rel = os.path.normpath(str(row["file"]))
      caps = row["captions"] if "captions" in row else [row["caption"]]
      if isinstance(caps, str) or not isinstance(caps, list):
        raise TypeError("'captions' is not a list")
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{path} line {n} is not {{\"file\": ..., \"caption\": ...}} "
                      f"({type(e).__name__}: {e}); fix the line") from None
    out.setdefault(rel, []).extend(c for c in map(_clean, caps) if c)
  return out


def _text_file_captions(src: str, rel: str) -> list[str] | None:
  path = os.path.join(src, os.path.splitext(rel)[0] + ".txt")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8", errors="replace") as f:
    return [c for c in map(_clean, f.read().splitlines()) if c]


def caption_folder_source(src: str, *, eval_fraction: float | None = None,
                          splits: Sequence[str] = SPLITS) -> Source:
  """Every captioned image of ``src`` (see the module docstring) with all its captions."""
  if not os.path.isdir(src):
    raise UserError(f"src={src!r} is not a directory; pass a folder of images with captions "
                    f"(<image>.txt beside each image, or {JSONL}), or a COCO root")
  frac = 0.1 if eval_fraction is None else eval_fraction
  if not 0.0 <= frac < 1.0:
    raise UserError(f"eval_fraction={frac} must be in [0, 1)")
  jsonl = _jsonl_captions(src) if is_caption_folder(src) else None
  items: dict[str, list[Item]] = {s: [] for s in splits}
  skipped = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  for rel in list_files(src):
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
      continue  # the caption files themselves, notes, ...
    key = safe_key(rel)
    s = split_of(key, frac)
    if s not in items:
      continue
    caps = jsonl.get(os.path.normpath(rel)) if jsonl is not None else \
        _text_file_captions(src, rel)
    if not caps:
      skipped[s] += 1
      if len(examples[s]) < 10:
        examples[s].append(f"{key}: no caption ({JSONL} entry or .txt beside it)")
      continue
    items[s].append(Item(key=key, label=0, path=os.path.join(src, rel), captions=tuple(caps)))
  if not any(items.values()) and not any(skipped.values()):
    raise UserError(f"src={src!r} holds no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
  if not any(items.values()):
    raise UserError(f"no image of src={src!r} has a caption: put <image>.txt beside each image "
                    f"or write {JSONL} (docs/data_sources.md)")
  return Source(items=items, class_names=[], skipped=skipped, skipped_examples=examples,
                description=f"caption-folder:{os.path.abspath(src)} (eval_fraction={frac})",
                origin="caption-folder")
