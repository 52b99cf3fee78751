"""A prepared data set on disk: the record format, ``meta.json`` and the shards' integrity.

One ArrayRecord record per image (no pickle): ``b"SDR1"``, a little-endian uint32 header length, a
UTF-8 JSON header ``{"shape", "label", "key"[, "text_emb": {"shape", "dtype"}]}``, the raw uint8
HWC image bytes, then the text-embedding bytes if any. ``<dir>/meta.json`` lists the shards and
their counts; gs:// data sets are copied once to local disk, since ArrayRecord reads local files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Iterator, Sequence

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np

from core.data import captions as captions_lib
from core.errors import UserError, first_line
from core.io import storage

FORMAT = "simple-diffusion-records/1"
MAGIC = b"SDR1"
SPLITS = ("train", "eval")
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record individually addressable (needed for grain's random access).
WRITER_OPTIONS = "group_size:1"
_TEXT_DTYPES = ("float16", "float32")
SHARD_NAME = re.compile(r"(train|eval)-\d{5}-of-\d{5}" + re.escape(SHARD_SUFFIX))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_root() -> str:
  """``$SIMPLE_DIFFUSION_DATA`` if set, else ``<repo root>/data``."""
  return os.path.abspath(os.environ.get("SIMPLE_DIFFUSION_DATA") or os.path.join(REPO_ROOT, "data"))


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """An exclusive inter-process lock held on the file ``path`` (created if missing)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def make_temp_dir(parent: str | None, prefix: str) -> str:
  """mkdtemp, but with the usual permissions (mkdtemp's 0700 would survive the final rename)."""
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  return tmp


def encode_record(image: np.ndarray, label: int, *, key: str = "",
                  text_emb: np.ndarray | None = None, text_mask: np.ndarray | None = None,
                  captions: Sequence[str] | None = None, portrait: bool | None = None) -> bytes:
  """Serialises one example: MAGIC, uint32 header length, JSON header, image, text bytes.

  ``text_emb`` is [T, D] (one caption) or [C, T, D] (C captions); with ``text_mask`` (bool,
  ``text_emb.shape[:-1]``) only the token positions up to the last real token of any caption are
  stored (the rest must be padding: zero embeddings, mask False) and :func:`decode_record` pads
  them back to T, so a 15-token caption costs 15, not 128, rows of 4096 values.
  """
  image = np.ascontiguousarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
  header: dict[str, Any] = {"shape": list(image.shape), "label": int(label), "key": key}
  payload = [image.tobytes()]
  if text_emb is not None:
    text_emb = np.asarray(text_emb)
    if text_emb.dtype.name not in _TEXT_DTYPES:
      text_emb = text_emb.astype(np.float32)
    if text_mask is not None:
      text_mask = np.asarray(text_mask, bool)
      if text_mask.shape != text_emb.shape[:-1]:
        raise ValueError(f"text_mask {text_mask.shape} does not match text_emb {text_emb.shape}")
      used = np.flatnonzero(text_mask.reshape(-1, text_mask.shape[-1]).any(0))
      keep = int(used[-1]) + 1 if used.size else 1
      header["text_mask"] = {"max_len": int(text_mask.shape[-1])}
      text_emb, text_mask = text_emb[..., :keep, :], text_mask[..., :keep]
    text_emb = np.ascontiguousarray(text_emb)
    header["text_emb"] = {"shape": list(text_emb.shape), "dtype": text_emb.dtype.name}
    payload.append(text_emb.tobytes())
    if text_mask is not None:
      payload.append(np.ascontiguousarray(text_mask).tobytes())
  if captions is not None:
    header["captions"] = [str(c) for c in captions]
  if portrait is not None:
    header["portrait"] = int(bool(portrait))
  h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
  return b"".join([MAGIC, struct.pack("<I", len(h)), h, *payload])


def decode_header(record: bytes) -> tuple[dict[str, Any], int]:
  """Returns (header dict, offset of the image bytes) of a record made by encode_record."""
  if record[:4] != MAGIC:
    raise ValueError(f"not a {FORMAT} record (magic {record[:4]!r})")
  (n,) = struct.unpack_from("<I", record, 4)
  return json.loads(record[8:8 + n].decode()), 8 + n


def decode_record(record: bytes, *, pad: bool = True) -> dict[str, Any]:
  """Inverse of :func:`encode_record`: {'image': uint8 [H,W,C], 'label': int32, 'key': str[,
  'text_emb', 'text_mask' (bool), 'captions' (list of str), 'portrait' (int32)]}.

  The arrays are read-only views into ``record`` (no copy), except text stored trimmed, which is
  zero/False-padded back to its max_len unless ``pad=False`` (then 'text_max_len' gives it).
  """
  header, off = decode_header(record)
  shape = tuple(header["shape"])
  n_img = int(np.prod(shape))
  image = np.frombuffer(record, np.uint8, count=n_img, offset=off).reshape(shape)
  out = {"image": image, "label": np.int32(header["label"]), "key": header.get("key", "")}
  if "text_emb" in header:
    t = header["text_emb"]
    dt = np.dtype(t["dtype"])
    n_emb = int(np.prod(t["shape"]))
    emb = np.frombuffer(record, dt, count=n_emb, offset=off + n_img).reshape(t["shape"])
    if "text_mask" in header:
      mask = np.frombuffer(record, np.bool_, count=n_emb // t["shape"][-1],
                           offset=off + n_img + n_emb * dt.itemsize).reshape(t["shape"][:-1])
      max_len = int(header["text_mask"]["max_len"])
      if pad and mask.shape[-1] < max_len:
        extra = max_len - mask.shape[-1]
        emb = np.concatenate([emb, np.zeros(emb.shape[:-2] + (extra, emb.shape[-1]), dt)], -2)
        mask = np.concatenate([mask, np.zeros(mask.shape[:-1] + (extra,), bool)], -1)
      out["text_mask"] = mask
      if not pad:
        out["text_max_len"] = max_len
    out["text_emb"] = emb
  if "captions" in header:
    out["captions"] = list(header["captions"])
  if "portrait" in header:
    out["portrait"] = np.int32(header["portrait"])
  return out


