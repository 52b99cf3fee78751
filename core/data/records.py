"""A prepared data set on disk: the record format, ``meta.json`` and the shards' integrity.

One ArrayRecord record per image (no pickle): ``b"SDR1"``, a little-endian uint32 header length, a
UTF-8 JSON header ``{"shape", "label", "key", "codec", "nbytes"[, "pixels"][, "text_emb": {"shape",
"dtype"}]}``, the encoded image, then the text-embedding bytes if any. The image is the smaller of
a lossless PNG of the prepared pixels (codec 'png') and the source file's own bytes (codec 'src',
e.g. an ImageNet JPEG), which :func:`decode_record` decodes and ADM-crops again; 'pixels' (a digest
of the prepared pixels) makes that crop provably the one prepare made (docs/data.md says why).
Data sets of format 1 (raw uint8 pixels, no 'codec') are still read.

``<dir>/meta.json`` lists the shards, their record counts and bytes. A gs:// data set is read
through a local cache that holds only the shards this host reads (:func:`localize`), since
ArrayRecord reads local files; a gcsfuse mount passed as a local path needs no cache at all.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Iterator, Sequence

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np
import PIL
from PIL import Image

from core.data import captions as captions_lib
from core.data.preprocess import load_image
from core.errors import UserError, first_line
from core.io import storage

FORMAT = "simple-diffusion-records/2"   # encoded images (PNG or the source file's bytes)
RAW_FORMAT = "simple-diffusion-records/1"  # raw uint8 pixels: still read, no longer written
READ_FORMATS = (FORMAT, RAW_FORMAT)
MAGIC = b"SDR1"
CODECS = ("png", "src")
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


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG of a uint8 [H, W, 3] image (zlib level 6, Pillow's default)."""
  with io.BytesIO() as b:
    Image.fromarray(image, "RGB").save(b, "PNG")
    return b.getvalue()


def pixel_digest(image: np.ndarray) -> str:
  """64-bit BLAKE2b of an image's uint8 bytes (hex): what a 'src' record must decode to."""
  return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).hexdigest()


def encode_image(image: np.ndarray, source: bytes | None = None) -> dict[str, Any]:
  """{'shape', 'codec', 'nbytes'[, 'pixels'], 'data'}: the smaller of a PNG of ``image`` and
  ``source`` (see :func:`encode_record`); prepare's workers run it, as PNG encoding is slow."""
  image = np.ascontiguousarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  out: dict[str, Any] = {"shape": list(image.shape), "codec": "png", "data": encode_png(image)}
  if source is not None and len(source) <= len(out["data"]):
    out.update(codec="src", data=bytes(source), pixels=pixel_digest(image))
  out["nbytes"] = len(out["data"])
  return out


def encode_record(image: np.ndarray | dict[str, Any], label: int, *, key: str = "",
                  source: bytes | None = None,
                  text_emb: np.ndarray | None = None, text_mask: np.ndarray | None = None,
                  captions: Sequence[str] | None = None, portrait: bool | None = None) -> bytes:
  """Serialises one example: MAGIC, uint32 header length, JSON header, encoded image, text bytes.

  ``image`` is the prepared uint8 [H, W, 3] image (or :func:`encode_image`'s result). With
  ``source`` (the bytes of the file it was
  prepared from, by :func:`core.data.preprocess.load_image` at (H, W) with rotation for a
  non-square size) the record stores whichever is smaller: those bytes (codec 'src', with the
  image's digest) or a PNG of ``image`` (codec 'png').

  ``text_emb`` is [T, D] (one caption) or [C, T, D] (C captions); with ``text_mask`` (bool,
  ``text_emb.shape[:-1]``) only the token positions up to the last real token of any caption are
  stored (the rest must be padding: zero embeddings, mask False) and :func:`decode_record` pads
  them back to T, so a 15-token caption costs 15, not 128, rows of 4096 values.
  """
  enc = encode_image(image, source) if isinstance(image, np.ndarray) else image
  header: dict[str, Any] = {"shape": enc["shape"], "label": int(label), "key": key,
                            **{k: v for k, v in enc.items() if k not in ("shape", "data")}}
  payload = [enc["data"]]
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


def image_nbytes(header: dict[str, Any]) -> int:
  """Bytes of the (encoded) image in a record with this header (format 1: raw pixels)."""
  return int(header["nbytes"]) if "codec" in header else math.prod(header["shape"])


