"""Preparing image data sets: an image source -> ArrayRecord shards of fixed-resolution uint8 RGB.

``python -m core.data prepare src=<source> res=<int> out=<dir or gs://...>`` reads an image
source, center-crops and resizes every image as ADM (guided-diffusion, Dhariwal & Nichol 2021)
does for ImageNet, and writes ArrayRecord files (one record per image) that
``core.input_pipeline`` reads with grain. The paper trains on ImageNet at 128-512 (and 1024,
Appendix C) but does not spell out its resizing; ADM's center crop is the standard choice for
class-conditional ImageNet FID comparisons, so it is what we use (pinned by
``tests/test_data.py::test_adm_resize_matches_direct_pil``).

Sources (``src=``):
  * a folder of class folders: ``src/<class>/**/<image>``; labels are the indices of the sorted
    class folder names; ``eval_fraction`` of the images (chosen by a hash of the relative path,
    so the split is deterministic) go to the 'eval' split, the rest to 'train'.
  * a flat folder of images: unconditional (``num_classes = 0``, every label 0), split as above.
  * the ImageNet layout: ``src/train/<wnid>/*.JPEG`` -> split 'train' and ``src/val/...`` ->
    split 'eval'. ``val`` may hold class folders (as after the usual ``valprep.sh``) or be flat;
    a flat ``val`` needs ``val_labels=<file>``: one line per image, ``<file name> <wnid>``
    (whitespace or comma separated; the name may omit its extension). Kaggle's
    ``LOC_val_solution.csv`` (``ImageId,PredictionString`` with the wnid first) works as is.
  * ``emoji`` (or a path to the ``emoji-datasource-google`` npm tarball): the built-in default
    data set of :mod:`core.datasets`.

Record format (one ArrayRecord record per image; no pickle): ``b"SDR1"``, a little-endian uint32
header length, a UTF-8 JSON header ``{"shape": [H, W, 3], "label": int, "key": str[,
"text_emb": {"shape": [[C,] T', D], "dtype": "float16"|"float32"}, "text_mask": {"max_len": T},
"captions": [str, ...], "portrait": 0|1]}``, then the raw uint8 image bytes (row-major HWC), then
the raw text-embedding bytes if any, then the bool mask bytes [[C,] T'] if any (T' <= T: trailing
padding is not stored). :func:`encode_record` and :func:`decode_record` are the only code that
knows this layout.

Text-to-image sources (``src=coco``, ``src=emoji captions=true``; :mod:`core.coco`) keep every
caption of an image in its record, with its ``text_encoder`` embedding (computed once here, float16)
and mask; the input pipeline draws one caption per example per step. ``res=HxW`` (e.g. 384x640)
prepares non-square images: an image whose orientation differs from the target's (width < height
for a landscape target) is rotated 90 degrees counter-clockwise first and gets ``portrait=1``
(Sec. 5); every record of a text or non-square set carries the flag.

``<out>/meta.json`` describes the result (resolution, num_classes, class names, counts and skipped
counts per split, source, shard file names); ``<out>/label_map.json`` maps class name -> label.
Unreadable or corrupt files are skipped and counted, never fatal, but a source with no readable
image is refused. 16-bit images keep their high byte (:func:`to_rgb`). Everything is written to a
temporary directory beside ``out`` that is renamed into place, so a failed prepare (unwritable
``out``, full disk) leaves no half-written data set; ``info`` checks the shards
(:func:`core.input_pipeline.check_shards`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from core import cli
from core import text_encoder as text_lib
from core.errors import UserError, run_main

FORMAT = "simple-diffusion-records/1"
MAGIC = b"SDR1"
SPLITS = ("train", "eval")
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record individually addressable (needed for grain's random access).
WRITER_OPTIONS = "group_size:1"
TARGET_SHARD_BYTES = 512 * 2**20
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_TEXT_DTYPES = ("float16", "float32")
_SHARD_NAME = re.compile(r"(train|eval)-\d{5}-of-\d{5}" + re.escape(SHARD_SUFFIX))


# ---------------------------------------------------------------------------------------------
# Record format.


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


# ---------------------------------------------------------------------------------------------
# Image preprocessing (ADM / guided-diffusion center crop).


_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _wide_gray_to_la(img: Image.Image) -> Image.Image:
  """16-bit (or 32-bit integer) grayscale -> 8-bit 'LA', keeping the high byte (x >> 8).

  PIL's own ``convert`` clips these modes at 255, which turns a 16-bit image solid white. The high
  byte is what PIL's PNG decoder keeps for 16-bit RGB(A) and gray+alpha, so every 16-bit PNG maps
  to 8 bits alike. A PNG ``tRNS`` gray value becomes alpha 0 on exactly those pixels. A mode-'I'
  image must hold 16-bit values (0..65535); other ranges have no defined 8-bit scale.
  """
  x = np.asarray(img)
  if img.mode == "I" and x.size and (x.min() < 0 or x.max() > 65535):
    raise ValueError(f"32-bit integer image with values {x.min()}..{x.max()} outside the 16-bit "
                     f"range 0..65535 has no defined 8-bit scale; convert it to 8 or 16 bits")
  x = x.astype(np.int64)
  alpha = np.full(x.shape, 255, np.uint8)
  t = img.info.get("transparency")
  if isinstance(t, int):
    alpha[x == t] = 0
  return Image.fromarray(np.stack([(x >> 8).astype(np.uint8), alpha], -1), "LA")


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts to 8-bit RGB; transparency (alpha, or a PNG tRNS colour) is composited on white.

  16-bit grayscale (PIL modes 'I;16*', 'I') keeps the high byte of each value (x >> 8), as PIL
  does for 16-bit RGB; float images ('F') have no defined scale and raise ValueError (the file is
  skipped and counted, with the reason).
  """
  if img.mode == "F":
    raise ValueError("floating-point image (mode F) has no defined 8-bit scale; convert it to 8 or "
                     "16 bits")
  if img.mode in _WIDE_GRAY:
    img = _wide_gray_to_la(img)
  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def parse_res(res: int | str | Sequence[int]) -> tuple[int, int]:
  """``64`` / ``"64"`` -> (64, 64); ``"384x640"`` / (384, 640) -> (height, width)."""
  if isinstance(res, str):
    parts = res.lower().split("x")
    try:
      hw = tuple(int(p) for p in parts)
    except ValueError:
      hw = ()
    if len(hw) not in (1, 2):
      raise UserError(f"res={res!r} must be a size like 64 or HxW like 384x640")
  elif isinstance(res, (int, np.integer)):
    hw = (int(res),)
  else:
    hw = tuple(int(r) for r in res)
  h, w = (hw[0], hw[0]) if len(hw) == 1 else hw
  if h <= 0 or w <= 0:
    raise UserError(f"res={res} must be a positive image size, e.g. res=64 or res=384x640")
  return h, w


