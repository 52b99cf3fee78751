"""Reading prepared data sets: a resumable, per-host-sharded grain loader and a whole-split reader.

:func:`make_train_loader` builds a grain ``DataLoader`` over the ArrayRecord shards written by
``python -m core.data prepare`` and returns its iterator. Every host (JAX process) reads a
disjoint share of each epoch's global shuffled order (grain ``ShardOptions``, the semantics of
``ShardByJaxProcess``) and yields ``{'image': uint8 [B, H, W, 3], 'label': int32 [B]}`` with
``B = global_batch_size / process_count``. Epochs repeat forever (or ``num_epochs`` times), each
with a new permutation. Horizontal flips (p = 1/2, as ADM's ``random_flip``; the paper does not say)
come from the per-record random generator grain derives from ``(seed, position in the stream)``,
so the whole stream is a function of the seed. Text-to-image sets add ``'text_emb'`` float [B, T, D],
``'text_mask'`` bool [B, T] (True on real tokens) and ``'portrait'`` int32 [B] (1 = the image was
rotated at preparation, Sec. 5; also on non-square class sets): records keep all captions of an
image and :class:`PickCaption` draws one per example per step from the same per-record generator
(after the flip), so caption draws resume exactly too. ``iterator.get_state()`` returns bytes and
``iterator.set_state(bytes)`` restores them: a resumed run sees exactly the batches an
uninterrupted run would (pinned by ``tests/test_input_pipeline.py``).

:func:`load_split` / :func:`iter_split` read a whole split in file order (e.g. the reference images
of FID train / FID eval, Section 5), and :func:`read_meta` returns ``meta.json``; compare its
``resolution`` with the model's.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, Iterator

from array_record.python.array_record_module import ArrayRecordReader
import grain
import numpy as np

from core import data
from core.errors import UserError


def _prepare_hint(data_dir: str) -> str:
  return (f"prepare it with: python -m core.data prepare src=<image folder or emoji> res=<res> "
          f"out={data_dir}")


def _reprepare_hint(data_dir: str) -> str:
  return (f"prepare it again with: python -m core.data prepare src=<image folder or emoji> "
          f"res=<res> out={data_dir} overwrite=true")


def _localize(data_dir: str) -> str:
  """A local directory holding ``data_dir``: gs:// data sets are copied once (through core.storage)
  to ``<data root>/gcs/<hash of URL and meta.json>``, since ArrayRecord readers need local files."""
  if not data_dir.startswith("gs://"):
    return data_dir
  from core import datasets, storage  # pylint: disable=g-import-not-at-top
  base = data_dir.rstrip("/")
  if not storage.exists(f"{base}/meta.json"):
    raise UserError(f"data set {data_dir!r} has no meta.json; {_prepare_hint(data_dir)}")
  meta_bytes = storage.read_bytes(f"{base}/meta.json")
  meta = parse_meta(meta_bytes, f"{base}/meta.json", data_dir)
  # Keyed by URL and content: a data set prepared again at the same URL gets a fresh copy.
  key = hashlib.sha1(base.encode() + b"\0" + meta_bytes).hexdigest()[:16]
  local = os.path.join(datasets.data_root(), "gcs", key)
  if os.path.exists(os.path.join(local, "meta.json")):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = data.make_temp_dir(os.path.dirname(local), ".gcs-")
  try:
    for n in [n for v in meta.get("shards", {}).values() for n in v] + ["label_map.json"]:
      storage.copy_to_local(f"{base}/{n}", os.path.join(tmp, n))
    with open(os.path.join(tmp, "meta.json"), "wb") as f:  # last: marks the copy complete
      f.write(meta_bytes)
    try:
      os.rename(tmp, local)
    except OSError:  # another process finished the same copy first
      pass
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return local


def read_meta(data_dir: str) -> dict[str, Any]:
  """The data set's meta.json (resolution, num_classes, class_names, counts, skipped, shards, ...)."""
  if not data_dir:
    raise UserError("no data set given; pass data_dir=<prepared directory>")
  if data_dir.startswith("gs://"):
    data_dir = _localize(data_dir)
  path = os.path.join(data_dir, "meta.json")
  if not os.path.isfile(path):
    what = "does not exist" if not os.path.exists(data_dir) else "has no meta.json"
    raise UserError(f"data set {data_dir!r} {what}; {_prepare_hint(data_dir)}")
  with open(path, "rb") as f:
    return parse_meta(f.read(), path, data_dir)


