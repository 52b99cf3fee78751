"""``mode=plan``: what each job is, what it costs and whether it fits, before anything runs.

On the accelerator a launch would use, per job: bytes per device (FSDP-sharded train state plus
the activations of one forward pass, a lower bound, so a refused job cannot fit), the bytes of
training data each host caches (from data_dir's meta.json, else ImageNet estimated from measured
bytes per image: docs/data.md) and the cost of training (measured img/s, else an assumed MFU) and
evaluation. ``aot=true`` also compiles the
sharded step on faked CPU devices and reports XLA's per-device memory.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from core import benchmark
from core import config as config_lib
from core import hardware
from core import sharding as shd
from core import trainer as train_lib
from core.data import records
from core.errors import UserError
from core.io import jsonl, rundir, storage
from experiments import jobs, launchers, registry, tpu

# Without a measurement, cost is estimated at this utilisation of the accelerator's dense bf16 peak.
ASSUMED_MFU = 0.4
# Memory the runtime and XLA keep for themselves (and fragmentation): plan against 90% of HBM.
USABLE_MEMORY = 0.9
# Without a data set to read: ImageNet's training images at the record bytes per image measured on
# real photographs (benchmarks/data_decode.py; docs/data.md): the smaller of a PNG of the crop and
# ImageNet's mean source JPEG.
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_BYTES_PER_IMAGE = {64: 8_250, 128: 29_717, 256: 109_182, 512: 115_440}
TPU_CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a job would run: accelerator kind, chips and JAX devices."""
  accelerator: hardware.Accelerator
  label: str        # 'TPU v4-256' or '8x H100'
  chips: int
  devices: int
  is_tpu: bool

  @property
  def unit(self) -> str:
    return "TPU chip-hours" if self.is_tpu else f"{self.accelerator.name}-hours"


def target(opts: dict[str, Any], arch: str, default_tpu: dict[str, str]) -> Target:
  """The accelerator a launch with these options uses (see the module docstring)."""
  if opts.get("launcher") == "tpu":
    tpu_type = opts.get("tpu_type") or default_tpu[arch]
    try:
      acc, chips = hardware.parse_tpu_type(tpu_type)
    except ValueError as e:
      raise UserError(str(e)) from None
    return Target(acc, f"TPU {tpu_type}", chips, hardware.devices_in_slice(acc, chips), True)
  name = opts.get("accelerator") or "H100"
  acc = hardware.GPUS.get(name) or hardware.GPUS.get(name.upper())
  if acc is None:
    raise UserError(f"accelerator={name!r} is unknown; use one of {', '.join(hardware.GPUS)} "
                    f"(or launcher=tpu tpu_type=...)")
  if opts.get("launcher") == "slurm":
    devices = int(opts.get("nodes") or 1) * int(opts.get("gpus_per_node") or 8)
  else:
    devices = int(opts.get("devices") or 1)
  return Target(acc, f"{devices}x {acc.name}", devices, devices, False)


def hosts_and_processes(tgt: Target, opts: dict[str, Any]) -> tuple[int, int]:
  """(hosts, JAX processes) of a launch: a TPU slice's VMs (4 chips each) with one process each,
  SLURM's nodes with one process per GPU, or this machine with one."""
  if tgt.is_tpu:
    hosts = max(1, tgt.chips // TPU_CHIPS_PER_HOST)
    return hosts, hosts
  if opts.get("launcher") == "slurm":
    nodes = int(opts.get("nodes") or 1)
    return nodes, nodes * int(opts.get("gpus_per_node") or 8)
  return 1, 1


def data_per_host(opts: dict[str, Any], resolution: int, tgt: Target) -> dict[str, Any]:
  """{'hosts', 'bytes_per_host' (the most any host caches of the train split), 'basis'}."""
  hosts, processes = hosts_and_processes(tgt, opts)
  data_dir = (opts.get("data_dir") or "").replace("{res}", str(resolution))
  if data_dir:
    try:
      meta = records.read_meta(data_dir)
      per = records.bytes_per_host(meta, "train", hosts, processes, data_dir=data_dir)
    except UserError:  # not prepared yet, or unreadable from here: estimate
      per = None
    if per is not None:
      return {"hosts": hosts, "bytes_per_host": max(per), "cached": data_dir.startswith("gs://"),
              "basis": f"shard sizes of {data_dir}"}
  res = min(IMAGENET_BYTES_PER_IMAGE, key=lambda r: abs(r - resolution))
  per_image = IMAGENET_BYTES_PER_IMAGE[res] * (resolution / res) ** 2
  return {"hosts": hosts, "bytes_per_host": per_image * IMAGENET_TRAIN_IMAGES / hosts,
          "cached": not data_dir or data_dir.startswith("gs://"),
          "basis": f"ImageNet estimate, {per_image / 1e3:,.0f} kB per image"}


def _measured_img_per_sec(job, workdir: str) -> float | None:
  try:
    rows = jsonl.read(rundir.throughput_path(workdir))
  except UserError:  # e.g. gs:// without credentials here: plan without the measurement
    return None
  keys = {(e.table, e.group, e.row) for e in job.entries}
  best = None
  for r in rows:
    if (str(r.get("table")), r.get("group"), r.get("row")) in keys:
      best = r.get("img_per_sec")
  return best


MATMUL_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)


