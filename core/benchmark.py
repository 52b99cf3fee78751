"""Training-throughput benchmark of a gin model configuration: img/s, TFLOP/s and MFU.

    python -m core.benchmark gin_file=gin/models/uvit_benchmark256.gin batch=32 steps=20
    python -m core.benchmark gin/models/unet_imagenet128.gin batch=16 dtype=bfloat16

Times the trainer's own training step (core.trainer.train_step: forward, the gin-configured loss,
backward, global-norm clipping, Adam, EMA, the non-finite guard), jitted with the state's buffers
donated and sharded over the ('data', 'fsdp') mesh, on random images already on the device, so the
number measures the network and optimizer, not the input pipeline. MFU = achieved model FLOP/s
(3 x forward FLOPs from core.models.flops) / (devices x dense bf16 peak, core.hardware). On a CPU
MFU is n/a. Prints one JSON line; ``out=FILE`` appends it to FILE.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

import jax

from core import cli
from core import config as config_lib
from core import hardware
from core.errors import UserError, run_main
from core.models.factory import make_model, model_image_size
from core.models.flops import forward_flops
from core.models.summary import count_params, param_shapes, parse_image_size, split_gin_args

OPTIONS = [
    cli.Option("gin_file", None, "gin model config(s); bare *.gin paths work too", repeated=True),
    cli.Option("batch", 32, "global batch size (split over local devices)", int),
    cli.Option("steps", 20, "timed steps (after warm-up)", int),
    cli.Option("warmup", 3, "untimed steps after compilation", int),
    cli.Option("dtype", None, "compute dtype override (float32 | bfloat16); parameters stay "
               "float32", str, ("float32", "bfloat16", "float16")),
    cli.Option("remat", None, "override the model's remat switch", cli.parse_bool),
    cli.Option("image_size", None, "image size (int or HxW); default: model.image_size"),
    cli.Option("text_len", 128, "text tokens for text-conditioned models", int),
    cli.Option("text_dim", 4096, "text embedding width", int),
    cli.Option("seed", 0, "random seed", int),
    cli.Option("out", None, "append the JSON result line to this file"),
]


def benchmark(model: Any, image_size: int, batch: int = 32, steps: int = 20, warmup: int = 3,
              text_len: int = 128, text_dim: int = 4096, seed: int = 0) -> dict[str, Any]:
  """Times core.trainer's real training step and returns the result dict (see module docstring)."""
  from core import schedules, trainer  # pylint: disable=import-outside-toplevel
  cfg = trainer.TrainConfig(image_size=image_size, batch_size=batch, seed=seed, text_len=text_len,
                            text_dim=text_dim)
  logsnr_fn = schedules.get_schedule("cosine_shifted", image_d=image_size, noise_d=64)
  timing = trainer.time_train_steps(model, logsnr_fn, cfg, steps=steps, warmup=warmup)
  text = getattr(model, "text_channels", 0) > 0
  fwd = forward_flops(model, image_size, text_len=text_len if text else 0, text_dim=text_dim if text else 0)
  img_s = batch * timing["steps_per_sec"]
  flops_s = 3.0 * fwd * img_s
  peak = hardware.peak_flops_per_second()
  n_params = count_params(param_shapes(model, image_size, text_len=text_len, text_dim=text_dim))
  devices = jax.devices()
  return {
      "arch": type(model).__name__, "image_size": [image_size, image_size], "dtype": str(model.dtype),
      "remat": bool(model.remat), "batch_size": batch, "steps": steps,
      "device": devices[0].device_kind, "num_devices": len(devices), "params": n_params,
      "compile_s": round(timing["compile_s"], 2), "steps_per_sec": timing["steps_per_sec"], "img_per_sec": img_s,
      "flops_per_image_fwd": fwd, "tflops_per_sec": flops_s / 1e12,
      "mfu": (flops_s / (peak * len(devices))) if peak else None,
      "loss": timing["loss"], "time": time.time(),
  }


def main(argv: Sequence[str]) -> int:
  files, rest = split_gin_args(argv)
  opts, bindings = cli.parse(rest, OPTIONS, prog="core.benchmark", description=__doc__ or "")
  files += opts["gin_file"]
  if not files:
    raise UserError("give a model config: gin_file=gin/models/uvit_benchmark256.gin")
  if opts["dtype"]:
    bindings = [*bindings, f"UNet.dtype = '{opts['dtype']}'", f"UViT.dtype = '{opts['dtype']}'"]
  if opts["remat"] is not None:
    bindings = [*bindings, f"UNet.remat = {opts['remat']}", f"UViT.remat = {opts['remat']}"]
  config_lib.parse(files, bindings)
  size = opts["image_size"] or model_image_size()
  if size is None:
    raise UserError("no image size: bind model.image_size in the gin file or pass image_size=")
  size = parse_image_size(size)
  if isinstance(size, (tuple, list)):
    if size[0] != size[1]:
      raise UserError(f"image_size={size[0]}x{size[1]}: the trainer trains square images; give one size")
    size = size[0]
  model = make_model(image_size=size)
  res = benchmark(model, size, opts["batch"], opts["steps"], opts["warmup"],
                  opts["text_len"], opts["text_dim"], opts["seed"])
  mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
  print(f"{res['arch']} {res['image_size'][0]}x{res['image_size'][1]} batch {res['batch_size']} "
        f"{res['dtype']} on {res['num_devices']}x {res['device']}: "
        f"{res['img_per_sec']:.1f} img/s, {res['tflops_per_sec']:.1f} TFLOP/s, MFU {mfu} "
        f"(compile {res['compile_s']:.0f} s)", file=sys.stderr)
  line = json.dumps(res)
  print(line)
  if opts["out"]:
    with open(opts["out"], "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  run_main(main, sys.argv[1:])
