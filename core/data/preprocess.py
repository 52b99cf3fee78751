"""ADM's ImageNet preprocessing (guided-diffusion, Dhariwal & Nichol 2021): any image -> uint8 RGB.

The paper trains on ImageNet at 128-512 without spelling out its resizing; ADM's center crop is
the standard choice for class-conditional ImageNet FID comparisons, so it is what we use.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

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


def center_crop_resize(img: Image.Image, res: int) -> np.ndarray:
  """ADM's ImageNet preprocessing: uint8 [res, res, 3] from a PIL RGB image.

  1. While the smaller side is at least 2*res, halve both sides with a BOX filter (integer
     division of the size, as ADM does; this anti-aliases large downscales cheaply).
  2. Resize with BICUBIC so that the smaller side is exactly res (the other side rounded).
  3. Take the central res x res crop (offsets floor((size - res) / 2)).
  """
  while min(img.size) >= 2 * res:
    img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
  scale = res / min(img.size)
  img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
  arr = np.asarray(img, dtype=np.uint8)
  top = (arr.shape[0] - res) // 2
  left = (arr.shape[1] - res) // 2
  out = arr[top:top + res, left:left + res]
  if out.shape != (res, res, 3):
    raise ValueError(f"crop has shape {out.shape}, expected {(res, res, 3)}")
  return np.ascontiguousarray(out)


def load_image(path_or_bytes: str | bytes, res: int) -> np.ndarray:
  """Decodes an image file (path or its bytes) and returns ADM-preprocessed uint8 [res, res, 3]."""
  f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with Image.open(f) as img:
    img.load()
    return center_crop_resize(to_rgb(img), res)