class ImageTooSmall(ValueError):
  """An image smaller than the target size while upscaling is not allowed."""


def center_crop_resize(img: Image.Image, res: int | tuple[int, int], *,
                       upscale: bool = True) -> np.ndarray:
  """ADM's ImageNet preprocessing: uint8 [H, W, 3] from a PIL RGB image (res = H = W or (H, W)).

  1. While both sides are at least twice the target's, halve them with a BOX filter (integer
     division of the size, as ADM does; this anti-aliases large downscales cheaply).
  2. Resize with BICUBIC by the smallest scale that covers the target (for a square target: the
     smaller side becomes res; the other side rounded).
  3. Take the central H x W crop (offsets floor((size - target) / 2)).
  With ``upscale=False`` an image that would need enlarging raises :class:`ImageTooSmall`.
  """
  h, w = parse_res(res)
  if not upscale and (img.size[0] < w or img.size[1] < h):
    raise ImageTooSmall(f"{img.size[0]} wide and {img.size[1]} high, smaller than the target "
                        f"(width {w}, height {h})")
  while img.size[0] >= 2 * w and img.size[1] >= 2 * h:
    img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
  scale = max(w / img.size[0], h / img.size[1])
  img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
  arr = np.asarray(img, dtype=np.uint8)
  top = (arr.shape[0] - h) // 2
  left = (arr.shape[1] - w) // 2
  out = arr[top:top + h, left:left + w]
  if out.shape != (h, w, 3):
    raise ValueError(f"crop has shape {out.shape}, expected {(h, w, 3)}")
  return np.ascontiguousarray(out)


def orient(img: Image.Image, res: int | tuple[int, int]) -> tuple[Image.Image, bool]:
  """(image, rotated): a portrait image for a landscape target (or the reverse) is rotated 90
  degrees counter-clockwise, as the 384x640 model's preprocessing does (Sec. 5); square targets
  are never rotated."""
  h, w = parse_res(res)
  if h == w or (img.size[0] < img.size[1]) == (w < h) or img.size[0] == img.size[1]:
    return img, False
  return img.transpose(Image.Transpose.ROTATE_90), True


