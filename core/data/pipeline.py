"""Reading prepared data sets: a resumable, per-host-sharded grain loader and a whole-split reader.

Data shard i of n reads its own contiguous range of the split's records (an even split in file
order), shuffled anew every epoch with its own seed, and yields ``{'image': uint8 [B, H, W, 3],
'label': int32 [B]}``, B = global batch / n. So a host caches only the shard files of its ranges
(records.localize), not the whole data set. Records are decoded (PNG, or a source JPEG cropped
again) in grain's map step, i.e. in its worker processes. Flips (p = 1/2, as ADM's
``random_flip``; the paper does not say) are left-right in the image's own frame (up-down of a
stored portrait, Sec. 5) and come from grain's per-record generator, so the stream is a function
of the seed, and ``get_state``/``set_state`` resume it exactly.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np

from core.data import records
from core.data.preprocess import parse_res
from core.data.records import damaged_shard, format_size, image_size, localize, prepare_hint
from core.data.records import read_meta
from core.errors import UserError, first_line

def _check_local(local: str, data_dir: str, meta: dict[str, Any], split: str,
                 names: Sequence[str]) -> None:
  """records.check_shards on ``names``; a damaged file of a gs:// cache names the cache."""
  try:
    records.check_shards(local, meta, [split], names=names)  # catches empty and truncated shards
  except UserError as e:
    if local == data_dir:
      raise
    raise UserError(f"the local copy {local} of {data_dir} is damaged ({str(e).split(';')[0]}); "
                    f"delete {local} to fetch it again") from None


def _split_meta(data_dir: str, split: str) -> dict[str, Any]:
  meta = read_meta(data_dir)
  if not meta["shards"].get(split):
    have = [s for s, v in meta["shards"].items() if v]
    raise UserError(f"data set {data_dir!r} has no records in split {split!r} (it has: "
                    f"{', '.join(have) or 'none'}); {prepare_hint(data_dir)} splits={split}")
  return meta


def split_paths(data_dir: str, split: str, names: Sequence[str] | None = None
                ) -> tuple[list[str], dict[str, Any]]:
  """(local paths of the shards ``names`` of one split (default: all), meta), the shards checked
  and, for a gs:// data set, fetched into this host's cache; UserError naming the prepare
  command if the split is missing."""
  meta = _split_meta(data_dir, split)
  names = list(meta["shards"][split] if names is None else names)
  local = localize(data_dir, names)
  _check_local(local, data_dir, meta, split, names)
  return [os.path.join(local, n) for n in names], meta


class RecordSource(grain.sources.RandomAccessDataSource):
  """grain source over records [start, end) of one split (default all), given the local paths of
  the shard files that hold them, the first of which starts at record ``first``.

  Its repr (which grain stores in iterator states and checks on restore) names the range and the
  data set's content, not its path, so a run can resume from a copy of the data in another
  directory. A record that fails ArrayRecord's checksums (a byte flipped on disk after
  :func:`split_paths` opened the shards) is a UserError naming the shard and the fix, raised
  wherever the record is read (the trainer's step, ``iter_split``)."""

  def __init__(self, paths: list[str], meta: dict[str, Any], split: str, *, start: int = 0,
               end: int | None = None, first: int = 0):
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._names = [os.path.basename(p) for p in paths]
    count = dict(zip(meta["shards"][split], meta["shard_counts"][split]))
    self._ends = np.cumsum([count[n] for n in self._names]).tolist()
    self._data_dir = os.path.dirname(paths[0]) if paths else ""
    total = sum(meta["shard_counts"][split])
    end = total if end is None else end
    if not first <= start <= end <= first + len(self._source):
      raise ValueError(f"records {start}:{end} are not in the given shards "
                       f"({first}:{first + len(self._source)})")
    self._start, self._len, self._offset = start, end - start, start - first
    fp = hashlib.sha1(json.dumps([meta["resolution"], meta["shards"][split],
                                  meta["shard_counts"][split]]).encode()).hexdigest()[:16]
    self._repr = (f"RecordSource(split={split}, records={start}:{end} of {total}, "
                  f"fingerprint={fp})")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, record_key: int) -> bytes:
    if not 0 <= record_key < self._len:
      raise IndexError(f"record {record_key} of {self._len}")
    key = self._offset + record_key
    try:
      return self._source[key]
    except RuntimeError as e:  # Riegeli: "chunk data hash mismatch", a truncated chunk, ...
      shard = self._names[min(bisect.bisect_right(self._ends, key), len(self._names) - 1)]
      raise damaged_shard(self._data_dir, shard, first_line(e)) from None

  def __repr__(self) -> str:
    return self._repr


