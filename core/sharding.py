"""Device mesh and FSDP sharding rules for parameters, optimizer state, EMA and batches.

The paper trains its largest models with weights sharded over devices ("we shard the weights", as
its U-ViT runs on 128 TPUv4). We use one 2-D mesh with axes ``('data', 'fsdp')``:

- the batch is split over both axes (every device sees different examples);
- every parameter (and with it its gradient, Adam moments and EMA copy) is split along its largest
  dimension that the ``fsdp`` axis size divides; parameters too small to be worth it stay
  replicated.

XLA inserts the all-gathers and reduce-scatters. The same code runs on 1 CPU, N host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one GPU, or a multi-host TPU slice (after
``jax.distributed.initialize()``).
"""
from __future__ import annotations

import math
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.errors import UserError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


@gin.configurable("mesh")
def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; ``fsdp`` devices share each parameter (-1 = all)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if fsdp == -1 else fsdp
  if fsdp < 1 or n % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} must divide the number of devices ({n}); use 1, -1 (all) or "
                    f"a divisor")
  arr = np.asarray(devices).reshape(n // fsdp, fsdp)
  return Mesh(arr, (DATA, FSDP))


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 12) -> P:
  """Shards the largest dimension divisible by the fsdp size; small arrays stay replicated."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) following :func:`param_spec`."""
  fsdp_size = mesh.shape[FSDP]

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, param_spec(shape, fsdp_size))

  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k,
          v in local_batch.items()}


def check_batch_size(mesh: Mesh, global_batch_size: int) -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise UserError(f"batch_size={global_batch_size} must be divisible by the number of devices "
                    f"({n}); set Train.batch_size to a multiple of {n}")
  if global_batch_size % jax.process_count():
    raise UserError(f"batch_size={global_batch_size} must be divisible by the number of processes "
                    f"({jax.process_count()})")