def decode_image(header: dict[str, Any], data: bytes | memoryview) -> np.ndarray:
  """The uint8 [H, W, 3] image of a record: raw pixels (format 1), a PNG, or a source file ADM-
  cropped again to the record's shape and checked against the digest taken at prepare time."""
  shape = tuple(header["shape"])
  codec = header.get("codec")
  if codec is None:
    return np.frombuffer(data, np.uint8, count=math.prod(shape)).reshape(shape)
  if codec == "png":
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
  elif codec == "src":
    h, w = shape[:2]
    image = load_image(bytes(data), (h, w), rotate=h != w)
    image = image[0] if isinstance(image, tuple) else image
    if pixel_digest(image) != header.get("pixels"):
      raise UserError(
          f"record {header.get('key', '')!r} decodes to other pixels than when it was prepared "
          f"(this machine's Pillow {PIL.__version__} decodes or resizes its source file "
          f"differently); install the Pillow version that meta.json's 'decoder' records, or "
          f"prepare the data set again")
  else:
    raise ValueError(f"unknown image codec {codec!r}")
  if image.shape != shape:
    raise ValueError(f"image decodes to shape {image.shape}, header says {shape}")
  return image


def decode_record(record: bytes, *, pad: bool = True) -> dict[str, Any]:
  """Inverse of :func:`encode_record`: {'image': uint8 [H,W,C], 'label': int32, 'key': str[,
  'text_emb', 'text_mask' (bool), 'captions' (list of str), 'portrait' (int32)]}.

  The text arrays are read-only views into ``record`` (no copy), except text stored trimmed,
  which is zero/False-padded back to its max_len unless ``pad=False`` (then 'text_max_len' gives
  it). Decoding a PNG or source image is the costly part: the training pipeline runs it in grain's
  worker processes.
  """
  header, off = decode_header(record)
  n_img = image_nbytes(header)
  image = decode_image(header, memoryview(record)[off:off + n_img])
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


def _cache_dir(base: str, meta_bytes: bytes) -> str:
  """``<data root>/gcs/<hash of URL and meta.json>``: a data set prepared again at the same URL
  gets a fresh cache."""
  key = hashlib.sha1(base.encode() + b"\0" + meta_bytes).hexdigest()[:16]
  return os.path.join(data_root(), "gcs", key)


def _fetch(remote: str, local: str) -> None:
  """Copies one file to ``local`` unless it is there: into a temporary name, renamed into place
  (atomic), under a lock so that the processes of one host download each file once."""
  if os.path.exists(local):
    return
  with locked(os.path.join(os.path.dirname(local), ".locks", os.path.basename(local) + ".lock")):
    if os.path.exists(local):  # another process of this host fetched it meanwhile
      return
    tmp = f"{local}.part-{os.getpid()}"
    try:
      storage.copy_to_local(remote, tmp)
      os.replace(tmp, local)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def localize(data_dir: str, shards: Sequence[str] = ()) -> str:
  """A local directory holding ``data_dir``'s meta.json, label_map.json (and evaluation
  captions) plus the shard files ``shards`` (names in meta.json), nothing else.

  A local ``data_dir`` (a gcsfuse mount included) is returned as is. A gs:// one is cached under
  ``<data root>/gcs/<hash of URL and meta.json>`` one file at a time, each downloaded once per
  host, so a host that reads a tenth of the shards holds a tenth of the bytes.
  """
  if not data_dir.startswith("gs://"):
    return data_dir
  base = data_dir.rstrip("/")
  if not storage.exists(f"{base}/meta.json"):
    raise UserError(f"data set {data_dir!r} has no meta.json; {prepare_hint(data_dir)}")
  meta_bytes = storage.read_bytes(f"{base}/meta.json")
  meta = parse_meta(meta_bytes, f"{base}/meta.json", data_dir)
  local = _cache_dir(base, meta_bytes)
  if not os.path.exists(os.path.join(local, "meta.json")):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = make_temp_dir(os.path.dirname(local), ".gcs-")
    try:
      extra = ([f"{captions_lib.DIRNAME}/{n}" for n in captions_lib.FILES]
               if meta.get("eval_captions") else [])
      for n in ["label_map.json"] + extra:
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
  known = {n for v in meta["shards"].values() for n in v}
  for n in shards:
    if n not in known:
      raise ValueError(f"{n} is not a shard of {data_dir}")
    _fetch(f"{base}/{n}", os.path.join(local, n))
  return local


