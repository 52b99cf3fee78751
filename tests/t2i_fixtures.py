"""Text-to-image test helpers: a tiny random T5 encoder saved to disk and a fake COCO layout.

``tiny_t5(path)`` writes a randomly initialised one-layer T5 encoder (d_model 16) and a word-level
tokenizer with ``save_pretrained`` (core.text_encoder.build_random_t5), so the real
``from_pretrained`` / encode code runs offline. ``fake_coco(root)`` writes COCO's layout
(``train2017/``, ``val2017/``, ``annotations/captions_{train,val}2017.json``) with a few PIL images,
one of them portrait, and several captions per image.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from core import text_encoder

CAPTIONS = {
    # split -> [(image id, (width, height), captions)]
    "train": [(1, (48, 40), ["A red cat on a mat.", "a small cat sitting"]),
              (2, (40, 56), ["A tall tower at night", "a tower", "the tower is tall"]),  # portrait
              (3, (64, 48), ["Two dogs play in the park"])],
    "val": [(11, (52, 40), ["A blue car on the road", "a car"]),
            (12, (40, 40), ["a green apple", "an apple on a table", "apple"]),
            (13, (44, 60), ["a person with an umbrella"])],  # portrait
}
DIM = 16


def all_captions() -> list[str]:
  return [c for rows in CAPTIONS.values() for _, _, caps in rows for c in caps]


def tiny_t5(path: str, vocabulary=None, *, seed: int = 0, d_model: int = DIM) -> str:
  """A tiny random T5 encoder + tokenizer under ``path`` (vocabulary: the fake COCO's words)."""
  vocab = text_encoder.words(all_captions()) if vocabulary is None else vocabulary
  return text_encoder.build_random_t5(str(path), vocab, d_model=d_model, num_layers=1, num_heads=2,
                                      d_ff=32, seed=seed)


def image(size: tuple[int, int], seed: int) -> Image.Image:
  """A deterministic RGB image whose left and top halves differ (so a rotation is visible)."""
  w, h = size
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  arr = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 0 * x], -1)
  arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(arr)


def fake_coco(root: str, year: int = 2017, rows=None) -> str:
  """COCO's layout with CAPTIONS (or ``rows``: the same structure) under ``root``."""
  rows = CAPTIONS if rows is None else rows
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  ann_id = 100
  for split, items in rows.items():
    folder = os.path.join(root, f"{split}{year}")
    os.makedirs(folder, exist_ok=True)
    images, anns = [], []
    for image_id, size, caps in items:
      name = f"{image_id:012d}.jpg"
      image(size, image_id).save(os.path.join(folder, name), quality=95)
      images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
      for c in caps:
        anns.append({"id": ann_id, "image_id": image_id, "caption": c})
        ann_id += 1
    with open(os.path.join(root, "annotations", f"captions_{split}{year}.json"), "w") as f:
      json.dump({"info": {}, "images": images, "annotations": anns}, f)
  return str(root)
