"""Training-throughput benchmark of a gin model configuration: img/s, TFLOP/s and MFU.

    python -m core.benchmark gin_file=gin/models/uvit_benchmark256.gin batch=32 steps=20
    python -m core.benchmark gin/models/unet_imagenet128.gin batch=16 dtype=bfloat16

Times a full training step — forward, v-MSE loss (appendix B.2's mean_loss_type='v_mse'),
backward, global-norm clipping and Adam (B.1/B.2 hyper-parameters), jitted with the train state's
buffers donated — on synthetic data already on the device, so the number measures the network and
optimizer, not the input pipeline. The step is self-contained (its own cosine-shifted logSNR and
v target, Sec. 3.1 / appendix A) so it runs before the rest of the harness exists. The batch is
split over all local devices (data parallel); MFU = achieved model FLOP/s (3 x forward FLOPs from
core.models.flops) / (devices x dense bf16 peak of the device; see PEAK_FLOPS). On CPU MFU is n/a.
Prints one JSON line; ``out=FILE`` appends it to FILE.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import cli
from core.errors import UserError, run_main
from core.models.factory import make_model, model_image_size
from core.models.flops import forward_flops
from core.models.summary import load_gin, parse_image_size, split_gin_args
from core.models.validate import image_hw

# Dense bf16 peak FLOP/s per device (vendor data sheets, no sparsity).
PEAK_FLOPS = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
)

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


def peak_flops(device_kind: str, platform: str = "gpu") -> float | None:
  """Dense bf16 peak FLOP/s of one device (jax Device.device_kind), or None (CPU / unknown)."""
  if platform == "cpu":
    return None
  kind = device_kind.lower()
  for key, value in PEAK_FLOPS:
    if key in kind:
      return value
  return None


def _logsnr_cosine_shifted(t: jax.Array, image_d: int, noise_d: int = 64) -> jax.Array:
  """Clipped cosine logSNR in [-15, 15], shifted by 2 log(noise_d / image_d) (Sec. 3.1)."""
  lo, hi = -15.0, 15.0
  t_min = math.atan(math.exp(-0.5 * hi))
  t_max = math.atan(math.exp(-0.5 * lo))
  logsnr = -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))
  return logsnr + 2.0 * math.log(noise_d / image_d)


def make_train_step(model: Any, tx: optax.GradientTransformation, image_d: int):
  """(params, opt_state, batch, rng) -> (params, opt_state, loss); v-MSE, Adam."""

  def loss_fn(params, batch, rng):
    x = batch["image"]
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    t = jax.random.uniform(k_t, (x.shape[0],))
    logsnr = _logsnr_cosine_shifted(t, image_d)
    alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None, None, None]
    eps = jax.random.normal(k_eps, x.shape)
    z = alpha * x + sigma * eps
    v = alpha * eps - sigma * x
    v_pred = model.apply({"params": params}, z, logsnr, label=batch.get("label"),
                         text_emb=batch.get("text_emb"), train=True, rngs={"dropout": k_drop})
    return jnp.mean(jnp.square(v_pred - v))

  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def benchmark(model: Any, image_size: Any, batch: int = 32, steps: int = 20, warmup: int = 3,
              text_len: int = 128, text_dim: int = 4096, seed: int = 0) -> dict[str, Any]:
  """Runs the timed loop and returns the result dict (see module docstring)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  h, w = image_hw(image_size)
  devices = jax.local_devices()
  if batch % len(devices):
    raise UserError(f"batch={batch} is not divisible by the {len(devices)} local devices")
  mesh = Mesh(np.array(devices), ("data",))
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  rng = jax.random.key(seed)
  k_init, k_img, k_lab, k_txt, k_step = jax.random.split(rng, 5)
  batch_data = {"image": jax.random.uniform(k_img, (batch, h, w, 3), minval=-1.0, maxval=1.0)}
  if model.num_classes > 0:
    batch_data["label"] = jax.random.randint(k_lab, (batch,), 0, model.num_classes)
  text = getattr(model, "text_channels", 0) > 0
  if text:
    batch_data["text_emb"] = jax.random.normal(k_txt, (batch, text_len, text_dim))
  batch_data = jax.device_put(batch_data, data_sharding)

  init_args = {k: v[:1] for k, v in batch_data.items() if k != "image"}
  init = jax.jit(lambda r: model.init(r, batch_data["image"][:1], jnp.zeros((1,)),
                                      **init_args)["params"], out_shardings=replicated)
  params = init(k_init)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adam(1e-4, b1=0.9, b2=0.99, eps=1e-12))
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step = jax.jit(make_train_step(model, tx, min(h, w)), donate_argnums=(0, 1))

  t0 = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, batch_data, k_step)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    params, opt_state, loss = step(params, opt_state, batch_data, jax.random.fold_in(k_step, i))
  loss.block_until_ready()
  t0 = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, batch_data,
                                   jax.random.fold_in(k_step, 1000 + i))
  loss.block_until_ready()
  elapsed = time.perf_counter() - t0

  fwd = forward_flops(model, (h, w), text_len=text_len if text else 0,
                      text_dim=text_dim if text else 0)
  img_s = batch * steps / elapsed
  flops_s = 3.0 * fwd * img_s
  peak = peak_flops(devices[0].device_kind, devices[0].platform)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  return {
      "arch": type(model).__name__, "image_size": [h, w], "dtype": str(model.dtype),
      "remat": bool(model.remat), "batch_size": batch, "steps": steps,
      "device": devices[0].device_kind, "num_devices": len(devices), "params": n_params,
      "compile_s": round(compile_s, 2), "steps_per_sec": steps / elapsed, "img_per_sec": img_s,
      "flops_per_image_fwd": fwd, "tflops_per_sec": flops_s / 1e12,
      "mfu": (flops_s / (peak * len(devices))) if peak else None,
      "loss": float(loss), "time": time.time(),
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
  load_gin(files, bindings)
  size = opts["image_size"] or model_image_size()
  if size is None:
    raise UserError("no image size: bind model.image_size in the gin file or pass image_size=")
  model = make_model(image_size=parse_image_size(size))
  res = benchmark(model, parse_image_size(size), opts["batch"], opts["steps"], opts["warmup"],
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