def parse_meta(raw: bytes, path: str, data_dir: str) -> dict[str, Any]:
  """meta.json's bytes -> dict; a UserError naming the fix when it is empty, not JSON, or lacks
  the fields a loader needs (a data set whose prepare was interrupted or whose file was edited)."""
  hint = _reprepare_hint(data_dir)
  if not raw.strip():
    raise UserError(f"{path} is empty; {hint}")
  try:
    meta = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {e.start}); {hint}") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                    f"{hint}") from None
  if not isinstance(meta, dict):
    raise UserError(f"{path} is not a JSON object; {hint}")
  if meta.get("format") != data.FORMAT:
    raise UserError(f"{path} has format {meta.get('format')!r}, expected {data.FORMAT!r}; {hint}")
  problem = _meta_problem(meta)
  if problem:
    raise UserError(f"{path} {problem}; {hint}")
  return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
  """What is wrong with a meta.json of the right format, or None."""
  r = meta.get("resolution")
  if not ((isinstance(r, int) and r > 0) or (isinstance(r, list) and len(r) == 2 and
                                            all(isinstance(x, int) and x > 0 for x in r))):
    return f"has no positive integer (or [H, W]) 'resolution' (got {r!r})"
  if not isinstance(meta.get("num_classes"), int):
    return "has no integer 'num_classes'"
  for key in ("shards", "shard_counts", "counts"):
    if not isinstance(meta.get(key), dict):
      return f"has no '{key}' object"
  for split, names in meta["shards"].items():
    counts = meta["shard_counts"].get(split)
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
        or not isinstance(counts, list) or len(counts) != len(names)
        or not all(isinstance(c, int) and c >= 0 for c in counts)):
      return f"lists split {split!r} without matching 'shards' and 'shard_counts'"
  return None


def image_size(meta: dict[str, Any]) -> tuple[int, int]:
  """(height, width) of a data set's images (``resolution`` is an int for square sets)."""
  r = meta["resolution"]
  return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


def _size(hw: tuple[int, int]) -> str:
  return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def damaged_shard(data_dir: str, name: str, reason: str) -> UserError:
  """The one-line error for a shard that cannot be read back as written."""
  reason = (reason.strip().splitlines() or [""])[0][:200] or "unreadable"
  return UserError(f"shard {name} of data set {data_dir!r} is damaged ({reason}); "
                   f"{_reprepare_hint(data_dir)}")


def _reason(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0] or type(e).__name__