def load_image(path_or_bytes: str | bytes, res: int | tuple[int, int], *, upscale: bool = True,
               rotate: bool = False) -> np.ndarray | tuple[np.ndarray, bool]:
  """Decodes an image file (path or its bytes) and returns ADM-preprocessed uint8 [H, W, 3]; with
  ``rotate`` returns (image, rotated) after :func:`orient`."""
  f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with Image.open(f) as img:
    img.load()
    rgb = to_rgb(img)
  if not rotate:
    return center_crop_resize(rgb, res, upscale=upscale)
  rgb, rotated = orient(rgb, res)
  return center_crop_resize(rgb, res, upscale=upscale), rotated


# ---------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class Item:
  """One image of a source: a stable key (relative path or file name), its label, its bytes (and
  captions).

  Exactly one of ``path`` (a file to read) and ``data`` (the file's bytes) is set.
  """
  key: str
  label: int
  path: str | None = None
  data: bytes | None = None
  captions: tuple[str, ...] = ()  # text-to-image sources: every caption of the image


@dataclasses.dataclass
class Source:
  """Images to prepare, per split, plus the label set."""
  items: dict[str, list[Item]]
  class_names: list[str]
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # found while listing
  skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  upscale: bool = True  # False: an image smaller than the target size is an error (COCO)


