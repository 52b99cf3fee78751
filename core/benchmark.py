"""Throughput and memory of a gin model configuration: training or sampling img/s, TFLOP/s, MFU.

    python -m core.benchmark gin_file=gin/models/uvit_benchmark256.gin batch=32 steps=20

``what=train`` times the trainer's own jitted step on device-resident random images (network and
optimizer, not the input pipeline); ``what=sample`` the whole ancestral sampler (appendix A);
``what=aot`` compiles the sharded step from abstract inputs and reads XLA's bytes per device.
MFU = 3 x forward FLOPs (core.models.flops) x img/s / (devices x bf16 peak, core.hardware).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from core import cli
from core import config as config_lib
from core import hardware
from core import profiling
from core import sampling
from core import schedules
from core import sharding as shd
from core import trainer
from core.errors import UserError, run_main
from core.models.factory import make_model, model_image_size
from core.models.flops import forward_flops
from core.models.layers import upsample_impl
from core.models.precast import precast_params
from core.models.summary import parse_image_size, split_gin_args

OPTIONS = [
    cli.Option("gin_file", None, "gin model config(s); bare *.gin paths work too", repeated=True),
    cli.Option("what", "train", "train: training step; sample: the whole sampler; aot: compile the "
               "sharded step from abstract inputs and report memory",
               choices=("train", "sample", "aot")),
    cli.Option("batch", 32, "global batch size (split over devices); sample: images per call", int),
    cli.Option("steps", 20, "timed training steps (after warm-up)", int),
    cli.Option("warmup", 3, "untimed steps after compilation", int),
    cli.Option("calls", 1, "what=sample: timed sampler calls (after one warm-up call)", int),
    cli.Option("sampler_steps", 256, "what=sample: sampler steps per image", int),
    cli.Option("precast", True, "what=sample: cast the Dense/Conv/Embed weights to the compute "
               "dtype once before the sampler's loop (core.models.precast)", cli.parse_bool),
    cli.Option("guidance", 1.5, "what=sample: guidance scale; != 1 batches cond and uncond passes "
               "(class-conditional models)", float),
    cli.Option("devices", None, "what=aot: fake this many CPU devices (before JAX starts)", int),
    cli.Option("dtype", None, "compute dtype override (float32 | bfloat16); parameters stay "
               "float32", str, ("float32", "bfloat16", "float16")),
    cli.Option("remat", None, "override the model's remat switch", cli.parse_bool),
    cli.Option("remat_policy", None, "what the blocks keep for the backward pass "
               "(UViT.remat_policy: its transformer blocks; UNet.remat_policy)", str,
               ("none", "minimal", "full")),
    cli.Option("image_size", None, "image size (int or HxW); default: model.image_size"),
    cli.Option("text_len", 128, "text tokens for text-conditioned models", int),
    cli.Option("text_dim", 4096, "text embedding width", int),
    cli.Option("seed", 0, "random seed", int),
    cli.Option("profile", 0, "after timing, trace this many steps (what=sample: calls) with "
               "jax.profiler and add where the device time goes (core.profiling)", int),
    cli.Option("out", None, "append the JSON result line to this file"),
]


def default_logsnr_fn(image_size: int) -> Callable:
  """The schedule when none is gin-bound: cosine shifted to 64 (the paper's general choice)."""
  return schedules.get_schedule("cosine_shifted", image_d=image_size, noise_d=64)


def _num_classes(model) -> int:
  return int(getattr(model, "num_classes", 0) or 0)


def _text(model, cfg) -> tuple[int, int]:
  text = getattr(model, "text_channels", 0) > 0
  return (cfg.text_len, cfg.text_dim) if text else (0, 0)


def _flops(model, cfg) -> float:
  text_len, text_dim = _text(model, cfg)
  return float(forward_flops(model, cfg.image_size, text_len=text_len, text_dim=text_dim))


def abstract_batch(model, cfg, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The training batch as sharded ShapeDtypeStructs (uint8 images, labels, text embeddings)."""
  s, b, d = shd.batch_sharding(mesh), cfg.batch_size, cfg.image_size
  out = {"image": jax.ShapeDtypeStruct((b, d, d, 3), jnp.uint8, sharding=s)}
  if _num_classes(model):
    out["label"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=s)
  if getattr(model, "text_channels", 0):
    out["text_emb"] = jax.ShapeDtypeStruct((b, cfg.text_len, cfg.text_dim), jnp.float32, sharding=s)
  return out


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _nbytes(x) -> int:
  return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def state_bytes(abstract_state: Any, fsdp_size: int) -> tuple[int, int]:
  """(total bytes, bytes on one device) of a train state under core.sharding's FSDP rule."""
  total = per_device = 0
  for leaf in jax.tree.leaves(abstract_state):
    n = _nbytes(leaf)
    total += n
    spec = shd.param_spec(tuple(leaf.shape), fsdp_size)
    per_device += n // fsdp_size if shd.FSDP in tuple(spec) else n
  return total, per_device


def _memory(compiled) -> dict[str, int] | None:
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k, 0) or 0) for k in keys}
  # Donated state: outputs alias the arguments, so the footprint is args + temps + new outputs.
  out["total_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                        - out["alias_bytes"])
  return out


def device_memory() -> dict[str, int] | None:
  """Peak and current bytes in use on the first device (None where the backend has no stats)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without allocator stats
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use",
                                     "bytes_limit") if k in stats}


def compile_train_step(model, logsnr_fn, cfg, mesh) -> tuple[Any, Any, Any, float]:
  """Lowers and compiles the trainer's sharded step from abstract inputs only.

  Returns (compiled step, abstract state, state shardings, compile seconds).
  """
  nc = _num_classes(model)
  tx = trainer.make_optimizer(cfg)
  abstract, state_sharding = trainer.abstract_state(model, tx, cfg, nc, mesh)
  step = trainer.jit_train_step(model, tx, logsnr_fn, cfg, nc, mesh, state_sharding)
  start = time.perf_counter()
  compiled = step.lower(abstract, abstract_batch(model, cfg, mesh)).compile()
  return compiled, abstract, state_sharding, time.perf_counter() - start


def aot_memory(model, logsnr_fn, cfg, mesh=None) -> dict[str, Any]:
  """Compiles the sharded training step of ``model`` at ``cfg`` (abstract inputs) and reports bytes.

  ``state_*``: parameters + Adam moments + EMA (+ counters) in total and on one device, from the
  sharding rule; ``compiled``: XLA's memory analysis of the step for one device, whose
  ``argument_bytes`` is that device's state shard plus its slice of the batch.
  """
  mesh = mesh or shd.make_mesh()
  shd.check_batch_size(mesh, cfg.batch_size)
  compiled, abstract, _, compile_s = compile_train_step(model, logsnr_fn, cfg, mesh)
  total, per_device = state_bytes(abstract, mesh.shape[shd.FSDP])
  batch = abstract_batch(model, cfg, mesh)
  return {
      "arch": type(model).__name__, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
      "devices": int(mesh.devices.size), "fsdp": int(mesh.shape[shd.FSDP]),
      "params": _count(abstract["params"]),
      "state_bytes_total": total, "state_bytes_per_device": per_device,
      "batch_bytes_per_device": sum(_nbytes(x) for x in batch.values()) // int(mesh.devices.size),
      "compiled": _memory(compiled), "compile_s": round(compile_s, 2),
  }


def train_benchmark(model, logsnr_fn, cfg, *, steps: int = 20, warmup: int = 3,
                    profile: int = 0) -> dict[str, Any]:
  """Times the real training step on random data; img/s, TFLOP/s, MFU, compiled and peak memory.

  ``profile`` > 0: then traces that many steps and adds ``profile`` (core.profiling.profile).
  """
  mesh = shd.make_mesh()
  shd.check_batch_size(mesh, cfg.batch_size)
  nc = _num_classes(model)
  compiled, abstract, state_sharding, compile_s = compile_train_step(model, logsnr_fn, cfg, mesh)
  print(f"compiled the train step in {compile_s:.0f} s", file=sys.stderr, flush=True)
  tx = trainer.make_optimizer(cfg)
  state = jax.jit(functools.partial(trainer.init_state, model, tx, cfg, num_classes=nc),
                  out_shardings=state_sharding)(jax.random.key(cfg.seed))
  rng = np.random.default_rng(cfg.seed)
  d, local = cfg.image_size, cfg.batch_size // jax.process_count()
  batch = {"image": rng.integers(0, 256, (local, d, d, 3), dtype=np.uint8)}
  if nc:
    batch["label"] = rng.integers(0, nc, (local,), dtype=np.int32)
  if getattr(model, "text_channels", 0):
    batch["text_emb"] = rng.standard_normal((local, cfg.text_len, cfg.text_dim), dtype=np.float32)
  batch = shd.global_batch(mesh, batch)
  for _ in range(max(warmup, 1)):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  start = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  steps_per_sec = steps / (time.perf_counter() - start)
  peak_memory = device_memory()
  where = None
  if profile:
    def one_step():
      nonlocal state, m
      state, m = compiled(state, batch)
      return state, m
    where = _profile(compiled, one_step, profile)
  fwd = _flops(model, cfg)
  img_s = cfg.batch_size * steps_per_sec
  return _rates(model, cfg, {
      "what": "train", "params": _count(abstract["params"]), "batch_size": cfg.batch_size,
      "steps": steps, "prng_impl": cfg.prng_impl, "compile_s": round(compile_s, 2),
      "steps_per_sec": steps_per_sec, "img_per_sec": img_s, "flops_per_image_fwd": fwd,
      "flops_per_sec": 3.0 * fwd * img_s, "loss": float(m["loss"]),
      "compiled_memory": _memory(compiled), "device_memory": peak_memory, "profile": where})


def sample_benchmark(model, logsnr_fn, cfg, *, batch: int = 64, num_steps: int = 256,
                     guidance: float = 1.5, calls: int = 1, profile: int = 0,
                     precast: bool = True) -> dict[str, Any]:
  """Times ``calls`` whole jitted sampler calls of ``batch`` images at ``num_steps`` steps.

  With guidance != 1 on a class-conditional model each step is one model call of batch 2B (the
  conditional and unconditional passes together), as in evaluation. Parameters are random: speed
  does not depend on their values. ``precast``: weights cast to the compute dtype once per call,
  before the loop (core.models.precast; bit-identical samples), as eval/sample.py does.
  """
  mesh = shd.make_mesh()
  shd.check_batch_size(mesh, batch)
  nc = _num_classes(model)
  tx = trainer.make_optimizer(cfg)
  init = lambda rng: trainer.init_state(model, tx, cfg, rng, num_classes=nc)["ema_params"]
  abstract = {"params": jax.eval_shape(init, jax.random.key(cfg.seed))}
  params = jax.jit(init,
                   out_shardings=shd.tree_shardings(mesh,
                                                    abstract["params"]))(jax.random.key(cfg.seed))
  text_len, text_dim = _text(model, cfg)
  guided = bool(nc or text_len) and guidance != 1.0
  shape = (batch, cfg.image_size, cfg.image_size, 3)

  def run(params, rng):
    if precast:
      params = precast_params(model, params, shape[1:])
    label_rng, text_rng, sample_rng = jax.random.split(rng, 3)
    text = (jax.random.normal(text_rng, (batch, text_len, text_dim)) if text_len else None)

    def model_fn(z, logsnr, cond):
      label, text_emb = cond
      return model.apply({"params": params}, z, logsnr, label=label, text_emb=text_emb, train=False)

    labels = jax.random.randint(label_rng, (batch,), 0, nc) if nc else None
    cond = (labels, text)
    if guided:
      null = (None if labels is None else jnp.full_like(labels, nc),
              None if text is None else jnp.zeros_like(text))
      v_fn = sampling.guided_v_fn(model_fn, cond, null, guidance)
    else:
      v_fn = lambda z, logsnr: model_fn(z, logsnr, cond)
    x = sampling.ddpm_sample(v_fn, sample_rng, shape, logsnr_fn=logsnr_fn, num_steps=num_steps)
    return sampling.to_uint8(x)

  fn = jax.jit(run, out_shardings=shd.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = fn.lower(params, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  print(f"compiled the sampler in {compile_s:.0f} s", file=sys.stderr, flush=True)
  jax.block_until_ready(compiled(params, jax.random.key(1)))  # warm-up
  start = time.perf_counter()
  for i in range(calls):
    out = compiled(params, jax.random.key(2 + i))
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  peak_memory = device_memory()
  where = (_profile(compiled, lambda: compiled(params, jax.random.key(1)), profile)
           if profile else None)
  img_s = calls * batch / elapsed
  fwd = _flops(model, cfg)
  passes = (num_steps + 1) * (2 if guided else 1)  # fori_loop steps + the final x prediction
  return _rates(model, cfg, {
      "what": "sample", "params": _count(abstract["params"]), "batch_size": batch,
      "precast": precast,
      "sampler_steps": num_steps, "guidance": guidance,
      "guided_batch": 2 * batch if guided else batch, "calls": calls,
      "compile_s": round(compile_s, 2),
      "seconds_per_call": elapsed / calls, "img_per_sec": img_s,
      "ms_per_forward": 1e3 * elapsed / calls / (num_steps + 1),
      # images through the network per second, guided passes counted (2 per image and step)
      "image_forwards_per_sec": passes * img_s,
      "flops_per_image_fwd": fwd, "flops_per_sec": passes * fwd * img_s,
      "hours_for_50k": 50_000 / img_s / 3600.0,
      "compiled_memory": _memory(compiled), "device_memory": peak_memory, "profile": where})


def _profile(compiled, run: Callable[[], Any], steps: int) -> dict[str, Any]:
  """core.profiling.profile, whose failure (no profiler plugin, say) is recorded, not raised:
  the timings measured before it stand."""
  try:
    return profiling.profile(compiled, run, steps)
  except Exception as e:  # noqa: BLE001  (any profiler failure; the message is kept)
    print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return {"error": f"{type(e).__name__}: {e}"[:500]}


def _rates(model, cfg, res: dict[str, Any]) -> dict[str, Any]:
  devices = jax.devices()
  peak = hardware.peak_flops_per_second()
  res.update({
      "arch": type(model).__name__, "image_size": cfg.image_size, "dtype": str(model.dtype),
      "remat": bool(getattr(model, "remat", False)),
      "remat_policy": getattr(model, "remat_policy", None),
      "attention_impl": model.attention_impl, "upsample_impl": upsample_impl(model.upsample_impl),
      "device": devices[0].device_kind,
      "num_devices": len(devices), "tflops_per_sec": res["flops_per_sec"] / 1e12,
      "mfu": (res["flops_per_sec"] / (peak * len(devices))) if peak else None, "time": time.time()})
  return res


def _build(opts: dict[str, Any], files: list[str], bindings: list[str]):
  if opts["dtype"]:
    bindings = [*bindings, f"UNet.dtype = '{opts['dtype']}'", f"UViT.dtype = '{opts['dtype']}'"]
  if opts["remat"] is not None:
    bindings = [*bindings, f"UNet.remat = {opts['remat']}", f"UViT.remat = {opts['remat']}"]
  if opts["remat_policy"]:
    bindings = [*bindings, f"UNet.remat_policy = '{opts['remat_policy']}'",
                f"UViT.remat_policy = '{opts['remat_policy']}'"]
  config_lib.parse(files, bindings)
  size = opts["image_size"] or model_image_size()
  if size is None:
    raise UserError("no image size: bind model.image_size in the gin file or pass image_size=")
  size = parse_image_size(size)
  if isinstance(size, (tuple, list)):
    if size[0] != size[1]:
      raise UserError(f"image_size={size[0]}x{size[1]}: the trainer trains square images; give one "
                      f"size")
    size = size[0]
  model = make_model(image_size=size)
  try:
    logsnr_fn = gin.query_parameter("train.logsnr_fn").scoped_configurable_fn()
  except ValueError:
    logsnr_fn = default_logsnr_fn(size)
  cfg = dataclasses.replace(trainer.TrainConfig(), image_size=size, batch_size=opts["batch"],
                            seed=opts["seed"],
                            text_len=opts["text_len"], text_dim=opts["text_dim"])
  return model, logsnr_fn, cfg


def summary_line(res: dict[str, Any]) -> str:
  """One human-readable line for a result dict."""
  if res.get("what") == "aot":
    c = res["compiled"] or {}
    return (f"{res['arch']} {res['image_size']}x{res['image_size']} batch {res['batch_size']} on "
            f"{res['devices']} devices: state {res['state_bytes_total'] / 1e9:.2f} GB, per device "
            f"{res['state_bytes_per_device'] / 1e9:.3f} GB, compiled step "
            f"{c.get('total_bytes', 0) / 1e9:.2f} "
            f"GB/device (compile {res['compile_s']:.0f} s)")
  mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
  return (f"{res['what']}: {res['arch']} {res['image_size']}x{res['image_size']} batch "
          f"{res['batch_size']} "
          f"{res['dtype']} on {res['num_devices']}x {res['device']}: {res['img_per_sec']:.2f} "
          f"img/s, "
          f"{res['tflops_per_sec']:.1f} TFLOP/s, MFU {mfu} (compile {res['compile_s']:.0f} s)")


def main(argv: Sequence[str]) -> int:
  files, rest = split_gin_args(argv)
  opts, bindings = cli.parse(rest, OPTIONS, prog="core.benchmark", description=__doc__ or "")
  files += opts["gin_file"]
  if not files:
    raise UserError("give a model config: gin_file=gin/models/uvit_benchmark256.gin")
  if opts["devices"]:
    if opts["what"] != "aot":
      raise UserError("devices= fakes CPU devices for what=aot only; drop it or set what=aot")
    jax.config.update("jax_num_cpu_devices", opts["devices"])
    jax.config.update("jax_platforms", "cpu")
  model, logsnr_fn, cfg = _build(opts, files, bindings)
  if opts["what"] == "train":
    res = train_benchmark(model, logsnr_fn, cfg, steps=opts["steps"], warmup=opts["warmup"],
                          profile=opts["profile"])
  elif opts["what"] == "sample":
    res = sample_benchmark(model, logsnr_fn, cfg, batch=opts["batch"],
                           num_steps=opts["sampler_steps"],
                           guidance=opts["guidance"], calls=opts["calls"],
                           profile=opts["profile"], precast=opts["precast"])
  else:
    res = {"what": "aot", **aot_memory(model, logsnr_fn, cfg, shd.make_mesh(fsdp=-1)),
           "time": time.time()}
  print(summary_line(res), file=sys.stderr)
  line = json.dumps(res)
  print(line)
  if opts["out"]:
    with open(opts["out"], "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  run_main(main)
