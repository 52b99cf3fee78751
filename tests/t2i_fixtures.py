"""Text-to-image test helpers: a tiny random T5 encoder saved to disk and a fake COCO layout.

``tiny_t5(path)`` writes a randomly initialised one-layer T5 encoder (d_model 16) and a word-level
tokenizer with ``save_pretrained`` (core.data.text_encoder.build_random_t5), so the real
``from_pretrained`` / encode code runs offline. ``fake_coco(root)`` writes COCO's layout
(``train2017/``, ``val2017/``, ``annotations/captions_{train,val}2017.json``) with a few PIL images,
one of them portrait, and several captions per image.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from core.data import text_encoder

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


def tiny_t5_sentencepiece(path: str, *, seed: int = 0, vocab_size: int = 40) -> str:
  """A tiny random T5 encoder in the Hub's t5-v1_1 layout: the weights, a SentencePiece
  ``spiece.model`` (trained here on the fake COCO's captions; pad 0, </s> 1, unk 2 as T5's) and a
  ``tokenizer_config.json`` naming T5Tokenizer, with no ``tokenizer.json``: transformers converts
  the SentencePiece model itself, as for ``google/t5-v1_1-xxl``."""
  import io  # pylint: disable=import-outside-toplevel
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(all_captions() * 20), model_writer=buf, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "spiece.model"), "wb") as f:
    f.write(buf.getvalue())
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512}, f)
  cfg = transformers.T5Config(vocab_size=vocab_size, d_model=DIM, d_kv=8, d_ff=32, num_layers=1,
                              num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=0,
                              eos_token_id=1, decoder_start_token_id=0)
  torch.manual_seed(seed)
  transformers.T5EncoderModel(cfg).save_pretrained(path)
  return str(path)


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