def hash_fraction(key: str) -> float:
  """A deterministic number in [0, 1) from a key (first 8 bytes of its SHA-256)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, eval_fraction: float) -> str:
  """'eval' for about eval_fraction of keys (by hash), else 'train'."""
  return "eval" if hash_fraction(key) < eval_fraction else "train"


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _list_files(root: str) -> list[str]:
  """Every non-hidden regular file under root, as sorted paths relative to root."""
  out = []
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(x for x in dirs if _visible(x))
    rel = os.path.relpath(d, root)
    for f in sorted(files):
      if _visible(f):
        out.append(f if rel == "." else os.path.join(rel, f))
  return sorted(out)


def _subdirs(path: str) -> list[str]:
  return sorted(x for x in os.listdir(path) if _visible(x) and os.path.isdir(os.path.join(path, x)))


def _class_folder_items(root: str, class_names: list[str], key_prefix: str) -> list[Item]:
  index = {c: i for i, c in enumerate(class_names)}
  items = []
  for c in _subdirs(root):
    if c not in index:
      raise UserError(f"class folder {os.path.join(root, c)!r} is not one of the {len(class_names)} "
                      f"training classes; check src= (val classes must match train classes)")
    for rel in _list_files(os.path.join(root, c)):
      items.append(Item(key=f"{key_prefix}{c}/{rel}", label=index[c],
                        path=os.path.join(root, c, rel)))
  return items


def read_val_labels(path: str, class_names: list[str]) -> dict[str, int]:
  """Parses a val labels file -> {file stem: label}. See the module docstring for the format."""
  if not os.path.isfile(path):
    raise UserError(f"val_labels={path!r} does not exist; pass a file of '<image file> <wnid>' lines")
  index = {c: i for i, c in enumerate(class_names)}
  labels: dict[str, int] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"val_labels={path!r} is not UTF-8 text (byte {e.start}); pass a text file "
                    f"of '<image file> <wnid>' lines") from None
  for n, line in enumerate(lines, 1):
    line = line.strip()
    if not line:
      continue
    fields = line.split(",", 1) if "," in line else line.split(None, 1)
    if len(fields) < 2 or not fields[1].split():
      raise UserError(f"val_labels={path!r} line {n} is not '<image file> <class>': {line[:80]!r}")
    name, cls = fields[0].strip(), fields[1].split()[0]
    if cls not in index:
      if n == 1:  # a header line such as 'ImageId,PredictionString'
        continue
      raise UserError(f"val_labels={path!r} line {n}: class {cls!r} is not a train class folder name")
    labels[os.path.splitext(os.path.basename(name))[0]] = index[cls]
  return labels


def scan_folder(src: str, *, eval_fraction: float | None = None, val_labels: str | None = None,
                splits: Sequence[str] = SPLITS) -> Source:
  """Lists an image folder (class folders, flat, or the ImageNet train/val layout) as a Source."""
  if not os.path.isdir(src):
    raise UserError(f"src={src!r} is not a directory; pass an image folder, an ImageNet root "
                    f"(train/, val/), or src=emoji")
  items: dict[str, list[Item]] = {s: [] for s in splits}
  skipped: dict[str, int] = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  train_dir, val_dir = os.path.join(src, "train"), os.path.join(src, "val")
  if os.path.isdir(train_dir) and _subdirs(train_dir):  # ImageNet layout
    if eval_fraction is not None:
      raise UserError(f"eval_fraction= does not apply to {src!r}: it has train/ and val/ folders, "
                      f"whose val/ images form the eval split; drop eval_fraction")
    class_names = _subdirs(train_dir)
    if "train" in items:
      items["train"] = _class_folder_items(train_dir, class_names, "train/")
    if "eval" in items:
      if not os.path.isdir(val_dir):
        raise UserError(f"{src!r} has train/ but no val/ folder for the eval split; add val/ or pass "
                        f"splits=train")
      if _subdirs(val_dir):
        items["eval"] = _class_folder_items(val_dir, class_names, "val/")
      else:
        if not val_labels:
          raise UserError(f"{val_dir!r} is a flat folder; pass val_labels=<file of '<image> <wnid>' "
                          f"lines> (e.g. LOC_val_solution.csv) or pass splits=train")
        labels = read_val_labels(val_labels, class_names)
        for rel in _list_files(val_dir):
          stem = os.path.splitext(os.path.basename(rel))[0]
          if stem in labels:
            items["eval"].append(Item(key=f"val/{rel}", label=labels[stem],
                                      path=os.path.join(val_dir, rel)))
          else:
            skipped["eval"] += 1
            if len(examples["eval"]) < 10:
              examples["eval"].append(f"val/{rel}: no entry in val_labels")
    desc = f"imagenet-layout:{os.path.abspath(src)}"
  else:
    frac = 0.1 if eval_fraction is None else eval_fraction
    if not 0.0 <= frac < 1.0:
      raise UserError(f"eval_fraction={frac} must be in [0, 1)")
    class_names = _subdirs(src)
    if class_names:
      listed = _class_folder_items(src, class_names, "")
    else:
      listed = [Item(key=rel, label=0, path=os.path.join(src, rel)) for rel in _list_files(src)]
    for it in listed:
      s = split_of(it.key, frac)
      if s in items:
        items[s].append(it)
    desc = f"folder:{os.path.abspath(src)} (eval_fraction={frac})"
  return Source(items=items, class_names=class_names, description=desc, skipped=skipped,
                skipped_examples=examples)


def is_emoji_source(src: str) -> bool:
  return src == "emoji" or (src.endswith(".tgz") and "emoji-datasource" in os.path.basename(src))


# ---------------------------------------------------------------------------------------------
# Writing.


def _decode_item(args: tuple[Item, Any, bool]) -> tuple[np.ndarray | None, str, bool]:
  """Worker: (image or None, reason when None, rotated (only for a non-square res)). Never raises
  on a bad file; an image smaller than the target without ``upscale`` is a UserError."""
  item, res, upscale = args
  try:
    image, rotated = load_image(item.data if item.data is not None else item.path, res,
                                upscale=upscale, rotate=True)
    return image, "", rotated
  except ImageTooSmall as e:
    h, w = parse_res(res)
    raise UserError(f"image {item.key} is {e}; pass upscale=true to enlarge small images "
                    f"(BICUBIC) or a res= smaller than {h if h == w else f'{h}x{w}'}") from None
  except Exception as e:  # corrupt, truncated, not an image, unreadable: skip and count
    return None, f"{type(e).__name__}: {str(e)[:120]}", False


class _Progress:
  """tqdm when stderr is a terminal, else a log line every 10% (or 30 s)."""

  def __init__(self, total: int, desc: str, enabled: bool = True):
    self.total, self.desc, self.n = total, desc, 0
    self.enabled = enabled
    self.start = self.last = time.time()
    self.next_pct = 10
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.bar is not None:
      self.bar.update(n)
      return
    if not self.enabled or not self.total or (self.total < 2000 and self.n < self.total):
      return  # small splits: just the final line
    pct = 100 * self.n / self.total
    now = time.time()
    if pct >= self.next_pct or now - self.last >= 30:
      rate = self.n / max(now - self.start, 1e-9)
      print(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%), {rate:.0f} img/s", file=sys.stderr,
            flush=True)
      self.last = now
      while self.next_pct <= pct:
        self.next_pct += 10

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _decode_chunk(items: list[Item], res, upscale: bool) -> list[tuple[np.ndarray | None, str, bool]]:
  return [_decode_item((it, res, upscale)) for it in items]


def _map_items(items: list[Item], res, workers: int, chunk: int = 64, upscale: bool = True
               ) -> Iterator[tuple[np.ndarray | None, str, bool]]:
  """(image or None, reason, rotated) for each item, in order; decoded by ``workers`` processes."""
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


def shard_names(split: str, n: int) -> list[str]:
  return [f"{split}-{i:05d}-of-{n:05d}{SHARD_SUFFIX}" for i in range(n)]


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

  With ``encoder`` (a :class:`core.text_encoder.TextEncoder`), every caption of each item is
  encoded and stored with its mask; images without a caption are skipped. Records of a text or
  non-square data set carry the 'portrait' flag.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  h, w = parse_res(res)
  if shards <= 0:
    shards = max(1, math.ceil(len(items) * h * w * 3 / TARGET_SHARD_BYTES))
  shards = max(1, min(shards, max(1, len(items))))
  names = shard_names(split, shards)
  writers = [ArrayRecordWriter(os.path.join(out_dir, n), WRITER_OPTIONS) for n in names]
  counts = [0] * shards
  written, skipped, examples = 0, 0, []
  flag = encoder is not None or h != w
  bar = _Progress(len(items), f"prepare {split}", progress)
  try:
    for item, (image, reason, rotated), (cap_emb, cap_mask) in zip(
        items, _map_items(items, res, workers, upscale=upscale),
        _encoded_chunks(items, encoder, text_dtype)):
      bar.update()
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
        writers[shard].write(encode_record(
            image, item.label, key=item.key, text_emb=emb, text_mask=cap_mask,
            captions=item.captions if cap_emb is not None else None,
            portrait=rotated if flag else None))
      except RuntimeError as e:  # ArrayRecord reports failed writes (disk full, ...) as these
        raise OSError(_first_line(e)) from None
      counts[shard] += 1
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
    raise OSError(_first_line(close_error))
  # Drop shards left empty (only possible when nearly everything was skipped).
  keep = [n for n, c in zip(names, counts) if c > 0]
  for n, c in zip(names, counts):
    if c == 0:
      os.remove(os.path.join(out_dir, n))
  return {"count": written, "skipped": skipped, "shards": keep,
          "shard_counts": [c for c in counts if c > 0], "skipped_examples": examples}


def _load_text_emb(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise UserError(f"text_emb={path!r} does not exist; pass an .npz of arrays keyed by image file stem")
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz of named arrays")
    with z:
      return {os.path.splitext(os.path.basename(k))[0]: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"text_emb={path!r} is not a readable .npz ({_first_line(e)}); pass an .npz "
                    f"of arrays keyed by image file stem (numpy.savez)") from None


def _split_records(out_dir: str, names: Sequence[str]) -> Iterator[dict[str, Any]]:
  """Every decoded record of the shards ``names`` in ``out_dir``, in file order."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  for n in names:
    reader = ArrayRecordReader(os.path.join(out_dir, n))
    try:
      for start in range(0, reader.num_records(), 256):
        for rec in reader.read(start, min(reader.num_records(), start + 256)):
          yield decode_record(rec)
    finally:
      reader.close()


