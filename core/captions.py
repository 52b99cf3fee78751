"""The evaluation caption set of a text-to-image data set (Table 8, Figure 8).

Zero-shot COCO FID@30K samples one image per caption for 30K captions drawn at random from the
validation set. The draw is made once (seeded) at preparation time and written beside the shards,
so every evaluation of every model uses the same captions and the same text embeddings:

  <data_dir>/eval_captions/meta.json      {"encoder", "max_len", "dim", "seed", "count", "split"}
  <data_dir>/eval_captions/captions.jsonl one {"key": image key, "caption": text} per line
  <data_dir>/eval_captions/text_emb.npy   float16 [count, max_len, dim] encoder outputs
  <data_dir>/eval_captions/text_mask.npy  bool [count, max_len], True on real (non-pad) tokens

:func:`write_eval_captions` makes the draw from a prepared split's records (two passes: the
captions, then the drawn embeddings, streamed to disk, since 30K x 128 x 4096 float16 is 31 GB):
the (image key, caption) pairs in record order, ``count`` of them drawn by
``numpy.random.default_rng(seed)`` without replacement; when the split has fewer captions than
``count`` (COCO 2017's val has 25,014) the draw cycles through fresh permutations, so every caption
is used before any is used twice (``meta["repeats"]`` says so).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from typing import Any, Callable, Iterable

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
  _write_texts(tmp, captions.keys, captions.captions)
  np.save(os.path.join(tmp, "text_emb.npy"), captions.text_emb.astype(np.float16))
  np.save(os.path.join(tmp, "text_mask.npy"), captions.text_mask.astype(bool))
  _write_meta(tmp, captions.meta, n, captions.text_emb.shape)
  return _install(tmp, out)


def _write_texts(folder: str, keys: Iterable[str], texts: Iterable[str]) -> None:
  with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
    for key, caption in zip(keys, texts):
      f.write(json.dumps({"key": key, "caption": caption}, ensure_ascii=False) + "\n")


def _write_meta(folder: str, meta: dict, n: int, shape: tuple[int, ...]) -> None:
  meta = dict(meta, count=n, max_len=int(shape[1]), dim=int(shape[2]))
  with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)


def _install(tmp: str, out: str) -> str:
  """Renames the finished folder ``tmp`` to ``out``, replacing an older one."""
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
                    "the data with captions: python -m core.data prepare src=<COCO root> captions=true "
                    "text_encoder=... (or src=emoji captions=true) ...")
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


def draw(total: int, count: int, seed: int) -> np.ndarray:
  """``count`` indices into ``range(total)``: a seeded draw without replacement, cycling through
  fresh permutations when ``count > total``."""
  if total <= 0:
    raise UserError("the evaluation split has no captions; prepare it with captions (splits=eval)")
  rng = np.random.default_rng(seed)
  if count <= total:
    return rng.choice(total, size=count, replace=False)
  reps = -(-count // total)
  return np.concatenate([rng.permutation(total) for _ in range(reps)])[:count]


def write_eval_captions(data_dir: str, records: Callable[[], Iterable[dict[str, Any]]], *,
                        count: int, seed: int, meta: dict) -> EvalCaptions:
  """Draws ``count`` captions from ``records()`` (decoded records with 'key', 'captions',
  'text_emb' [C, T, D] and 'text_mask'; called twice) and writes them under ``data_dir``."""
  pairs = [(r["key"], i, c) for r in records() for i, c in enumerate(r["captions"])]
  idx = draw(len(pairs), count, seed)
  where: dict[tuple[str, int], list[int]] = {}
  for row, j in enumerate(idx):
    where.setdefault(pairs[j][:2], []).append(row)
  out = os.path.join(data_dir, DIRNAME)
  tmp = out + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  emb = mask = None
  for r in records():
    for i in range(len(r["captions"])):
      rows = where.get((r["key"], i))
      if not rows:
        continue
      if emb is None:
        t, d = r["text_emb"].shape[-2:]
        emb = np.lib.format.open_memmap(os.path.join(tmp, "text_emb.npy"), "w+", np.float16,
                                        (count, t, d))
        mask = np.zeros((count, t), bool)
      emb[rows] = r["text_emb"][i]
      mask[rows] = r["text_mask"][i]
  assert emb is not None and mask is not None
  emb.flush()
  shape = emb.shape
  del emb
  np.save(os.path.join(tmp, "text_mask.npy"), mask)
  _write_texts(tmp, (pairs[j][0] for j in idx), (pairs[j][2] for j in idx))
  _write_meta(tmp, dict(meta, seed=int(seed), repeats=bool(count > len(pairs)),
                        available=len(pairs)), count, shape)
  _install(tmp, out)
  return load_eval_captions(data_dir)