def check_shards(data_dir: str, meta: dict[str, Any], splits=None, *, full: bool = False) -> int:
  """Opens every shard of ``splits`` (default all) and compares its record count with meta.json;
  with ``full`` also reads every record, which verifies ArrayRecord's (Riegeli's) per-chunk
  checksums and each record's header. Returns the number of records checked; a UserError naming
  the first damaged shard (zero bytes, truncated, a flipped byte, a missing file) and the fix."""
  total = 0
  for split in (meta["shards"] if splits is None else splits):
    for name, count in zip(meta["shards"].get(split, []), meta["shard_counts"].get(split, [])):
      path = os.path.join(data_dir, name)
      if not os.path.isfile(path):
        raise UserError(f"shard {path!r} listed in meta.json is missing; "
                        f"{_reprepare_hint(data_dir)}")
      try:
        reader = ArrayRecordReader(path)
      except (RuntimeError, OSError, ValueError) as e:
        raise damaged_shard(data_dir, name, _reason(e)) from None
      if not reader.ok():  # the reader keeps its error until close() raises it
        try:
          reader.close()
          reason = ""
        except RuntimeError as e:
          reason = str(e).strip()
        raise damaged_shard(data_dir, name, f"{reason or 'not a complete ArrayRecord file'}, "
                            f"{os.path.getsize(path)} bytes")
      try:
        n = reader.num_records()
        if n != count:
          raise damaged_shard(data_dir, name, f"{n} records, meta.json says {count}")
        for start in range(0, n if full else 0, 64):
          try:
            records = reader.read(start, min(n, start + 64))
          except (RuntimeError, OSError) as e:
            raise damaged_shard(data_dir, name, _reason(e)) from None
          for i, rec in enumerate(records):
            try:
              header, _ = data.decode_header(rec)
              if header["shape"] != [*image_size(meta), 3]:
                raise ValueError(f"image shape {header['shape']}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
              raise damaged_shard(data_dir, name, f"record {start + i}: {_reason(e)}") from None
        total += n
      finally:
        with contextlib.suppress(RuntimeError):  # a reader that failed raises its error again
          reader.close()
  return total


def split_paths(data_dir: str, split: str) -> tuple[list[str], dict[str, Any]]:
  """(shard paths, meta) of one split; UserError naming the prepare command if it is missing."""
  local = _localize(data_dir)
  meta = read_meta(local)
  names = meta["shards"].get(split)
  if not names:
    have = [s for s, v in meta["shards"].items() if v]
    raise UserError(f"data set {data_dir!r} has no records in split {split!r} (it has: "
                    f"{', '.join(have) or 'none'}); {_prepare_hint(data_dir)} splits={split}")
  try:
    check_shards(local, meta, [split])  # opens each shard: catches empty and truncated files
  except UserError as e:
    if local == data_dir:
      raise
    raise UserError(f"the local copy {local} of {data_dir} is damaged ({str(e).split(';')[0]}); "
                    f"delete {local} to fetch it again") from None
  return [os.path.join(local, n) for n in names], meta


class RecordSource(grain.sources.RandomAccessDataSource):
  """grain source over one split's ArrayRecord shards; its repr (which grain stores in iterator
  states and checks on restore) names the data set's content, not its path, so a run can resume
  from a copy of the data in another directory. A record that fails ArrayRecord's checksums (a
  byte flipped on disk after :func:`split_paths` opened the shards) is a UserError naming the
  shard and the fix, raised wherever the record is read (the trainer's step, ``iter_split``)."""

  def __init__(self, paths: list[str], meta: dict[str, Any], split: str):
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._names = [os.path.basename(p) for p in paths]
    self._ends = np.cumsum(meta["shard_counts"][split]).tolist()
    self._data_dir = os.path.dirname(paths[0]) if paths else ""
    fp = hashlib.sha1(json.dumps([meta["resolution"], meta["shards"][split],
                                  meta["shard_counts"][split]]).encode()).hexdigest()[:16]
    self._repr = f"RecordSource(split={split}, records={len(self._source)}, fingerprint={fp})"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, record_key: int) -> bytes:
    try:
      return self._source[record_key]
    except RuntimeError as e:  # Riegeli: "chunk data hash mismatch", a truncated chunk, ...
      shard = self._names[min(bisect.bisect_right(self._ends, record_key), len(self._names) - 1)]
      raise damaged_shard(self._data_dir, shard, _reason(e)) from None

  def __repr__(self) -> str:
    return self._repr