def write_dataset(source: Source, res, out_dir: str, *, shards: int = 0, workers: int = 1,
                  text_emb: dict[str, np.ndarray] | None = None, progress: bool = True,
                  source_name: str | None = None, encoder=None, upscale: bool | None = None,
                  eval_captions: int = 0, caption_seed: int = 0) -> dict[str, Any]:
  """Writes every split of ``source`` plus meta.json and label_map.json into a local directory;
  with ``encoder`` also the ``eval_captions`` evaluation captions drawn from split 'eval'."""
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  h, w = parse_res(res)
  upscale = source.upscale if upscale is None else upscale
  meta: dict[str, Any] = {
      "format": FORMAT, "resolution": h if h == w else [h, w], "image_size": [h, w],
      "num_classes": len(source.class_names),
      "class_names": list(source.class_names), "source": source_name or source.description,
      "preprocessing": "adm_center_crop (BOX halving while both sides >= 2x target, BICUBIC, center "
                       "crop); alpha composited on white" + ("" if h == w else
                       "; portrait images rotated 90 degrees counter-clockwise (flag 'portrait')") +
                       ("" if upscale else "; no upscaling"),
      "has_text_emb": text_emb is not None or encoder is not None,
      "counts": {}, "skipped": {}, "shards": {}, "shard_counts": {}, "skipped_examples": {},
  }
  if encoder is not None:
    meta["text"] = dict(encoder.describe(), dtype="float16", captions="all per image")
  n_ref = len(source.items.get("train", [])) or max(len(v) for v in source.items.values())
  for split, items in source.items.items():
    split_shards = 0  # auto
    if shards > 0:
      split_shards = max(1, math.ceil(shards * len(items) / max(1, n_ref)))
    r = write_split(items, split, (h, w), out_dir, shards=split_shards, workers=workers,
                    text_emb=text_emb, progress=progress, encoder=encoder, upscale=upscale)
    meta["counts"][split] = r["count"]
    meta["skipped"][split] = r["skipped"] + source.skipped.get(split, 0)
    meta["shards"][split] = r["shards"]
    meta["shard_counts"][split] = r["shard_counts"]
    meta["skipped_examples"][split] = (source.skipped_examples.get(split, []) +
                                       r["skipped_examples"])[:10]
  if encoder is not None and eval_captions > 0 and meta["counts"].get("eval"):
    from core import captions  # pylint: disable=g-import-not-at-top
    names = meta["shards"]["eval"]
    ec = captions.write_eval_captions(
        out_dir, lambda: _split_records(out_dir, names), count=eval_captions, seed=caption_seed,
        meta=dict(encoder.describe(), split="eval"))
    meta["eval_captions"] = {"count": len(ec.captions), "seed": caption_seed,
                             "repeats": ec.meta["repeats"]}
  meta["prepare_seconds"] = round(time.time() - t0, 2)
  with open(os.path.join(out_dir, "label_map.json"), "w") as f:
    json.dump({c: i for i, c in enumerate(source.class_names)}, f, indent=1)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def summary_line(meta: dict[str, Any]) -> str:
  parts = [f"{s}: {meta['counts'][s]} written, {meta['skipped'][s]} skipped" for s in meta["counts"]]
  h, w = meta.get("image_size") or [meta["resolution"]] * 2
  what = "captioned" if meta.get("text") else f"{meta['num_classes']} classes"
  return f"prepared {h}x{w} ({what}) -- " + "; ".join(parts)


