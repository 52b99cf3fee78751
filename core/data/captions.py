"""The evaluation caption set of a text-to-image data set (Table 8, Figure 8).

Zero-shot COCO FID@30K samples one image per caption for 30K captions drawn at random from the
validation set. The draw is made once (seeded) at preparation time and written beside the shards,
so every evaluation of every model uses the same captions and the same text embeddings:

  <data_dir>/eval_captions/meta.json      {"encoder", "max_len", "dim", "seed", "count", "split"}
  <data_dir>/eval_captions/captions.jsonl one {"key": image key, "caption": text} per line
  <data_dir>/eval_captions/text_emb.npy   float16 [count, max_len, dim] encoder outputs
  <data_dir>/eval_captions/text_mask.npy  bool [count, max_len], True on real (non-pad) tokens
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from core.errors import UserError

DIRNAME = "eval_captions"


@dataclasses.dataclass(frozen=True)
class EvalCaptions:
  keys: list[str]
  captions: list[str]
  text_emb: np.ndarray   # [N, T, D]
  text_mask: np.ndarray  # [N, T] bool
  meta: dict


def save_eval_captions(data_dir: str, captions: EvalCaptions) -> str:
  """Writes ``captions`` under ``<data_dir>/eval_captions`` (via a temporary folder, renamed)."""
  n = len(captions.captions)
  if not (len(captions.keys) == n == captions.text_emb.shape[0] == captions.text_mask.shape[0]):
    raise ValueError("keys, captions, text_emb and text_mask must have the same length")
  out = os.path.join(data_dir, DIRNAME)
  tmp = out + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, "captions.jsonl"), "w", encoding="utf-8") as f:
    for key, caption in zip(captions.keys, captions.captions):
      f.write(json.dumps({"key": key, "caption": caption}, ensure_ascii=False) + "\n")
  np.save(os.path.join(tmp, "text_emb.npy"), captions.text_emb.astype(np.float16))
  np.save(os.path.join(tmp, "text_mask.npy"), captions.text_mask.astype(bool))
  meta = dict(captions.meta, count=n, max_len=int(captions.text_emb.shape[1]),
              dim=int(captions.text_emb.shape[2]))
  with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  if os.path.isdir(out):
    os.rename(out, out + ".old")
  os.rename(tmp, out)
  if os.path.isdir(out + ".old"):
    for name in os.listdir(out + ".old"):
      os.remove(os.path.join(out + ".old", name))
    os.rmdir(out + ".old")
  return out


def load_eval_captions(data_dir: str) -> EvalCaptions:
  """Reads the caption set written by :func:`save_eval_captions`; one-line error if absent."""
  path = os.path.join(data_dir, DIRNAME)
  if not os.path.isfile(os.path.join(path, "meta.json")):
    raise UserError(f"{data_dir} has no {DIRNAME}/ (a text-to-image evaluation needs one); prepare "
                    "the data with captions: python -m core.data prepare src=coco|emoji_captions ...")
  with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  keys, texts = [], []
  with open(os.path.join(path, "captions.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      keys.append(row["key"])
      texts.append(row["caption"])
  emb = np.load(os.path.join(path, "text_emb.npy"), mmap_mode="r")
  mask = np.load(os.path.join(path, "text_mask.npy"))
  return EvalCaptions(keys, texts, emb, mask, meta)
