"""Parameter count and FLOPs per image of a gin model configuration, without allocating weights.

    python -m core.models.summary gin/models/uvit_imagenet512.gin
    python -m core.models.summary gin/models/unet_imagenet128.gin UNet.num_res_blocks=[1,1,1,1,1]

Parameters are counted with jax.eval_shape(model.init) (shapes only, so the 2B-parameter U-ViT
costs no memory); FLOPs come from core.models.flops (2 x MACs, training = 3 x forward).
"""
from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from core import cli
from core import config as config_lib
from core.errors import UserError, run_main
from core.models.factory import make_model, model_image_size
from core.models.flops import forward_flops
from core.models.validate import image_hw, validate

OPTIONS = [
    cli.Option("gin_file", None, "gin file(s) with the model bindings (may also be given as bare "
               "paths ending in .gin)", repeated=True),
    cli.Option("image_size", None, "image size (int or HxW); default: the gin file's "
               "model.image_size"),
    cli.Option("text_len", 128, "text tokens for text-conditioned models", int),
    cli.Option("text_dim", 4096, "text embedding width (T5-XXL: 4096)", int),
]


def parse_image_size(v: Any) -> int | tuple[int, int]:
  """'256' -> 256, '384x640' -> (384, 640); ints and pairs pass through."""
  if isinstance(v, str):
    parts = v.lower().replace(",", "x").split("x")
    try:
      vals = [int(p) for p in parts if p.strip()]
    except ValueError:
      raise UserError(f"image_size={v!r} is not an int or HxW") from None
    return vals[0] if len(vals) == 1 else (vals[0], vals[1])
  if isinstance(v, (list, tuple)):
    return (int(v[0]), int(v[1]))
  return int(v)


def example_inputs(model: Any, image_size: Any, batch: int = 1, image_channels: int = 3,
                   text_len: int = 128, text_dim: int = 4096) -> dict[str, Any]:
  """Abstract (ShapeDtypeStruct) call arguments for model.init / eval_shape."""
  h, w = image_hw(image_size)
  args = {"z": jax.ShapeDtypeStruct((batch, h, w, image_channels), jnp.float32),
          "logsnr": jax.ShapeDtypeStruct((batch,), jnp.float32)}
  if model.num_classes > 0:
    args["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if getattr(model, "text_channels", 0) > 0:
    args["text_emb"] = jax.ShapeDtypeStruct((batch, text_len, text_dim), jnp.float32)
  return args


def param_shapes(model: Any, image_size: Any, **kw) -> Any:
  """The params pytree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
  validate(model, image_size)
  args = example_inputs(model, image_size, **kw)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return jax.eval_shape(lambda r, a: model.init(r, **a), rng, args)["params"]


def count_params(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def summarize(model: Any, image_size: Any, text_len: int = 128, text_dim: int = 4096
              ) -> dict[str, Any]:
  """{'arch', 'image_size', 'params', 'params_by_module', 'flops_forward', 'flops_train'}."""
  shapes = param_shapes(model, image_size, text_len=text_len, text_dim=text_dim)
  groups: dict[str, int] = collections.OrderedDict()
  for name, sub in shapes.items():
    key = name.split("_block")[0] if "_block" in name else name
    groups[key] = groups.get(key, 0) + count_params(sub)
  has_text = getattr(model, "text_channels", 0) > 0
  fwd = forward_flops(model, image_size, text_len=text_len if has_text else 0,
                      text_dim=text_dim if has_text else 0)
  return {"arch": type(model).__name__, "image_size": image_hw(image_size),
          "params": count_params(shapes), "params_by_module": groups,
          "flops_forward": fwd, "flops_train": 3.0 * fwd}


def _fmt(n: float) -> str:
  for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.3f}{unit}"
  return f"{n:.0f}"


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Bare *.gin paths -> gin files; everything else stays for cli.parse."""
  files = [a for a in argv if a.endswith(".gin") and "=" not in a]
  return files, [a for a in argv if a not in files]


def main(argv: Sequence[str]) -> int:
  files, rest = split_gin_args(argv)
  opts, bindings = cli.parse(rest, OPTIONS, prog="core.models.summary",
                             description=__doc__ or "")
  files += opts["gin_file"]
  if not files and not bindings:
    raise UserError("give a gin file, e.g. python -m core.models.summary "
                    "gin/models/uvit_imagenet256.gin")
  config_lib.parse(files, bindings)
  size = opts["image_size"] or model_image_size()
  if size is None:
    raise UserError("no image size: bind model.image_size in the gin file or pass image_size=")
  size = parse_image_size(size)
  model = make_model()
  s = summarize(model, size, opts["text_len"], opts["text_dim"])
  h, w = s["image_size"]
  print(f"config: {' '.join(files)} {' '.join(bindings)}".rstrip())
  print(f"arch: {s['arch']}  image: {h}x{w}  patching: {model.patching_type}  "
        f"dtype: {model.dtype}")
  print(f"parameters: {s['params']:,} ({_fmt(s['params'])})")
  for k, v in s["params_by_module"].items():
    print(f"  {k:<24s} {v:>16,}")
  print(f"forward FLOPs / image: {s['flops_forward']:.4e} ({_fmt(s['flops_forward'])}FLOP)")
  print(f"train FLOPs / image (3x): {s['flops_train']:.4e} ({_fmt(s['flops_train'])}FLOP)")
  return 0


if __name__ == "__main__":
  run_main(main)