def make_temp_dir(parent: str | None, prefix: str) -> str:
  """mkdtemp, but with the usual permissions (mkdtemp's 0700 would survive the final rename)."""
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  return tmp


def _remote(path: str) -> bool:
  return path.startswith("gs://")


def _storage():
  try:
    from core import storage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"gs:// paths need core.storage ({e}); use a local out= and copy it with "
                    f"gsutil -m cp -r") from None
  return storage


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
      if _SHARD_NAME.fullmatch(n):
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


def _first_line(e: BaseException) -> str:
  return ((str(e).strip().splitlines() or [""])[0] or type(e).__name__)[:300]


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
  if _remote(out):
    if _storage().exists(out.rstrip("/") + "/meta.json") and not overwrite:
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
            eval_captions: int = 0, caption_seed: int = 0) -> dict[str, Any]:
  """Prepares ``src`` at resolution ``res`` (int or HxW) into ``out`` (local or gs://); returns the
  meta dict. ``captions`` (default: on for a COCO layout) keeps every caption of each image with
  its ``text_encoder`` embeddings (``max_len`` tokens) and writes ``eval_captions`` of them."""
  from core import coco, datasets  # pylint: disable=g-import-not-at-top  (they import core.data)
  res = parse_res(res)
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise UserError(f"splits={','.join(splits)} must name some of: {', '.join(SPLITS)}")
  _check_out(out, overwrite)
  emoji = is_emoji_source(src)
  if src == "coco":
    raise UserError("src=coco needs the COCO root: pass src=<folder with train2017/, val2017/ and "
                    "annotations/> (captions are then on)")
  if captions is None:
    captions = not emoji and os.path.isdir(os.path.join(src, "annotations"))
  if captions and text_emb:
    raise UserError("pass either captions=true (text_encoder= embeds them) or text_emb=<.npz>")
  if emoji:
    source = datasets.emoji_source(None if src == "emoji" else src, eval_fraction=eval_fraction,
                                   splits=splits, captions=bool(captions))
  elif captions:
    source = coco.coco_source(src, splits=splits)
  else:
    if not os.path.exists(src):
      raise UserError(f"src={src!r} does not exist; pass an image folder, an ImageNet root "
                      f"(train/, val/), a COCO root (with captions=true) or src=emoji")
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
  encoder = None
  if captions:
    if emoji:  # the demo's offline encoder (core.datasets.emoji_text_encoder)
      text_encoder = text_encoder or datasets.emoji_text_encoder()
      max_len = max_len or datasets.EMOJI_MAX_LEN
    encoder = text_lib.TextEncoder(text_encoder or text_lib.DEFAULT_ENCODER,
                                   max_len or text_lib.DEFAULT_MAX_LEN)
    if eval_captions <= 0:  # COCO FID@30K; the emoji set: one draw of each eval caption
      eval_captions = 30_000 if not emoji else sum(len(i.captions)
                                                   for i in source.items.get("eval", []))
  emb = _load_text_emb(text_emb) if text_emb else None
  tmp = None
  try:
    if _remote(out):
      tmp = make_temp_dir(None, "sd-prepare-")
    else:
      parent = os.path.dirname(os.path.abspath(out))
      os.makedirs(parent, exist_ok=True)
      _remove_stale_temps(out)
      tmp = make_temp_dir(parent, _temp_prefix(out) + f"{socket.gethostname()}-{os.getpid()}-")
    meta = write_dataset(source, res, tmp, shards=shards, workers=workers, text_emb=emb,
                         progress=progress, encoder=encoder, upscale=upscale,
                         eval_captions=eval_captions, caption_seed=caption_seed)
    if not sum(meta["counts"].values()):
      n = sum(len(v) for v in source.items.values())
      examples = [e for v in meta["skipped_examples"].values() for e in v]
      raise UserError(f"none of the {n} files of src={src!r} could be read as an image (e.g. "
                      f"{examples[0] if examples else '?'}); nothing was written to out={out!r}")
    if _remote(out):
      storage = _storage()
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