class DecodeRecord(grain.transforms.Map):
  """bytes -> {'image': uint8 [H,W,3], 'label': int32[, 'text_emb', 'text_mask', 'portrait']}
  (records.decode_record); a record's captions stay stacked [C, T', D] for PickCaption."""

  def map(self, element: bytes) -> dict[str, np.ndarray]:
    try:
      r = records.decode_record(element, pad=False)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise UserError(f"a record is not a {records.FORMAT} record ({first_line(e)}); prepare the "
                      f"data "
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


def flip_axis(element: dict[str, Any]) -> int:
  """The stored array's axis that is left-right in the image's own frame: 1, or 0 for a portrait
  stored rotated 90 degrees counter-clockwise (preprocess.orient): with S = rot90ccw(P),
  rot90ccw(fliplr(P)) = flipud(S)."""
  return 0 if int(element.get("portrait", 0)) else 1


class RandomFlip(grain.transforms.RandomMap):
  """Flips the image left-right in its own frame with probability 1/2, using the record's own
  generator (a stored portrait is flipped up-down: :func:`flip_axis`)."""

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=np.flip(element["image"], flip_axis(element)))
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
      raise UserError("the saved data iterator state does not fit this loader (same data set, "
                      "seed, num_workers, shuffle and data shards needed to resume; states saved "
                      "before data shards read their own record ranges never fit): "
                      f"{first_line(e)}") from None

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
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(data_dir: str, *, global_batch_size: int, seed: int, shuffle: bool = True,
                      random_flip: bool = True, num_workers: int = 0, worker_buffer_size: int = 1,
                      process_index: int | None = None, process_count: int | None = None,
                      num_epochs: int | None = None, split: str = "train",
                      resolution: int | tuple[int, int] | None = None, read_threads: int = 8,
                      prefetch_buffer_size: int = 64) -> TrainIterator:
  """This host's batches {'image': uint8 [B,H,W,3], 'label': int32 [B]}, B = global / hosts.

  Args:
    data_dir: a directory written by ``python -m core.data prepare`` (or gs://: the shard files
      of this range are cached locally).
    global_batch_size: batch size summed over hosts; must divide by process_count.
    seed: shuffling and flip seed (each data shard's own is derived from it: shard_seed).
    shuffle: a new global permutation every epoch; False reads in file order.
    random_flip: left-right flips with probability 1/2, a deterministic function of the seed.
    num_workers: grain worker processes (0 = decode in this process).
    worker_buffer_size: batches each worker prepares ahead.
    process_index, process_count: this data shard and the number of shards (default: this JAX
      process and their number); the shard reads records record_range(index, count).
    num_epochs: None repeats forever.
    split: 'train' or 'eval'.
    resolution: if given, a UserError unless the data set has this resolution.
    read_threads, prefetch_buffer_size: grain ReadOptions for reading records.
  """
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} must be a positive multiple of the "
                    f"number of hosts ({process_count})")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in [0, {process_count})")
  meta = _split_meta(data_dir, split)
  if resolution is not None and image_size(meta) != parse_res(resolution):
    have, want = format_size(image_size(meta)), format_size(parse_res(resolution))
    raise UserError(f"data set {data_dir!r} has resolution {have} but the model expects {want}; "
                    f"prepare one with res={want} or change the model resolution")
  total = sum(meta["shard_counts"][split])
  if total < process_count:
    raise UserError(f"split {split!r} of {data_dir!r} has {total} records, fewer than the "
                    f"{process_count} hosts")
  start, end = records.record_range(meta, split, process_index, process_count)
  names, first = records.shards_in_range(meta, split, start, end)
  paths, meta = split_paths(data_dir, split, names)  # only this range's shard files
  source = RecordSource(paths, meta, split, start=start, end=end, first=first)
  local_batch = global_batch_size // process_count
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shuffle=shuffle, num_epochs=num_epochs,
      seed=shard_seed(seed, process_index, process_count))
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
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=prefetch_buffer_size))
  return TrainIterator(loader, state=None)


def shard_seed(seed: int, index: int, count: int) -> int:
  """Data shard ``index`` of ``count``'s 31-bit shuffle and flip seed. Distinct per shard: with
  one seed, every shard would draw the same positions of its range at every step, and shard files
  written round robin from a class-sorted source hold the same classes at the same positions."""
  return int(np.random.SeedSequence([int(seed) % 2**31, index, count]).generate_state(1)[0]
             ) % 2**31


