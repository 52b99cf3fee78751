"""CLIP score of samples and their captions (Figure 8: CLIP score vs FID@30K over guidance).

CLIP score = 100 * max(cos(E_I(image), E_T(caption)), 0), averaged over the (sample, caption)
pairs: the CLIPScore of Hessel et al. (2021) with the weight 100 instead of 2.5, the scaling of
the text-to-image literature's CLIP-vs-FID curves (Imagen, Saharia et al. 2022; Parti) and of
torchmetrics' ``CLIPScore``. CLIP runs through ``transformers`` (``CLIPModel`` and
``CLIPProcessor``: the model's own resize, center crop and normalisation, captions truncated to
its 77 tokens), loaded by name (default ``openai/clip-vit-large-patch14``, the ViT-L/14 of that
literature; README choices) from the Hugging Face cache or a local directory. A name that cannot be
loaded offline is one ``error:`` line naming the fix.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from core import extras
from core.errors import UserError

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
SCALE = 100.0


def _load(name_or_path: str):
  extras.require("torch", "the CLIP score", "t2i")
  transformers = extras.require("transformers", "the CLIP score")
  kw = {} if os.path.isdir(name_or_path) else {"local_files_only": True}
  try:
    model = transformers.CLIPModel.from_pretrained(name_or_path, **kw)
    processor = transformers.CLIPProcessor.from_pretrained(name_or_path, **kw)
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
        f"clip_model={name_or_path!r} cannot be loaded offline ({first[:160]}); download it once "
        f"where there is network (huggingface-cli download {name_or_path}) or pass "
        f"clip_model=<local directory with the CLIPModel and CLIPProcessor files>, or "
        f"clip_model=none to skip the CLIP score") from None
  model.eval()
  return model, processor


class ClipScore:
  """Scores (images, captions) pairs with one CLIP model; yields ('clip_score', value)."""

  def __init__(self, name_or_path: str = DEFAULT_MODEL, batch_size: int = 64):
    if batch_size < 1:
      raise UserError(f"CLIP batch_size={batch_size} must be at least 1")
    self.name = name_or_path
    self.batch_size = batch_size
    self.model, self.processor = _load(name_or_path)

  def cosines(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """cos(E_I(images[i]), E_T(captions[i])) for every i (uint8 [N, H, W, 3] images)."""
    import torch  # pylint: disable=import-outside-toplevel
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise UserError(f"CLIP score takes uint8 images [N, H, W, 3], got {images.dtype} "
                      f"{images.shape}")
    if len(images) != len(captions):
      raise UserError(f"CLIP score needs one caption per image: {len(images)} images, "
                      f"{len(captions)} captions")
    out = []
    with torch.no_grad():
      for s in range(0, len(images), self.batch_size):
        inputs = self.processor(text=list(captions[s:s + self.batch_size]),
                                images=list(images[s:s + self.batch_size]), return_tensors="pt",
                                padding=True, truncation=True)
        res = self.model(**inputs)
        img = torch.nn.functional.normalize(res.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(res.text_embeds, dim=-1)
        out.append((img * txt).sum(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0,))

  def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Per pair: 100 * max(cos, 0)."""
    return SCALE * np.maximum(self.cosines(images, captions), 0.0)

  def __call__(self, images: np.ndarray, captions: Sequence[str]) -> Iterator[tuple[str, float]]:
    s = self.scores(images, captions)
    yield "clip_score", float(s.mean())
    yield "clip_score_std", float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