# ---------------------------------------------------------------------------------------------
# Command line.

PREPARE_OPTIONS = [
    cli.Option("src", None, "image source: a folder of class folders (label = index of the sorted "
               "folder name), a flat image folder (unconditional), an ImageNet root with train/<wnid>/ "
               "and val/ (val/ as class folders, or flat plus val_labels=), or 'emoji' for the "
               "built-in emoji-datasource-google set (needs npm). Required."),
    cli.Option("res", None, "output size: 64 (square) or HxW (e.g. 384x640); images are ADM "
               "center-cropped and resized to it (for HxW, images of the other orientation are "
               "rotated first and flagged 'portrait'). Required.", parse_res),
    cli.Option("out", None, "output directory (local path or gs://bucket/prefix); gets "
               "<split>-NNNNN-of-NNNNN.array_record shards, meta.json and label_map.json. Required."),
    cli.Option("eval_fraction", None, "for a folder source without train/ and val/: fraction of "
               "images (chosen by a hash of their relative path) put in the 'eval' split. Default 0.1.",
               float),
    cli.Option("shards", 0, "number of train shards (eval gets a proportional number); 0 = about "
               "one per 512 MiB of pixels.", int),
    cli.Option("splits", "train,eval", "comma-separated splits to write (train, eval).",
               lambda s: [x.strip() for x in s.split(",") if x.strip()]),
    cli.Option("val_labels", None, "labels for a flat ImageNet val/ folder: lines '<image file> "
               "<wnid>' (whitespace or comma separated, e.g. Kaggle's LOC_val_solution.csv)."),
    cli.Option("text_emb", None, "optional .npz of text embeddings keyed by image file stem, "
               "stored in each record as 'text_emb' (images without one are skipped)."),
    cli.Option("captions", None, "text-to-image: keep every caption of each image with its text "
               "embedding. On by default for a COCO root (train2017/, val2017/, annotations/"
               "captions_*2017.json; or 2014); src=emoji captions=true captions the emoji with "
               "their names.", cli.parse_bool),
    cli.Option("text_encoder", None, "with captions: a Hugging Face T5 name or save_pretrained "
               f"folder (default {text_lib.DEFAULT_ENCODER}; for src=emoji a small random T5 "
               "built once under the data root)."),
    cli.Option("max_len", 0, f"with captions: tokens per caption (0 = {text_lib.DEFAULT_MAX_LEN}, "
               "emoji 24).", int),
    cli.Option("eval_captions", 0, "with captions: captions drawn from the eval split for "
               "FID/CLIP evaluation (0 = 30000 for COCO, every eval caption for emoji).", int),
    cli.Option("caption_seed", 0, "seed of the evaluation caption draw.", int),
    cli.Option("upscale", None, "enlarge images smaller than res (BICUBIC); default true, false for "
               "COCO (a smaller image is then an error).", cli.parse_bool),
    cli.Option("workers", max(1, min(16, os.cpu_count() or 1)), "processes decoding images.", int),
    cli.Option("max_images", 0, "keep at most this many images per split (0 = all); for smoke tests.",
               int),
    cli.Option("overwrite", False, "replace a data set already prepared at out=.", cli.parse_bool),
    cli.Option("progress", True, "show progress (a bar on a terminal, else periodic log lines).",
               cli.parse_bool),
]

