"""ADM's ImageNet preprocessing (guided-diffusion, Dhariwal & Nichol 2021): any image -> uint8 RGB.

The paper trains on ImageNet at 128-512 without spelling out its resizing; ADM's center crop is
the standard choice for class-conditional ImageNet FID comparisons, so it is what we use.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from core.errors import UserError

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