class DecodeRecord(grain.transforms.Map):
  """bytes -> {'image': uint8 [H,W,3], 'label': int32[, 'text_emb', 'text_mask', 'portrait']}
  (see core.data.decode_record); a record's captions stay stacked [C, T', D] for PickCaption."""

  def map(self, element: bytes) -> dict[str, np.ndarray]:
    try:
      r = data.decode_record(element, pad=False)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise UserError(f"a record is not a {data.FORMAT} record ({_reason(e)}); prepare the data "
                      f"set again with: python -m core.data prepare ... overwrite=true") from None
    out = {"image": r["image"], "label": r["label"]}
    for k in ("text_emb", "text_mask", "text_max_len", "portrait"):
      if k in r:
        out[k] = r[k]
    return out


def caption(element: dict[str, Any], index: int | None) -> dict[str, Any]:
  """Keeps caption ``index`` (None: the only one) of a decoded record, padded to its max_len:
  'text_emb' [T, D], 'text_mask' bool [T] (all True for text stored without a mask)."""
  emb, mask = element["text_emb"], element.get("text_mask")
  out = {k: v for k, v in element.items() if k not in ("text_emb", "text_mask", "text_max_len")}
  if mask is None:  # an embedding given per image (prepare text_emb=<.npz>): every row is real
    out.update(text_emb=emb, text_mask=np.ones(emb.shape[:-1], bool))
    return out
  if emb.ndim == 3:
    emb, mask = emb[index or 0], mask[index or 0]
  t = int(element.get("text_max_len", mask.shape[-1]))
  out["text_emb"] = np.zeros((t, emb.shape[-1]), emb.dtype)
  out["text_emb"][:emb.shape[0]] = emb
  out["text_mask"] = np.zeros((t,), bool)
  out["text_mask"][:mask.shape[0]] = mask
  return out


class RandomFlip(grain.transforms.RandomMap):
  """Flips the image left-right with probability 1/2, using the record's own generator."""

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=element["image"][:, ::-1])
    return element


