"""Networks of simple diffusion: UNet (B.1), UViT (B.2), 5/3 DWT / conv patching, FLOPs.

model.apply({'params': p}, z, logsnr, label=None, text_emb=None, train=False,
            rngs={'dropout': key}) -> v prediction, float32, same shape as z (NHWC).
"""
from core.models.factory import make_model, model_image_size
from core.models.patching import dwt53, idwt53, parse_patching
from core.models.unet import UNet
from core.models.uvit import UViT
from core.models.validate import validate

__all__ = ["UNet", "UViT", "make_model", "model_image_size", "validate", "dwt53", "idwt53",
           "parse_patching"]