@contextlib.contextmanager
def shard_file(data_dir: str, name: str) -> Iterator[str]:
  """A local path of one shard for the duration of the ``with``: the file itself for a local data
  set or one already in this host's cache, else a temporary download deleted afterwards (reading
  a whole split of a gs:// data set, e.g. for FID statistics, never fills the disk)."""
  local = localize(data_dir)
  path = os.path.join(local, name)
  if local == data_dir or os.path.exists(path):
    yield path
    return
  tmp = make_temp_dir(local, ".stream-")
  try:
    storage.copy_to_local(f"{data_dir.rstrip('/')}/{name}", os.path.join(tmp, name))
    yield os.path.join(tmp, name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def record_range(meta: dict[str, Any], split: str, index: int, count: int) -> tuple[int, int]:
  """Records [start, end) of ``split`` (in file order) that data shard ``index`` of ``count``
  reads: an even split, sizes differing by at most one, so no record is left out."""
  total = sum(meta["shard_counts"][split])
  return index * total // count, (index + 1) * total // count


def shards_in_range(meta: dict[str, Any], split: str, start: int, end: int
                    ) -> tuple[list[str], int]:
  """(names of the shard files holding records [start, end) of ``split``, index of the first
  record of the first of them): the only files a reader of that range needs."""
  names, first, pos = [], None, 0
  for name, n in zip(meta["shards"][split], meta["shard_counts"][split]):
    if pos < end and pos + n > start and n:
      names.append(name)
      first = pos if first is None else first
    pos += n
  return names, 0 if first is None else first


def host_shards(meta: dict[str, Any], split: str, host: int, hosts: int,
                data_shards: int | None = None) -> list[str]:
  """The shard files host ``host`` of ``hosts`` reads when training on ``data_shards`` data
  shards (default one per host; a multiple of ``hosts``, each host owning a contiguous block)."""
  data_shards = data_shards or hosts
  per = data_shards // hosts
  start = record_range(meta, split, host * per, data_shards)[0]
  end = record_range(meta, split, (host + 1) * per - 1, data_shards)[1]
  return shards_in_range(meta, split, start, end)[0]


def shard_bytes(meta: dict[str, Any], split: str, data_dir: str | None = None
                ) -> list[int] | None:
  """Bytes of each shard file of ``split``: from meta.json (format 2), else the local files'
  sizes, else None (a format-1 data set on gs://)."""
  sizes = (meta.get("shard_bytes") or {}).get(split)
  if sizes is not None:
    return [int(b) for b in sizes]
  names = meta["shards"].get(split, [])
  if data_dir and not data_dir.startswith("gs://") and all(
      os.path.isfile(os.path.join(data_dir, n)) for n in names):
    return [os.path.getsize(os.path.join(data_dir, n)) for n in names]
  return None


def bytes_per_host(meta: dict[str, Any], split: str, hosts: int, data_shards: int | None = None,
                   data_dir: str | None = None) -> list[int] | None:
  """Bytes of the shard files each of ``hosts`` hosts caches to train on ``split`` (None when
  the shard sizes are unknown)."""
  sizes = shard_bytes(meta, split, data_dir)
  if sizes is None:
    return None
  size = dict(zip(meta["shards"][split], sizes))
  return [sum(size[n] for n in host_shards(meta, split, h, hosts, data_shards))
          for h in range(hosts)]


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
  if meta.get("format") not in READ_FORMATS:
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


def check_shards(data_dir: str, meta: dict[str, Any], splits=None, *, full: bool = False,
                 names: Sequence[str] | None = None) -> int:
  """Opens every shard of ``splits`` (default all; only those in ``names`` if given) and compares
  its record count with meta.json;
  with ``full`` also reads every record, which verifies ArrayRecord's (Riegeli's) per-chunk
  checksums and each record's header. Returns the number of records checked; a UserError naming
  the first damaged shard (zero bytes, truncated, a flipped byte, a missing file) and the fix."""
  total = 0
  for split in (meta["shards"] if splits is None else splits):
    for name, count in zip(meta["shards"].get(split, []), meta["shard_counts"].get(split, [])):
      if names is not None and name not in names:
        continue
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
              header, off = decode_header(rec)
              if header["shape"] != [*image_size(meta), 3]:
                raise ValueError(f"image shape {header['shape']}")
              if header.get("codec") not in (CODECS if meta["format"] == FORMAT else (None,)):
                raise ValueError(f"image codec {header.get('codec')!r}")
              if off + image_nbytes(header) > len(rec):
                raise ValueError(f"{len(rec)} bytes, too short for its image")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
              raise damaged_shard(data_dir, name, f"record {start + i}: {first_line(e)}") from None
        total += n
      finally:
        with contextlib.suppress(RuntimeError):  # a reader that failed raises its error again
          reader.close()
  return total
