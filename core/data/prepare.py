"""Preparing a data set: an image source -> ArrayRecord shards of ADM-resized uint8 RGB.

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

from core import progress as progress_lib
from core.data import emoji, records
from core.data.preprocess import load_image
from core.data.records import SPLITS
from core.data.sources import IMAGE_EXTENSIONS, Item, Source, scan_folder
from core.errors import UserError, first_line
from core.io import storage

TARGET_SHARD_BYTES = 512 * 2**20

# ---------------------------------------------------------------------------------------------
# Writing.


def _decode_item(args: tuple[Item, int]) -> tuple[np.ndarray | None, str]:
  """Worker: (image or None, reason when None). Never raises on a bad file."""
  item, res = args
  try:
    return load_image(item.data if item.data is not None else item.path, res), ""
  except Exception as e:  # corrupt, truncated, not an image, unreadable: skip and count
    return None, f"{type(e).__name__}: {str(e)[:120]}"


def _decode_chunk(items: list[Item], res: int) -> list[tuple[np.ndarray | None, str]]:
  return [_decode_item((it, res)) for it in items]


def _map_items(items: list[Item], res: int, workers: int, chunk: int = 64
               ) -> Iterator[tuple[np.ndarray | None, str]]:
  """(image or None, reason) for each item, in order; decoded by ``workers`` processes."""
  if workers <= 1 or len(items) < chunk:
    yield from (_decode_item((it, res)) for it in items)
    return
  # spawn, not fork: callers (a trainer preparing the default set) may have JAX threads running.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
    pending: collections.deque = collections.deque()
    for start in range(0, len(items), chunk):  # a bounded window of chunks in flight
      pending.append(ex.submit(_decode_chunk, items[start:start + chunk], res))
      if len(pending) >= 4 * workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


def write_split(items: list[Item], split: str, res: int, out_dir: str, *, shards: int = 0,
                workers: int = 1, text_emb: dict[str, np.ndarray] | None = None,
                progress: bool = True) -> dict[str, Any]:
  """Decodes, preprocesses and writes one split; returns {'count', 'skipped', 'shards', ...}."""
  if shards <= 0:
    shards = max(1, math.ceil(len(items) * res * res * 3 / TARGET_SHARD_BYTES))
  shards = max(1, min(shards, max(1, len(items))))
  names = records.shard_names(split, shards)
  writers = [ArrayRecordWriter(os.path.join(out_dir, n), records.WRITER_OPTIONS)
             for n in names]
  counts = [0] * shards
  written, skipped, examples = 0, 0, []
  bar = progress_lib.Progress(len(items), desc=f"prepare {split}", unit="img", enabled=progress)
  try:
    for item, (image, reason) in zip(items, _map_items(items, res, workers)):
      bar.advance()
      emb = None
      if image is not None and text_emb is not None:
        emb = text_emb.get(os.path.splitext(os.path.basename(item.key))[0])
        if emb is None:
          image, reason = None, "no text embedding for this image"
      if image is None:
        skipped += 1
        if len(examples) < 10:
          examples.append(f"{item.key}: {reason}")
        continue
      shard = written % shards  # round robin keeps the shards balanced whatever gets skipped
      try:
        writers[shard].write(records.encode_record(image, item.label, key=item.key, text_emb=emb))
      except RuntimeError as e:  # ArrayRecord reports failed writes (disk full, ...) as these
        raise OSError(first_line(e)) from None
      counts[shard] += 1
      written += 1
  finally:
    bar.close()
    close_error = None
    for w in writers:
      try:
        w.close()  # flushes: where a full disk usually shows
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
          "shard_counts": [c for c in counts if c > 0], "skipped_examples": examples}


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


def write_dataset(source: Source, res: int, out_dir: str, *, shards: int = 0, workers: int = 1,
                  text_emb: dict[str, np.ndarray] | None = None, progress: bool = True,
                  source_name: str | None = None) -> dict[str, Any]:
  """Writes every split of ``source`` plus meta.json and label_map.json into a local directory."""
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  meta: dict[str, Any] = {
      "format": records.FORMAT, "resolution": res, "num_classes": len(source.class_names),
      "class_names": list(source.class_names), "source": source_name or source.description,
      "preprocessing": "adm_center_crop (BOX halving while min side >= 2*res, BICUBIC, center "
                       "crop); alpha composited on white",
      "has_text_emb": text_emb is not None,
      "counts": {}, "skipped": {}, "shards": {}, "shard_counts": {}, "skipped_examples": {},
  }
  n_ref = len(source.items.get("train", [])) or max(len(v) for v in source.items.values())
  for split, items in source.items.items():
    split_shards = 0  # auto
    if shards > 0:
      split_shards = max(1, math.ceil(shards * len(items) / max(1, n_ref)))
    r = write_split(items, split, res, out_dir, shards=split_shards, workers=workers,
                    text_emb=text_emb, progress=progress)
    meta["counts"][split] = r["count"]
    meta["skipped"][split] = r["skipped"] + source.skipped.get(split, 0)
    meta["shards"][split] = r["shards"]
    meta["shard_counts"][split] = r["shard_counts"]
    meta["skipped_examples"][split] = (source.skipped_examples.get(split, []) +
                                       r["skipped_examples"])[:10]
  meta["prepare_seconds"] = round(time.time() - t0, 2)
  with open(os.path.join(out_dir, "label_map.json"), "w") as f:
    json.dump({c: i for i, c in enumerate(source.class_names)}, f, indent=1)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def summary_line(meta: dict[str, Any]) -> str:
  parts = [f"{s}: {meta['counts'][s]} written, {meta['skipped'][s]} skipped"
           for s in meta["counts"]]
  res = meta["resolution"]
  return f"prepared {res}x{res} ({meta['num_classes']} classes) -- " + "; ".join(parts)

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


def prepare(src: str, res: int, out: str, *, eval_fraction: float | None = None, shards: int = 0,
            splits: Sequence[str] = SPLITS, val_labels: str | None = None,
            text_emb: str | None = None, workers: int = 1, max_images: int = 0,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Prepares ``src`` at resolution ``res`` into ``out`` (local or gs://); returns the meta dict."""
  if res <= 0:
    raise UserError(f"res={res} must be a positive image size, e.g. res=64")
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise UserError(f"splits={','.join(splits)} must name some of: {', '.join(SPLITS)}")
  _check_out(out, overwrite)
  if emoji.is_emoji_source(src):
    source = emoji.emoji_source(None if src == "emoji" else src,
                                   eval_fraction=eval_fraction, splits=splits)
  else:
    if not os.path.exists(src):
      raise UserError(f"src={src!r} does not exist; pass an image folder, an ImageNet root "
                      f"(train/, val/) or src=emoji")
    source = scan_folder(src, eval_fraction=eval_fraction, val_labels=val_labels, splits=splits)
  if max_images > 0:
    source.items = {s: v[:max_images] for s, v in source.items.items()}
  if not any(source.items.values()):
    listed = sum(source.skipped.values())
    raise UserError(f"src={src!r} holds no image files" +
                    (f" ({listed} listed but not usable, e.g. {_first_example(source)})"
                     if listed else "") +
                    f" for splits {','.join(splits)}; point src= at a folder of images "
                    f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
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
                         progress=progress)
    if not sum(meta["counts"].values()):
      n = sum(len(v) for v in source.items.values())
      examples = [e for v in meta["skipped_examples"].values() for e in v]
      raise UserError(f"none of the {n} files of src={src!r} could be read as an image (e.g. "
                      f"{examples[0] if examples else '?'}); nothing was written to out={out!r}")
    if storage.is_remote(out):
      base = out.rstrip("/")
      if overwrite and storage.exists(f"{base}/meta.json"):
        storage.remove(f"{base}/meta.json")  # readers never see the old meta with new shards
      for n in sorted(os.listdir(tmp), key=lambda n: n == "meta.json"):  # meta.json last
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


def default_data_dir(res: int, root: str | None = None, *, progress: bool = False) -> str:
  """``<data root>/emoji-<res>``, prepared from the emoji tarball on first use (process-safe)."""
  root = root or records.data_root()
  out = os.path.join(root, f"emoji-{res}")
  if os.path.exists(os.path.join(out, "meta.json")):
    return out
  tarball = emoji.emoji_tarball(root)
  with records.locked(os.path.join(root, f".emoji-{res}.lock")):
    if os.path.exists(os.path.join(out, "meta.json")):  # another process finished meanwhile
      return out
    if os.path.exists(out):  # left over by a crash before meta.json existed: never a valid set
      shutil.rmtree(out)
    tmp = records.make_temp_dir(root, f".emoji-{res}.tmp-")
    try:
      meta = write_dataset(emoji.emoji_source(tarball), res, tmp, workers=1, progress=progress,
                           source_name=f"npm:{emoji.PACKAGE}@{emoji.VERSION}")
      os.rename(tmp, out)  # atomic on one file system
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  print(summary_line(meta) + f" -> {out} in {meta['prepare_seconds']:.1f} s", file=sys.stderr)
  return out