class ShardedLoader:
  """The global batch as ``num_shards`` fixed data shards; this process reads the ones it owns.

  Because the shards (not the processes) define the data order, one process reading all shards
  sees exactly the global batches that N processes see together. ``get_state``/``set_state`` cover
  every owned shard, so grain's orbax handler stores them with each checkpoint.
  """

  def __init__(self, data_dir: str, *, batch_size: int, seed: int, num_shards: int,
               num_workers: int = 0):
    pc, pi = jax.process_count(), jax.process_index()
    if num_shards % pc:
      raise UserError(f"Train.num_data_shards={num_shards} must be a multiple of the number of "
                      f"processes ({pc})")
    if batch_size % num_shards:
      raise UserError(f"Train.batch_size={batch_size} must be divisible by "
                      f"Train.num_data_shards={num_shards}")
    per = num_shards // pc
    self.shard_ids = list(range(pi * per, (pi + 1) * per))
    self._iters = [iter(make_train_loader(
        data_dir, global_batch_size=batch_size, seed=seed, num_workers=num_workers,
        process_index=s, process_count=num_shards)) for s in self.shard_ids]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iters]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    """JSON bytes with every owned shard's grain state (grain's orbax handler stores text)."""
    states = {}
    for s, it in zip(self.shard_ids, self._iters):
      st = it.get_state()
      states[str(s)] = st.decode() if isinstance(st, bytes) else st
    return json.dumps({"shards": states}).encode()

  def set_state(self, state: bytes | str | dict[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    for s, it in zip(self.shard_ids, self._iters):
      st = state["shards"][str(s)]
      it.set_state(st.encode() if isinstance(st, str) else st)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore."""
    for it in self._iters:
      start = getattr(it, "start_prefetch", None)
      if start:
        start()

  def close(self) -> None:
    for it in self._iters:
      close = getattr(it, "close", None)
      if close:
        close()


def _decode_batch(pool, raw: list[bytes], decode: DecodeRecord, text: bool
                  ) -> dict[str, np.ndarray]:
  recs = list(pool.map(decode.map, raw))  # PIL decodes and resizes without the GIL
  if text:
    recs = [caption(r, 0) for r in recs]
  out = {"image": np.stack([r["image"] for r in recs]),
         "label": np.asarray([r["label"] for r in recs], np.int32)}
  for k in ("text_emb", "text_mask"):
    if k in recs[0]:
      out[k] = np.stack([r[k] for r in recs])
  if "portrait" in recs[0]:
    out["portrait"] = np.asarray([r["portrait"] for r in recs], np.int32)
  return out


def iter_split(data_dir: str, split: str, *, batch_size: int = 256, limit: int | None = None,
               threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields a split in file order as {'image': uint8 [b,H,W,3], 'label': int32 [b]} batches
  (text sets: plus each record's first caption as 'text_emb' / 'text_mask', and 'portrait').

  Shards are read one at a time (a gs:// shard not in this host's cache is downloaded to a
  temporary file and deleted after), records decoded by ``threads`` threads (default: the CPUs).
  """
  meta = _split_meta(data_dir, split)
  total = sum(meta["shard_counts"][split])
  n = total if limit is None else min(limit, total)
  names = records.shards_in_range(meta, split, 0, n)[0] if n else []
  decode, text = DecodeRecord(), bool(meta.get("has_text_emb"))
  count = dict(zip(meta["shards"][split], meta["shard_counts"][split]))
  pending: list[bytes] = []
  with concurrent.futures.ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
    for name in names:
      with records.shard_file(data_dir, name) as path:
        _check_local(os.path.dirname(path), data_dir, meta, split, [name])
        source = RecordSource([path], meta, split, end=min(n, count[name]))
        for i in range(len(source)):
          pending.append(source[i])
          if len(pending) == batch_size:
            yield _decode_batch(pool, pending, decode, text)
            pending = []
        n -= len(source)
    if pending:
      yield _decode_batch(pool, pending, decode, text)


def load_split(data_dir: str, split: str, *, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N,H,W,3], labels int32 [N]) of a whole split, e.g. for FID statistics."""
  meta = _split_meta(data_dir, split)
  n = sum(meta["shard_counts"][split]) if limit is None else min(limit,
                                                                 sum(meta["shard_counts"][split]))
  h, w = image_size(meta)
  images = np.empty((n, h, w, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  i = 0
  for b in iter_split(data_dir, split, limit=n):
    k = len(b["label"])
    images[i:i + k], labels[i:i + k] = b["image"], b["label"]
    i += k
  return images, labels
