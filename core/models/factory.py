"""Gin-selectable model factory: ``model.arch = 'uvit'`` picks the network, UNet.* / UViT.* set it.

A gin file binds e.g.::

    model.arch = 'uvit'
    model.image_size = 512     # the paper's resolution for this configuration
    UViT.num_transformer_blocks = 36

and ``make_model()`` returns the configured flax module (validated for image_size when given).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import gin

from core.errors import UserError
from core.models.unet import UNet
from core.models.uvit import UViT
from core.models.validate import validate

ARCHS = {"unet": UNet, "uvit": UViT}


@gin.configurable("model")
def make_model(arch: str = "unet", image_size: int | Sequence[int] | None = None,
               image_channels: int = 3) -> nn.Module:
  """Builds UNet or UViT from their gin bindings; validates them for image_size if it is set."""
  key = str(arch).lower()
  if key not in ARCHS:
    raise UserError(f"model.arch={arch!r} is unknown; use one of {', '.join(ARCHS)}")
  model = ARCHS[key]()
  if image_size is not None:
    validate(model, image_size, image_channels)
  return model


def model_image_size(default: int | Sequence[int] | None = None) -> int | Sequence[int] | None:
  """The image size bound as ``model.image_size`` in the parsed gin config (else ``default``)."""
  try:
    return gin.query_parameter("model.image_size")
  except ValueError:
    return default
