"""Preparing a data set: an image source -> ArrayRecord shards of ADM-resized RGB images.

Each record holds the smaller of a PNG of the ADM-preprocessed pixels and the source file's own
bytes (re-cropped identically at load; core/data/records.py, docs/data.md).

``python -m core.data prepare src=<source> res=<int> out=<dir or gs://...>`` (see ``--help``).
Unreadable files are skipped and counted, never fatal, but a source with no readable image is
refused. Everything is written to a temporary directory renamed into place, so a failed prepare
leaves no half-written data set. :func:`default_data_dir` prepares the built-in emoji set.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from typing import Any, Iterator, Sequence

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
import PIL

from core import progress as progress_lib
from core.data import captions as captions_lib
from core.data import sources as sources_lib
from core.data import caption_folder, coco, emoji, imagenet, records
from core.data import text_encoder as text_lib
from core.data.preprocess import ImageTooSmall, load_image, parse_res
from core.data.records import SPLITS
from core.data.sources import IMAGE_EXTENSIONS, Item, Source, scan_folder
from core.errors import UserError, first_line
from core.io import storage

TARGET_SHARD_BYTES = 512 * 2**20


def _decode_item(args: tuple[Item, Any, bool]) -> tuple[dict[str, Any] | None, str, bool]:
  """Worker: (encoded image (records.encode_image: a PNG of the ADM-preprocessed pixels, or the
  source file's bytes when those are smaller) or None, reason when None, rotated (only for a
  non-square res)). Never raises on a bad file; an image smaller than the target without
  ``upscale`` is a UserError."""
  item, res, upscale = args
  try:
    data = item.content()
    if isinstance(data, str):  # a file on disk: its bytes (records may keep them, records.py)
      with open(data, "rb") as f:
        data = f.read()
    image, rotated = load_image(data, res, upscale=upscale, rotate=True)
    return records.encode_image(image, data), "", rotated
  except ImageTooSmall as e:
    h, w = parse_res(res)
    raise UserError(f"image {item.key} is {e}; pass upscale=true to enlarge small images "
                    f"(BICUBIC) or a res= smaller than {h if h == w else f'{h}x{w}'}") from None
  except Exception as e:  # corrupt, truncated, not an image, unreadable: skip and count
    return None, f"{type(e).__name__}: {str(e)[:120]}", False


def _decode_chunk(items: list[Item], res, upscale: bool
                  ) -> list[tuple[dict[str, Any] | None, str, bool]]:
  return [_decode_item((it, res, upscale)) for it in items]


def _map_items(items: list[Item], res, workers: int, chunk: int = 64, upscale: bool = True
               ) -> Iterator[tuple[dict[str, Any] | None, str, bool]]:
  """(encoded image or None, reason, rotated) for each item, in order; made by ``workers``
  processes."""
  if workers <= 1 or len(items) < chunk:
    yield from (_decode_item((it, res, upscale)) for it in items)
    return
  # spawn, not fork: callers (a trainer preparing the default set) may have JAX threads running.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
    pending: collections.deque = collections.deque()
    for start in range(0, len(items), chunk):  # a bounded window of chunks in flight
      pending.append(ex.submit(_decode_chunk, items[start:start + chunk], res, upscale))
      if len(pending) >= 4 * workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def _encoded_chunks(items: list[Item], encoder, dtype: str, chunk: int = 32
                    ) -> Iterator[tuple[np.ndarray | None, np.ndarray | None]]:
  """(text_emb [C, T, D], text_mask [C, T]) of each item's captions, encoded ``chunk`` items at a
  time (bounded memory); (None, None) for an item without captions or without an encoder."""
  for start in range(0, len(items), chunk):
    part = items[start:start + chunk]
    texts = [c for it in part for c in it.captions]
    if encoder is None or not texts:
      yield from ((None, None) for _ in part)
      continue
    emb, mask = encoder.encode(texts)
    emb = emb.astype(dtype)
    i = 0
    for it in part:
      n = len(it.captions)
      yield (emb[i:i + n], mask[i:i + n]) if n else (None, None)
      i += n


def write_split(items: list[Item], split: str, res, out_dir: str, *, shards: int = 0,
                workers: int = 1, text_emb: dict[str, np.ndarray] | None = None,
                progress: bool = True, encoder=None, upscale: bool = True,
                text_dtype: str = "float16") -> dict[str, Any]:
  """Decodes, preprocesses and writes one split; returns {'count', 'skipped', 'shards', ...}.

  With ``encoder`` (a :class:`core.data.text_encoder.TextEncoder`), every caption of each item is
  encoded and stored with its mask; images without a caption are skipped. Records of a text or
  non-square data set carry the 'portrait' flag.
  """
  h, w = parse_res(res)
  if shards <= 0:
    text = encoder.dim * 5 * 24 * 2 if encoder is not None else 0  # ~COCO: 5 captions x 24 tokens
    shards = max(1, math.ceil(len(items) * (h * w * 3 + text) / TARGET_SHARD_BYTES))
  shards = max(1, min(shards, max(1, len(items))))
  names = records.shard_names(split, shards)
  writers = [ArrayRecordWriter(os.path.join(out_dir, n), records.WRITER_OPTIONS)
             for n in names]
  counts = [0] * shards
  written, skipped, examples = 0, 0, []
  flag = encoder is not None or h != w
  codecs = dict.fromkeys(records.CODECS, 0)
  bar = progress_lib.Progress(len(items), desc=f"prepare {split}", unit="img",
                             enabled=progress)
  try:
    for item, (image, reason, rotated), (cap_emb, cap_mask) in zip(
        items, _map_items(items, res, workers, upscale=upscale),
        _encoded_chunks(items, encoder, text_dtype)):
      bar.advance()
      emb = cap_emb
      if image is not None and text_emb is not None:
        emb = text_emb.get(os.path.splitext(os.path.basename(item.key))[0])
        if emb is None:
          image, reason = None, "no text embedding for this image"
      if image is not None and encoder is not None and cap_emb is None:
        image, reason = None, "no caption for this image"
      if image is None:
        skipped += 1
        if len(examples) < 10:
          examples.append(f"{item.key}: {reason}")
        continue
      shard = written % shards  # round robin keeps the shards balanced whatever gets skipped
      try:
        writers[shard].write(records.encode_record(
            image, item.label, key=item.key, text_emb=emb, text_mask=cap_mask,
            captions=item.captions if cap_emb is not None else None,
            portrait=rotated if flag else None))
      except RuntimeError as e:  # ArrayRecord reports failed writes (disk full, ...) as these
        raise OSError(first_line(e)) from None
      counts[shard] += 1
      codecs[image["codec"]] += 1
      written += 1
  finally:
    bar.close()
    close_error = None
    for wr in writers:
      try:
        wr.close()  # flushes: where a full disk usually shows
      except RuntimeError as e:
        close_error = close_error or e
  if close_error is not None:
    raise OSError(first_line(close_error))
  # Drop shards left empty (only possible when nearly everything was skipped).
  keep = [n for n, c in zip(names, counts) if c > 0]
  for n, c in zip(names, counts):
    if c == 0:
      os.remove(os.path.join(out_dir, n))
  return {"count": written, "skipped": skipped, "shards": keep,
          "shard_counts": [c for c in counts if c > 0], "skipped_examples": examples,
          "shard_bytes": [os.path.getsize(os.path.join(out_dir, n)) for n in keep],
          "codecs": codecs}


def _load_text_emb(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise UserError(f"text_emb={path!r} does not exist; pass an .npz of arrays keyed by image file "
                    f"stem")
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz of named arrays")
    with z:
      return {os.path.splitext(os.path.basename(k))[0]: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"text_emb={path!r} is not a readable .npz ({first_line(e)}); pass an .npz "
                    f"of arrays keyed by image file stem (numpy.savez)") from None


def write_dataset(source: Source, res, out_dir: str, *, shards: int = 0, workers: int = 1,
                  text_emb: dict[str, np.ndarray] | None = None, progress: bool = True,
                  source_name: str | None = None, encoder=None, upscale: bool | None = None,
                  eval_captions: int = 0, caption_seed: int = 0) -> dict[str, Any]:
  """Writes every split of ``source`` plus meta.json and label_map.json into a local directory;
  with ``encoder`` also the ``eval_captions`` evaluation captions drawn from split 'eval'."""
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  h, w = parse_res(res)
  up = {s: source.upscale_of(s) if upscale is None else upscale for s in source.items}
  fixed = [s for s in source.items if not up[s]]
  meta: dict[str, Any] = {
      "format": records.FORMAT, "resolution": h if h == w else [h, w], "image_size": [h, w],
      "num_classes": len(source.class_names),
      "class_names": list(source.class_names), "source": source_name or source.description,
      "preprocessing": "adm_center_crop (BOX halving while both sides >= 2x target, BICUBIC, "
                       "center crop); alpha composited on white" + ("" if h == w else
                       "; portrait images rotated 90 degrees counter-clockwise (flag 'portrait')") +
                       ("" if not fixed else "; no upscaling" + (
                           "" if len(fixed) == len(up) else f" ({', '.join(fixed)})")),
      "has_text_emb": text_emb is not None or encoder is not None,
      # Each record: a PNG of the pixels, or the source file re-cropped at load (records.py).
      "image_encoding": "png or source file (smaller of the two, per record)",
      "decoder": {"pillow": PIL.__version__}, "codecs": {},
      **origins(source),
      "counts": {}, "skipped": {}, "shards": {}, "shard_counts": {}, "shard_bytes": {},
      "skipped_examples": {},
  }
  if encoder is not None:
    meta["text"] = dict(encoder.describe(), dtype="float16", captions="all per image")
  n_ref = len(source.items.get("train", [])) or max(len(v) for v in source.items.values())
  for split, items in source.items.items():
    split_shards = 0  # auto
    if shards > 0:
      split_shards = max(1, math.ceil(shards * len(items) / max(1, n_ref)))
    r = write_split(items, split, (h, w), out_dir, shards=split_shards, workers=workers,
                    text_emb=text_emb, progress=progress, encoder=encoder, upscale=up[split])
    meta["counts"][split] = r["count"]
    meta["skipped"][split] = r["skipped"] + source.skipped.get(split, 0)
    meta["shards"][split] = r["shards"]
    meta["shard_counts"][split] = r["shard_counts"]
    meta["shard_bytes"][split] = r["shard_bytes"]
    meta["codecs"][split] = r["codecs"]
    meta["skipped_examples"][split] = (source.skipped_examples.get(split, []) +
                                       r["skipped_examples"])[:10]
  if encoder is not None and eval_captions > 0 and meta["counts"].get("eval"):
    names = meta["shards"]["eval"]
    ec = captions_lib.write_eval_captions(
        out_dir, lambda: records.split_records(out_dir, names), count=eval_captions,
        seed=caption_seed,
        meta=dict(encoder.describe(), split="eval"))
    meta["eval_captions"] = {"count": len(ec.captions), "seed": caption_seed,
                             "repeats": ec.meta["repeats"]}
  meta["prepare_seconds"] = round(time.time() - t0, 2)
  with open(os.path.join(out_dir, "label_map.json"), "w") as f:
    json.dump({c: i for i, c in enumerate(source.class_names)}, f, indent=1)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def origins(source: Source) -> dict[str, Any]:
  """meta.json's record of where each split comes from and what that means for evaluation:
  ``trained_on_coco`` (the train split is COCO: a COCO FID is then not zero-shot) and
  ``zero_shot`` (the eval split comes from other data than the train split; None without both)."""
  where = {s: source.origin_of(s) for s in source.items}
  family = {s: re.sub(r"\d+$", "", o) for s, o in where.items()}  # coco2014 and coco2017 alike
  known = family.get("train") and family.get("eval")
  return {"split_origins": where,
          "trained_on_coco": family.get("train") == "coco",
          "zero_shot": family["train"] != family["eval"] if known else None}


def summary_line(meta: dict[str, Any]) -> str:
  parts = [f"{s}: {meta['counts'][s]} written, {meta['skipped'][s]} skipped"
           for s in meta["counts"]]
  h, w = meta.get("image_size") or [meta["resolution"]] * 2
  what = "captioned" if meta.get("text") else f"{meta['num_classes']} classes"
  return f"prepared {h}x{w} ({what}) -- " + "; ".join(parts)


def _install_local(tmp: str, out: str, overwrite: bool) -> None:
  """Moves the finished files of tmp into out (an atomic directory rename when out is new)."""
  try:
    os.rename(tmp, out)
    return
  except OSError:
    if not os.path.isdir(out):
      raise
  old_meta = os.path.join(out, "meta.json")
  if os.path.exists(old_meta):
    if not overwrite:
      raise UserError(f"out={out!r} already holds a prepared data set; pass overwrite=true or "
                      f"choose another out=")
    for n in sorted(os.listdir(out)):  # the old shards, by name (its meta.json may be damaged)
      if records.SHARD_NAME.fullmatch(n):
        os.remove(os.path.join(out, n))
    shutil.rmtree(os.path.join(out, "eval_captions"), ignore_errors=True)
  names = sorted(os.listdir(tmp), key=lambda n: n == "meta.json")  # meta.json last
  for n in names:
    os.replace(os.path.join(tmp, n), os.path.join(out, n))
  os.rmdir(tmp)


def _unwritable(out: str, reason: str) -> UserError:
  return UserError(f"cannot write the data set to out={out!r} ({reason}); free space or choose "
                   f"a writable out=")


def _os_reason(e: OSError) -> str:
  return f"{e.strerror or e}" + (f": {e.filename}" if isinstance(e.filename, str) else "")


def _check_writable(out: str) -> None:
  """UserError unless out (or, when it does not exist yet, its nearest existing parent) and the
  parent that gets the temporary directory are writable: prepare would otherwise fail only after
  decoding every image. (os.access also reports read-only file systems.)"""
  path = os.path.abspath(out)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  parent = os.path.dirname(os.path.abspath(out))
  for d in (path, parent):
    if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
      raise _unwritable(out, f"{d} is read-only or not writable by this user")


def _check_out(out: str, overwrite: bool) -> None:
  if storage.is_remote(out):
    if storage.exists(out.rstrip("/") + "/meta.json") and not overwrite:
      raise UserError(f"out={out!r} already holds a prepared data set; pass overwrite=true or "
                      f"choose another out=")
    return
  _check_writable(out)
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise UserError(f"out={out!r} exists and is not a directory")
    if os.path.exists(os.path.join(out, "meta.json")):
      if not overwrite:
        raise UserError(f"out={out!r} already holds a prepared data set; pass overwrite=true or "
                        f"choose another out=")
    elif os.listdir(out):
      raise UserError(f"out={out!r} is a non-empty directory without meta.json; choose an empty "
                      f"or new directory")


def prepare(src: str, res, out: str, *, eval_fraction: float | None = None, shards: int = 0,
            splits: Sequence[str] = SPLITS, val_labels: str | None = None,
            text_emb: str | None = None, workers: int = 1, max_images: int = 0,
            overwrite: bool = False, progress: bool = True, captions: bool | None = None,
            text_encoder: str | None = None, max_len: int = 0, upscale: bool | None = None,
            eval_captions: int = 0, caption_seed: int = 0,
            eval_src: str | None = None) -> dict[str, Any]:
  """Prepares ``src`` at resolution ``res`` (int or HxW) into ``out`` (local or gs://); returns the
  meta dict. ``captions`` (default: on for a COCO layout or a caption folder) keeps every caption
  of each image with its ``text_encoder`` embeddings (``max_len`` tokens) and writes
  ``eval_captions`` of them. ``eval_src``: the eval split comes from this source instead (all of
  ``src`` is then train), e.g. a caption folder evaluated zero-shot on COCO."""
  res = parse_res(res)
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise UserError(f"splits={','.join(splits)} must name some of: {', '.join(SPLITS)}")
  _check_out(out, overwrite)
  is_emoji = emoji.is_emoji_source(src)
  if captions is None:
    captions = not is_emoji and _captioned(src)
  if captions and text_emb:
    raise UserError("pass either captions=true (text_encoder= embeds them) or text_emb=<.npz>")
  if eval_src:  # e.g. train on a caption folder, evaluate zero-shot on COCO's validation set
    if eval_fraction is not None:
      raise UserError("eval_fraction= does not apply with eval_src=, which gives the eval split")
    every = None if imagenet.is_imagenet(src) else 0.0  # all of src is train
    train_part = "train" in splits and _source(src, captions, every, val_labels, ["train"])
    eval_part = "eval" in splits and _source(eval_src, captions, None, val_labels, ["eval"])
    source = (sources_lib.merge(train_part, eval_part) if train_part and eval_part
              else train_part or eval_part)
  else:
    source = _source(src, captions, eval_fraction, val_labels, splits)
  if max_images > 0:
    source.items = {s: v[:max_images] for s, v in source.items.items()}
  if not any(source.items.values()):
    listed = sum(source.skipped.values())
    raise UserError(f"src={src!r} holds no image files" +
                    (f" ({listed} listed but not usable, e.g. {_first_example(source)})"
                     if listed else "") +
                    f" for splits {','.join(splits)}; point src= at a folder of images "
                    f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
  encoder = None
  if captions:
    if is_emoji:  # the demo's offline encoder (core.data.emoji.emoji_text_encoder)
      text_encoder = text_encoder or emoji.emoji_text_encoder()
      max_len = max_len or emoji.EMOJI_MAX_LEN
    encoder = text_lib.TextEncoder(text_encoder or text_lib.DEFAULT_ENCODER,
                                   max_len or text_lib.DEFAULT_MAX_LEN)
    if eval_captions <= 0:  # COCO FID@30K; the emoji set: one draw of each eval caption
      eval_captions = 30_000 if not is_emoji else sum(len(i.captions)
                                                   for i in source.items.get("eval", []))
  emb = _load_text_emb(text_emb) if text_emb else None
  tmp = None
  try:
    if storage.is_remote(out):
      tmp = records.make_temp_dir(None, "sd-prepare-")
    else:
      parent = os.path.dirname(os.path.abspath(out))
      os.makedirs(parent, exist_ok=True)
      _remove_stale_temps(out)
      tmp = records.make_temp_dir(parent,
                                  _temp_prefix(out) + f"{socket.gethostname()}-{os.getpid()}-")
    meta = write_dataset(source, res, tmp, shards=shards, workers=workers, text_emb=emb,
                         progress=progress, encoder=encoder, upscale=upscale,
                         eval_captions=eval_captions, caption_seed=caption_seed)
    if not sum(meta["counts"].values()):
      n = sum(len(v) for v in source.items.values())
      examples = [e for v in meta["skipped_examples"].values() for e in v]
      raise UserError(f"none of the {n} files of src={src!r} could be read as an image (e.g. "
                      f"{examples[0] if examples else '?'}); nothing was written to out={out!r}")
    if storage.is_remote(out):
      base = out.rstrip("/")
      if overwrite and storage.exists(f"{base}/meta.json"):
        storage.remove(f"{base}/meta.json")  # readers never see the old meta with new shards
      files = [os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs]
      for n in sorted(files, key=lambda n: n == "meta.json"):  # meta.json last
        storage.copy_from_local(os.path.join(tmp, n), f"{base}/{n}")
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      _install_local(tmp, out, overwrite)
  except OSError as e:  # read-only or full disk, permissions changed while preparing
    raise _unwritable(out, _os_reason(e)) from None
  finally:
    if tmp is not None and os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _captioned(src: str) -> bool:
  """A COCO root (annotations/) or a folder with captions.jsonl: a captioned set by default."""
  return os.path.isdir(os.path.join(src, "annotations")) or caption_folder.is_caption_folder(src)


def _source(src: str, captions: bool, eval_fraction: float | None, val_labels: str | None,
            splits: Sequence[str]) -> Source:
  """The Source of ``src``: the emoji set, COCO, a caption folder, ImageNet or an image folder."""
  if src == "coco":
    raise UserError("src=coco needs the COCO root: pass src=<folder with train2014/, val2014/ and "
                    "annotations/> (captions are then on)")
  if emoji.is_emoji_source(src):
    return emoji.emoji_source(None if src == "emoji" else src, eval_fraction=eval_fraction,
                              splits=splits, captions=bool(captions))
  if not os.path.exists(src):
    raise UserError(f"src={src!r} does not exist; pass an image folder, an ImageNet root "
                    f"(train/, val/), a COCO root (with captions=true) or src=emoji")
  if captions and os.path.isdir(os.path.join(src, "annotations")):
    return coco.coco_source(src, splits=splits)
  if captions:
    return caption_folder.caption_folder_source(src, eval_fraction=eval_fraction, splits=splits)
  scan = imagenet.imagenet_source if imagenet.is_imagenet(src) else scan_folder
  return scan(src, eval_fraction=eval_fraction, val_labels=val_labels, splits=splits)


def _temp_prefix(out: str) -> str:
  return f".{os.path.basename(os.path.abspath(out))}.tmp-"


def _remove_stale_temps(out: str) -> None:
  """Deletes the temporary directories that killed prepares of ``out`` left beside it: those
  named with this host and the id of a process that no longer runs (a temporary directory of a
  whole ImageNet is hundreds of GB). Other hosts' (on a shared file system) are left alone."""
  parent = os.path.dirname(os.path.abspath(out))
  pattern = re.compile(re.escape(_temp_prefix(out)) + r"(.+)-(\d+)-[^-]+")
  for n in os.listdir(parent):
    m = pattern.fullmatch(n)
    if not m or m.group(1) != socket.gethostname() or _alive(int(m.group(2))):
      continue
    shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
    print(f"removed {os.path.join(parent, n)}, left by an interrupted prepare (process "
          f"{m.group(2)})", file=sys.stderr)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _first_example(source: Source) -> str:
  return next((e for v in source.skipped_examples.values() for e in v), "?")


def default_data_dir(res: int, root: str | None = None, *, progress: bool = False,
                     captions: bool = False) -> str:
  """``<data root>/emoji-<res>`` (or, with ``captions``, ``emoji-captions-<res>``: the captioned
  text-to-image set with the demo's :func:`core.data.emoji.emoji_text_encoder` embeddings and its
  evaluation captions), prepared from the emoji tarball on first use (concurrency-safe)."""
  root = root or records.data_root()
  name = f"emoji-captions-{res}" if captions else f"emoji-{res}"
  out = os.path.join(root, name)
  if os.path.exists(os.path.join(out, "meta.json")):
    return out
  tarball = emoji.emoji_tarball(root)
  encoder = None
  if captions:
    encoder = text_lib.TextEncoder(emoji.emoji_text_encoder(root), emoji.EMOJI_MAX_LEN,
                                  device="cpu")
  with records.locked(os.path.join(root, f".{name}.lock")):
    if os.path.exists(os.path.join(out, "meta.json")):  # another process finished meanwhile
      return out
    if os.path.exists(out):  # left over by a crash before meta.json existed: never a valid set
      shutil.rmtree(out)
    tmp = records.make_temp_dir(root, f".{name}.tmp-")
    try:
      source = emoji.emoji_source(tarball, captions=captions)
      eval_count = sum(len(i.captions) for i in source.items.get("eval", []))
      label = f"npm:{emoji.PACKAGE}@{emoji.VERSION}" + (" captions" if captions else "")
      meta = write_dataset(source, res, tmp, workers=1, progress=progress, source_name=label,
                           encoder=encoder, eval_captions=eval_count)
      os.rename(tmp, out)  # atomic on one file system
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  print(summary_line(meta) + f" -> {out} in {meta['prepare_seconds']:.1f} s", file=sys.stderr)
  return out