def shard_names(split: str, n: int) -> list[str]:
  return [f"{split}-{i:05d}-of-{n:05d}{SHARD_SUFFIX}" for i in range(n)]


def split_records(out_dir: str, names: Sequence[str]) -> Iterator[dict[str, Any]]:
  """Every decoded record of the shards ``names`` in ``out_dir``, in file order."""
  for n in names:
    reader = ArrayRecordReader(os.path.join(out_dir, n))
    try:
      for start in range(0, reader.num_records(), 256):
        for rec in reader.read(start, min(reader.num_records(), start + 256)):
          yield decode_record(rec)
    finally:
      reader.close()


def prepare_hint(data_dir: str) -> str:
  return (f"prepare it with: python -m core.data prepare src=<image folder or emoji> res=<res> "
          f"out={data_dir}")


def reprepare_hint(data_dir: str) -> str:
  return (f"prepare it again with: python -m core.data prepare src=<image folder or emoji> "
          f"res=<res> out={data_dir} overwrite=true")


def localize(data_dir: str) -> str:
  """A local directory holding ``data_dir``: gs:// data sets are copied once
  to ``<data root>/gcs/<hash of URL and meta.json>``, since ArrayRecord readers need local files
  (the evaluation captions of a text set too)."""
  if not data_dir.startswith("gs://"):
    return data_dir
  base = data_dir.rstrip("/")
  if not storage.exists(f"{base}/meta.json"):
    raise UserError(f"data set {data_dir!r} has no meta.json; {prepare_hint(data_dir)}")
  meta_bytes = storage.read_bytes(f"{base}/meta.json")
  meta = parse_meta(meta_bytes, f"{base}/meta.json", data_dir)
  # Keyed by URL and content: a data set prepared again at the same URL gets a fresh copy.
  key = hashlib.sha1(base.encode() + b"\0" + meta_bytes).hexdigest()[:16]
  local = os.path.join(data_root(), "gcs", key)
  if os.path.exists(os.path.join(local, "meta.json")):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = make_temp_dir(os.path.dirname(local), ".gcs-")
  try:
    extra = ([f"{captions_lib.DIRNAME}/{n}" for n in captions_lib.FILES]
             if meta.get("eval_captions") else [])
    for n in [n for v in meta.get("shards", {}).values() for n in v] + ["label_map.json"] + extra:
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
  """The data set's meta.json (resolution, num_classes, class_names, counts, shards, ...)."""
  if not data_dir:
    raise UserError("no data set given; pass data_dir=<prepared directory>")
  if data_dir.startswith("gs://"):
    data_dir = localize(data_dir)
  path = os.path.join(data_dir, "meta.json")
  if not os.path.isfile(path):
    what = "does not exist" if not os.path.exists(data_dir) else "has no meta.json"
    raise UserError(f"data set {data_dir!r} {what}; {prepare_hint(data_dir)}")
  with open(path, "rb") as f:
    return parse_meta(f.read(), path, data_dir)


def parse_meta(raw: bytes, path: str, data_dir: str) -> dict[str, Any]:
  """meta.json's bytes -> dict; a UserError naming the fix when it is empty, not JSON, or lacks
  the fields a loader needs (a data set whose prepare was interrupted or whose file was edited)."""
  hint = reprepare_hint(data_dir)
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
  if meta.get("format") != FORMAT:
    raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; {hint}")
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


def format_size(hw: tuple[int, int]) -> str:
  return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def damaged_shard(data_dir: str, name: str, reason: str) -> UserError:
  """The one-line error for a shard that cannot be read back as written."""
  reason = (reason.strip().splitlines() or [""])[0][:200] or "unreadable"
  return UserError(f"shard {name} of data set {data_dir!r} is damaged ({reason}); "
                   f"{reprepare_hint(data_dir)}")


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
                        f"{reprepare_hint(data_dir)}")
      try:
        reader = ArrayRecordReader(path)
      except (RuntimeError, OSError, ValueError) as e:
        raise damaged_shard(data_dir, name, first_line(e)) from None
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
            raise damaged_shard(data_dir, name, first_line(e)) from None
          for i, rec in enumerate(records):
            try:
              header, _ = decode_header(rec)
              if header["shape"] != [*image_size(meta), 3]:
                raise ValueError(f"image shape {header['shape']}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
              raise damaged_shard(data_dir, name, f"record {start + i}: {first_line(e)}") from None
        total += n
      finally:
        with contextlib.suppress(RuntimeError):  # a reader that failed raises its error again
          reader.close()
  return total
