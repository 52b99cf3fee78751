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
from typing import Any, Iterator

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np

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
                  text_emb: np.ndarray | None = None) -> bytes:
  """Serialises one example: MAGIC, uint32 header length, JSON header, image bytes, text bytes."""
  image = np.ascontiguousarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
  header: dict[str, Any] = {"shape": list(image.shape), "label": int(label), "key": key}
  payload = [image.tobytes()]
  if text_emb is not None:
    text_emb = np.ascontiguousarray(text_emb)
    if text_emb.dtype.name not in _TEXT_DTYPES:
      text_emb = text_emb.astype(np.float32)
    header["text_emb"] = {"shape": list(text_emb.shape), "dtype": text_emb.dtype.name}
    payload.append(text_emb.tobytes())
  h = json.dumps(header, separators=(",", ":")).encode()
  return b"".join([MAGIC, struct.pack("<I", len(h)), h, *payload])


def decode_header(record: bytes) -> tuple[dict[str, Any], int]:
  """Returns (header dict, offset of the image bytes) of a record made by encode_record."""
  if record[:4] != MAGIC:
    raise ValueError(f"not a {FORMAT} record (magic {record[:4]!r})")
  (n,) = struct.unpack_from("<I", record, 4)
  return json.loads(record[8:8 + n].decode()), 8 + n


def decode_record(record: bytes) -> dict[str, Any]:
  """Inverse of :func:`encode_record`: {'image': uint8 [H,W,C], 'label', 'key'[, 'text_emb']}.

  The arrays are read-only views into ``record`` (no copy).
  """
  header, off = decode_header(record)
  shape = tuple(header["shape"])
  n_img = int(np.prod(shape))
  image = np.frombuffer(record, np.uint8, count=n_img, offset=off).reshape(shape)
  out = {"image": image, "label": np.int32(header["label"]), "key": header.get("key", "")}
  if "text_emb" in header:
    t = header["text_emb"]
    out["text_emb"] = np.frombuffer(record, np.dtype(t["dtype"]), count=int(np.prod(t["shape"])),
                                    offset=off + n_img).reshape(t["shape"])
  return out


def shard_names(split: str, n: int) -> list[str]:
  return [f"{split}-{i:05d}-of-{n:05d}{SHARD_SUFFIX}" for i in range(n)]


def prepare_hint(data_dir: str) -> str:
  return (f"prepare it with: python -m core.data prepare src=<image folder or emoji> res=<res> "
          f"out={data_dir}")


def reprepare_hint(data_dir: str) -> str:
  return (f"prepare it again with: python -m core.data prepare src=<image folder or emoji> "
          f"res=<res> out={data_dir} overwrite=true")


def localize(data_dir: str) -> str:
  """A local directory holding ``data_dir``: gs:// data sets are copied once
  to ``<data root>/gcs/<hash of URL and meta.json>``, since ArrayRecord readers need local files."""
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
  if not isinstance(meta.get("resolution"), int) or meta["resolution"] <= 0:
    return f"has no positive integer 'resolution' (got {meta.get('resolution')!r})"
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
              if header["shape"] != [meta["resolution"], meta["resolution"], 3]:
                raise ValueError(f"image shape {header['shape']}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
              raise damaged_shard(data_dir, name, f"record {start + i}: {first_line(e)}") from None
        total += n
      finally:
        with contextlib.suppress(RuntimeError):  # a reader that failed raises its error again
          reader.close()
  return total