# info's verify=auto reads every record (checking ArrayRecord's chunk checksums) up to this size.
VERIFY_AUTO_BYTES = 2 * 2**30
INFO_OPTIONS = [
    cli.Option("data_dir", None, "a prepared data set directory (or gs://...)."),
    cli.Option("verify", "auto", "shard check: quick opens every shard and compares its record "
               "count with meta.json; full also reads every record (ArrayRecord's checksums catch "
               "flipped bytes); auto = full up to 2 GiB of shards, else quick.",
               choices=["auto", "quick", "full"]),
]

DESCRIPTION = """\
Prepares an image data set for training: every image is converted to RGB (transparency composited
on white), center-cropped and resized as ADM does for ImageNet (halve with a BOX filter while the
smaller side is >= 2*res, BICUBIC so the smaller side is res, central res x res crop) and written
as uint8 records with an int label to ArrayRecord shards (splits 'train' and 'eval'), plus
meta.json. Corrupt or unreadable files are skipped and counted.

commands:
  prepare src=... res=... out=...   prepare a data set (options below)
  info data_dir=... [verify=...]    print a prepared data set's summary, check its shards

example: python -m core.data prepare src=/data/imagenet res=256 out=/data/imagenet256 workers=16"""


def main(argv: Sequence[str]) -> int:
  """``python -m core.data prepare ...`` / ``python -m core.data info data_dir=...``."""
  argv = list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(cli.format_help("core.data prepare", DESCRIPTION, PREPARE_OPTIONS))
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd == "info":
    values, _ = cli.parse(rest, INFO_OPTIONS, prog="core.data info",
                          description="Prints a prepared data set's summary and checks its shards.")
    if not values["data_dir"]:
      raise UserError("info needs data_dir=<prepared data set directory>")
    from core import input_pipeline  # pylint: disable=g-import-not-at-top
    data_dir = values["data_dir"]
    meta = input_pipeline.read_meta(data_dir)
    local = input_pipeline._localize(data_dir)  # pylint: disable=protected-access
    names = [n for v in meta["shards"].values() for n in v]
    nbytes = sum(os.path.getsize(os.path.join(local, n)) for n in names
                 if os.path.isfile(os.path.join(local, n)))
    verify = values["verify"]
    full = verify == "full" or (verify == "auto" and nbytes <= VERIFY_AUTO_BYTES)
    n = input_pipeline.check_shards(local, meta, full=full)
    print(summary_line(meta))
    print(json.dumps({k: meta[k] for k in ("resolution", "num_classes", "counts", "skipped",
                                            "source")}, indent=1))
    print(f"shards ok: {len(names)} files, {nbytes / 2**20:.1f} MiB, {n} records " +
          ("read back with their checksums" if full else
           "opened and counted (verify=full reads every record's checksum)"))
    return 0
  if cmd != "prepare":
    raise UserError(f"unknown command {cmd!r}; use: python -m core.data prepare src=... res=... out=...")
  values, bindings = cli.parse(rest, PREPARE_OPTIONS, prog="core.data prepare",
                               description=DESCRIPTION)
  if bindings:
    raise UserError(f"prepare takes no gin bindings (got {bindings[0]!r}); see --help")
  for name in ("src", "res", "out"):
    if values[name] is None:
      raise UserError(f"{name}= is required, e.g. python -m core.data prepare src=emoji res=64 "
                      f"out=data/emoji-64")
  splits = values["splits"]
  if isinstance(splits, str):  # the default
    splits = [x.strip() for x in splits.split(",") if x.strip()]
  meta = prepare(values["src"], values["res"], values["out"], eval_fraction=values["eval_fraction"],
                 shards=values["shards"], splits=splits, val_labels=values["val_labels"],
                 text_emb=values["text_emb"], workers=values["workers"],
                 max_images=values["max_images"], overwrite=values["overwrite"],
                 progress=values["progress"], captions=values["captions"],
                 text_encoder=values["text_encoder"], max_len=values["max_len"],
                 upscale=values["upscale"], eval_captions=values["eval_captions"],
                 caption_seed=values["caption_seed"])
  for split, ex in meta["skipped_examples"].items():
    for e in ex[:3]:
      print(f"skipped ({split}) e.g. {e}", file=sys.stderr)
  print(summary_line(meta) + f" -> {values['out']} in {meta['prepare_seconds']:.1f} s")
  return 0


if __name__ == "__main__":
  run_main(main)
