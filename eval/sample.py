"""Samples from a run's EMA parameters with the DDPM sampler (appendix A), batched over all devices.

Given a run directory, the model and schedule are rebuilt from its operative ``config.gin`` and the
EMA parameters of a checkpoint are restored. Samples are deterministic given the seed: batch ``i``
uses ``fold_in(seed, i)`` for its noise and its class labels, whatever the batch size per device.
Class-conditional models draw labels uniformly and can be guided: a guidance scale ``w`` (reported
as ``1 + eta``, Table 9) combines the conditional and unconditional predictions. Samples are
quantised to uint8 exactly as saved images would be, before any metric sees them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import sampling
from core import sharding as shd
from core import trainer as train_lib
from core.errors import UserError
from core.io import rundir
from core.progress import Progress


@dataclasses.dataclass
class LoadedRun:
  """A run's model, schedule and training settings, as its config.gin describes them."""
  run_dir: str
  model: Any
  logsnr_fn: Callable
  cfg: Any
  num_classes: int


def load_run(run_dir: str) -> LoadedRun:
  """Rebuilds model and schedule from ``<run_dir>/config.gin``."""
  # The run's configuration stays bound: the sampler's own gin settings come from it too.
  config_lib.parse_text(rundir.read_config(run_dir), rundir.config_path(run_dir))
  model = gin.query_parameter("train.model").scoped_configurable_fn()
  logsnr_fn = gin.query_parameter("train.logsnr_fn").scoped_configurable_fn()
  cfg = train_lib.TrainConfig()
  return LoadedRun(run_dir, model, logsnr_fn, cfg, int(getattr(model, "num_classes", 0) or 0))


def restore_ema_params(run: LoadedRun, step: int, mesh=None) -> Any:
  """The EMA parameters of checkpoint ``step`` (sharded like in training)."""
  mesh = mesh or shd.make_mesh()
  abstract, _ = train_lib.abstract_state(run.model, train_lib.make_optimizer(run.cfg), run.cfg, run.num_classes, mesh)
  checkpointer = ckpt_lib.Checkpointer(run.run_dir, with_data=False, async_save=False)
  if step not in checkpointer.all_steps():
    raise UserError(f"checkpoint step {step} does not exist in {checkpointer.directory}; "
                    f"complete checkpoints: {checkpointer.all_steps() or 'none'}")
  state = checkpointer.restore(step, abstract)
  checkpointer.close()
  return state["ema_params"]


def make_batch_sampler(run: LoadedRun, *, batch_size: int, num_steps: int, noise_param: float,
                       guidance: float, mesh) -> Callable[[Any, int, int], jax.Array]:
  """A jitted ``(params, seed, batch_index) -> uint8 [batch, H, W, 3]`` sampler."""
  d = run.cfg.image_size
  shape = (batch_size, d, d, 3)
  nc = run.num_classes

  def one_batch(params, seed, index):
    rng = jax.random.fold_in(jax.random.key(seed), index)
    label_rng, sample_rng = jax.random.split(rng)
    labels = jax.random.randint(label_rng, (batch_size,), 0, nc) if nc else None

    def model_fn(z, logsnr, label):
      return run.model.apply({"params": params}, z, logsnr, label=label, train=False)

    if nc:
      v_fn = sampling.guided_v_fn(model_fn, labels, jnp.full_like(labels, nc), guidance)
    else:
      v_fn = lambda z, logsnr: model_fn(z, logsnr, None)
    x = sampling.ddpm_sample(v_fn, sample_rng, shape, logsnr_fn=run.logsnr_fn, num_steps=num_steps,
                             noise_param=noise_param)
    return sampling.to_uint8(x)

  return jax.jit(one_batch, static_argnums=(1,), out_shardings=shd.batch_sharding(mesh))


def sample_images(run: LoadedRun, params: Any, *, num_samples: int, batch_size: int, num_steps: int,
                  noise_param: float = 0.2, guidance: float = 1.0, seed: int = 0, mesh=None,
                  cache_dir: str | None = None, progress: bool = True) -> np.ndarray:
  """``num_samples`` uint8 images; with ``cache_dir``, finished batches survive a restart."""
  mesh = mesh or shd.make_mesh()
  if batch_size % mesh.devices.size:
    raise UserError(f"sampling batch_size={batch_size} must be divisible by the number of devices "
                    f"({mesh.devices.size})")
  fn = make_batch_sampler(run, batch_size=batch_size, num_steps=num_steps, noise_param=noise_param,
                          guidance=guidance, mesh=mesh)
  num_batches = -(-num_samples // batch_size)
  out = []
  bar = Progress(total=num_batches, desc=f"sample w={guidance}", enabled=progress and jax.process_index() == 0)
  for i in range(num_batches):
    path = os.path.join(cache_dir, f"batch_{i:06d}.npy") if cache_dir else None
    if path and os.path.exists(path):
      out.append(np.load(path))
    else:
      imgs = np.asarray(multihost_utils.process_allgather(fn(params, seed, i), tiled=True))
      if path and jax.process_index() == 0:
        tmp = path + ".tmp.npy"
        np.save(tmp, imgs)
        os.replace(tmp, path)
      out.append(imgs)
    bar.update(i + 1)
  bar.close()
  return np.concatenate(out)[:num_samples]