def activation_bytes_per_image(model, cfg) -> int:
  """Bytes of every conv/dense output of one training forward pass of one image, abstractly.

  A backward pass keeps (at least) these, in the compute dtype, unless it rematerialises them: a
  lower bound of activation memory, so a job refused on it cannot fit. Scanned blocks are unrolled
  for the count (the scan body is traced once).
  """
  if getattr(model, "scan", False):
    model = model.clone(scan=False)
  text = getattr(model, "text_channels", 0) > 0
  total = [0]

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, MATMUL_LAYERS):
      total[0] += sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(out))
    return out

  def forward(rng):
    z = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    label = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", 0) else None
    text_emb = jnp.zeros((1, cfg.text_len, cfg.text_dim)) if text else None
    with nn.intercept_methods(count):
      return model.init({"params": rng, "dropout": rng}, z, jnp.zeros((1,)), label=label,
                        text_emb=text_emb,
                        train=True)

  jax.eval_shape(forward, jax.random.key(0))
  return int(total[0])


def memory(model, cfg, devices: int) -> dict[str, Any]:
  """Per-device bytes of the state (FSDP over mesh.fsdp of ``devices``) and of activations."""
  fsdp = config_lib.query("mesh.fsdp", 1)
  fsdp = devices if fsdp == -1 else min(int(fsdp), devices)
  nc = int(getattr(model, "num_classes", 0) or 0)
  abstract = jax.eval_shape(functools.partial(train_lib.init_state, model,
                                              train_lib.make_optimizer(cfg), cfg,
                                              num_classes=nc), jax.random.key(0))
  total, per_device = benchmark.state_bytes(abstract, fsdp)
  # Gradient accumulation keeps a sum of the micro-batches' gradients beside the state.
  accum = benchmark.state_bytes(abstract["params"], fsdp)[1] if cfg.grad_accum > 1 else 0
  per_image = activation_bytes_per_image(model, cfg)
  images = math.ceil(cfg.batch_size // cfg.grad_accum / devices)  # one micro-batch at a time
  return {"params": int(sum(a.size for a in jax.tree.leaves(abstract["params"]))), "fsdp": fsdp,
          "state_bytes_total": total, "state_bytes_per_device": per_device,
          "grad_accum_bytes_per_device": accum,
          "activation_bytes_per_image": per_image, "images_per_device": images,
          "bytes_per_device": per_device + accum + images * per_image}


def describe(job, scale: str, workdir: str, train_args: Sequence[str], tgt: Target, *,
             sampler_steps: int, num_samples: int, opts: dict[str, Any] | None = None
             ) -> dict[str, Any]:
  """Rows, run name, resolution, parameters, FLOPs, bytes per device and data bytes per host, fit,
  train and eval cost."""
  opts = opts or {}
  model, cfg, _ = jobs.build(train_args)
  fwd = train_lib.forward_flops(model, cfg)
  mem = memory(model, cfg, tgt.devices)
  limit = int(tgt.accelerator.memory_per_device * USABLE_MEMORY)
  rate = ASSUMED_MFU * tgt.accelerator.peak_per_device * tgt.devices  # model FLOP/s of the target
  measured = _measured_img_per_sec(job, workdir)
  train_s = (cfg.num_steps * cfg.batch_size / (measured * tgt.devices) if measured else
             cfg.num_steps * cfg.batch_size * 3 * fwd / rate)
  conditional = bool(getattr(model, "num_classes", 0) or getattr(model, "text_channels", 0))
  passes = sum((sampler_steps + 1) * (2 if conditional and w != 1 else 1) for w in job.guidances)
  eval_s = num_samples * passes * fwd / rate
  hours = lambda s: s / 3600.0 * tgt.chips
  return {
      "rows": [f"T{e.table} {e.group} / {e.row}" for e in job.entries],
      "run_name": job.name, "scale": scale, "resolution": cfg.image_size, "params": mem["params"],
      "gflops_per_image": fwd / 1e9, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
      "steps": cfg.num_steps,
      "target": tgt.label, "devices": tgt.devices, "chips": tgt.chips, "cost_unit": tgt.unit,
      "memory": mem, "bytes_per_device": mem["bytes_per_device"], "device_memory_bytes": limit,
      "data": data_per_host(opts, cfg.image_size, tgt),
      "fits": mem["bytes_per_device"] <= limit,
      "train_hours": train_s / 3600.0, "train_cost": hours(train_s),
      "eval_samples": num_samples, "eval_sampler_steps": sampler_steps,
      "eval_guidances": job.guidances,
      "eval_hours": eval_s / 3600.0, "eval_cost": hours(eval_s),
      "estimated_hours": (train_s + eval_s) / 3600.0, "total_cost": hours(train_s + eval_s),
      "estimate_basis": (f"measured {measured:.1f} img/s per device" if measured else
                         f"assumed {ASSUMED_MFU:.0%} MFU of {tgt.accelerator.name} bf16 peak"),
  }


def aot(train_args: Sequence[str], batch_per_device: int = 1) -> dict[str, Any]:
  """Compiles the job's sharded training step over all (faked) devices at ``batch_per_device``."""
  model, cfg, logsnr_fn = jobs.build(train_args)
  mesh = shd.make_mesh(fsdp=-1)
  cfg = dataclasses.replace(cfg, batch_size=batch_per_device * mesh.devices.size)
  return benchmark.aot_memory(model, logsnr_fn, cfg, mesh)


def plan_jobs(job_list: list[registry.Job], scale: str, workdir: str,
              opts: dict[str, Any]) -> list[dict[str, Any]]:
  """:func:`describe` of each job on the accelerator its launcher would use."""
  out = []
  for job in job_list:
    run_dir = storage.join(workdir, job.name)
    args = jobs.job_args(job, scale, run_dir, opts["data_dir"])
    if opts["launcher"] in ("tpu", "slurm"):
      args = [*args, launchers.SHARD_ALL]
    n = int(dict(a.split("=", 1) for a in jobs.eval_args(job, scale, run_dir, opts))["num_samples"])
    tgt = target(opts, job.arch, tpu.DEFAULT_TPU)
    p = describe(job, scale, workdir, args, tgt, sampler_steps=jobs.sampler_steps(job, scale),
                 num_samples=n, opts=opts)
    if opts["aot"]:
      p["aot"] = aot(args)
    out.append(p)
  return out


def check_fits(planned: list[dict[str, Any]]) -> None:
  """Refuses, before anything launches, a job whose bytes per device exceed the device's memory."""
  for p in planned:
    if not p["fits"]:
      m = p["memory"]
      raise UserError(
          f"{p['run_name']} does not fit on {p['target']}: about "
          f"{p['bytes_per_device'] / 2 ** 30:,.1f} GiB per "
          f"device (state {m['state_bytes_per_device'] / 2 ** 30:,.1f} GiB over fsdp={m['fsdp']}, "
          f"activations of "
          f"{m['images_per_device']} images) > {p['device_memory_bytes'] / 2 ** 30:,.1f} GiB "
          f"usable; use more chips (tpu_type=, nodes=) or grad_accum= so that fewer images land "
          f"on each device at once")


def format_text(planned: list[dict[str, Any]]) -> str:
  lines = []
  gib = lambda b: f"{b / 2 ** 30:,.2f} GiB"
  for p in planned:
    m = p["memory"]
    lines.append(f"{p['run_name']}  ({p['scale']}, {p['resolution']}x{p['resolution']}, on "
                 f"{p['target']})")
    for r in p["rows"]:
      lines.append(f"    {r}")
    accum = p.get("grad_accum", 1)
    batch = (f"{p['batch_size']} ({accum} micro-batches of {p['batch_size'] // accum})"
             if accum > 1 else f"{p['batch_size']}")
    lines.append(f"    params {p['params'] / 1e6:,.1f}M  forward {p['gflops_per_image']:,.3g} "
                 f"GFLOP/image  batch {batch}  steps {p['steps']:,}")
    summed = m.get("grad_accum_bytes_per_device")
    lines.append(f"    per device: {gib(p['bytes_per_device'])} = state "
                 f"{gib(m['state_bytes_per_device'])} "
                 f"(of {gib(m['state_bytes_total'])}, fsdp={m['fsdp']}) + "
                 + (f"summed gradients {gib(summed)} + " if summed else "") + "activations "
                 f"{m['images_per_device']} x {gib(m['activation_bytes_per_image'])}; usable "
                 f"{gib(p['device_memory_bytes'])}: {'fits' if p['fits'] else 'DOES NOT FIT'}")
    d = p["data"]
    lines.append(f"    data per host: {gib(d['bytes_per_host'])} of train shards on each of "
                 f"{d['hosts']} host(s) " + ("cached from gs://" if d["cached"] else
                                            "read in place (no copy)") + f" ({d['basis']})")
    if "aot" in p:
      c = p["aot"]["compiled"] or {}
      lines.append(f"    compiled step ({p['aot']['devices']} faked devices, "
                   f"{p['aot']['batch_size']} images): "
                   f"{gib(c.get('total_bytes', 0))} per device, arguments "
                   f"{gib(c.get('argument_bytes', 0))}")
    lines.append(f"    ~{p['train_cost']:,.4g} {p['cost_unit']} training + ~{p['eval_cost']:,.3g} "
                 f"evaluation "
                 f"({p['eval_samples']:,} samples x {p['eval_sampler_steps']} steps x guidance "
                 f"{', '.join(f'{w:g}' for w in p['eval_guidances'])}); {p['estimate_basis']}")
  total = sum(p["total_cost"] for p in planned)
  units = sorted({p["cost_unit"] for p in planned})
  lines.append(f"{len(planned)} job(s), about {total:,.1f} {' / '.join(units)} in total")
  return "\n".join(lines)