class PickCaption(grain.transforms.RandomMap):
  """Draws one of a record's captions uniformly (the record's own generator; Imagen-style: a new
  caption of the image every time it is seen) and pads it to [T, D] / [T]."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator):
    if "text_emb" not in element:
      return element
    n = element["text_emb"].shape[0] if element["text_emb"].ndim == 3 else 1
    return caption(element, int(rng.integers(n)) if n > 1 else 0)


class _Closed:
  """Stands in for the pipeline of a closed TrainIterator."""

  def __next__(self):
    raise ValueError("this data iterator was closed")

  def get_state(self):
    raise ValueError("this data iterator was closed")

  set_state = get_state


class TrainIterator(grain.DataLoaderIterator):
  """grain's DataLoaderIterator plus ``close()`` (stops worker processes) and ``with`` support.

  ``get_state() -> bytes`` and ``set_state(bytes)`` are grain's (the orbax grain checkpoint handler
  takes this iterator as is).
  """

  def set_state(self, state: bytes) -> None:
    try:
      super().set_state(state)
    except ValueError as e:
      raise UserError("the saved data iterator state does not fit this loader (same data set, seed, "
                      f"num_workers and shuffle needed to resume): {str(e).splitlines()[0]}") from None

  def close(self) -> None:
    """Stops grain's worker processes and drops the pipeline (idempotent)."""
    it = getattr(self, "_iterator", None)  # grain's underlying DatasetIterator
    if it is not None and not isinstance(it, _Closed):
      if hasattr(it, "close"):
        it.close()
      self._iterator = _Closed()  # let the pipeline be collected now, not at interpreter exit

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app they are not parsed yet."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(data_dir: str, *, global_batch_size: int, seed: int, shuffle: bool = True,
                      random_flip: bool = True, num_workers: int = 0, worker_buffer_size: int = 1,
                      process_index: int | None = None, process_count: int | None = None,
                      num_epochs: int | None = None, split: str = "train",
                      resolution: int | tuple[int, int] | None = None, read_threads: int = 8,
                      prefetch_buffer_size: int = 64) -> TrainIterator:
  """Iterator of this host's batches {'image': uint8 [B,H,W,3], 'label': int32 [B]}, B = global/hosts.

  Args:
    data_dir: a directory written by ``python -m core.data prepare`` (or gs://, copied locally).
    global_batch_size: batch size summed over hosts; must divide by process_count.
    seed: shuffling and flip seed (reduced mod 2**31, as grain wants a 32-bit seed).
    shuffle: a new global permutation every epoch; False reads in file order.
    random_flip: left-right flips with probability 1/2, a deterministic function of the seed.
    num_workers: grain worker processes (0 = decode in this process).
    worker_buffer_size: batches each worker prepares ahead.
    process_index, process_count: this host and the number of hosts (default: from JAX).
    num_epochs: None repeats forever.
    split: 'train' or 'eval'.
    resolution: if given, a UserError unless the data set has this resolution.
    read_threads, prefetch_buffer_size: grain ReadOptions for reading records.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} must be a positive multiple of the "
                    f"number of hosts ({process_count})")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in [0, {process_count})")
  paths, meta = split_paths(data_dir, split)
  if resolution is not None and image_size(meta) != data.parse_res(resolution):
    have, want = _size(image_size(meta)), _size(data.parse_res(resolution))
    raise UserError(f"data set {data_dir!r} has resolution {have} but the model expects {want}; "
                    f"prepare one with res={want} or change the model resolution")
  source = RecordSource(paths, meta, split)
  local_batch = global_batch_size // process_count
  if len(source) < process_count:
    raise UserError(f"split {split!r} of {data_dir!r} has {len(source)} records, fewer than the "
                    f"{process_count} hosts")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=int(seed) % 2**31)
  ops: list[Any] = [DecodeRecord()]
  if random_flip:
    ops.append(RandomFlip())
  if meta.get("has_text_emb"):
    ops.append(PickCaption())
  ops.append(grain.transforms.Batch(batch_size=local_batch, drop_remainder=True))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops, worker_count=num_workers,
      worker_buffer_size=worker_buffer_size,
      shard_options=grain.sharding.ShardOptions(shard_index=process_index,
                                                shard_count=process_count, drop_remainder=True),
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=prefetch_buffer_size))
  return TrainIterator(loader, state=None)


def iter_split(data_dir: str, split: str, *, batch_size: int = 256, limit: int | None = None
               ) -> Iterator[dict[str, np.ndarray]]:
  """Yields a split in file order as {'image': uint8 [b,H,W,3], 'label': int32 [b]} batches
  (text sets: plus each record's first caption as 'text_emb' / 'text_mask', and 'portrait')."""
  paths, meta = split_paths(data_dir, split)
  source, decode = RecordSource(paths, meta, split), DecodeRecord()
  n = len(source) if limit is None else min(limit, len(source))
  for start in range(0, n, batch_size):
    recs = [decode.map(source[i]) for i in range(start, min(n, start + batch_size))]
    if meta.get("has_text_emb"):
      recs = [caption(r, 0) for r in recs]
    out = {"image": np.stack([r["image"] for r in recs]),
           "label": np.asarray([r["label"] for r in recs], np.int32)}
    for k in ("text_emb", "text_mask"):
      if k in recs[0]:
        out[k] = np.stack([r[k] for r in recs])
    if "portrait" in recs[0]:
      out["portrait"] = np.asarray([r["portrait"] for r in recs], np.int32)
    yield out


def load_split(data_dir: str, split: str, *, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N,H,W,3], labels int32 [N]) of a whole split, e.g. for FID reference statistics."""
  paths, meta = split_paths(data_dir, split)
  n = sum(meta["shard_counts"][split]) if limit is None else min(limit, sum(meta["shard_counts"][split]))
  h, w = image_size(meta)
  images = np.empty((n, h, w, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  i = 0
  for b in iter_split(data_dir, split, limit=n):
    k = len(b["label"])
    images[i:i + k], labels[i:i + k] = b["image"], b["label"]
    i += k
  del paths
  return images, labels
