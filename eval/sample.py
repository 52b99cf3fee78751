"""Samples from a run's EMA parameters with the DDPM sampler (appendix A), batched over all devices.

Given a run directory, the model and schedule are rebuilt from its operative ``config.gin`` and the
EMA parameters of a checkpoint are restored. Samples are deterministic given the seed: batch ``i``
uses ``fold_in(seed, i)`` for its noise and its class labels, whatever the batch size per device.
Class-conditional models draw labels uniformly and can be guided: a guidance scale ``w`` (reported
as ``1 + eta``, Table 9) combines the conditional and unconditional predictions. Samples are
quantised to uint8 exactly as saved images would be, before any metric sees them.

Text-to-image models (Table 8, Figure 8) sample from given per-sample conditioning: sample ``i``
gets caption ``i``'s T5 embedding and mask (``conditions``; the eval worker passes the evaluation
caption set, core/data/captions.py) and, for the 384x640 model, its portrait flag. The unconditional
pass of guidance uses the null text the trainer drops to (core.trainer.null_text: zero embeddings,
all-False mask). The noise depends only on (seed, batch index): the same seeds under different
captions start from the same z_1. Images are H x W (Train.image_size may be (height, width)).

Multi-host (``jax.distributed``): each process samples its devices' share of a batch and every
process gets every image; a sample cache is process 0's alone and broadcast (core/multihost.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import multihost
from core import sampling
from core import sharding as shd
from core import trainer as train_lib
from core.data import pipeline, records
from core.errors import UserError
from core.io import rundir
from core.models.precast import precast_params
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


def checkpoint_step(run_dir: str, step: int | None = None) -> int:
  """``step``, or the run's newest complete checkpoint when None (a one-line error if none)."""
  checkpointer = ckpt_lib.Checkpointer(run_dir, with_data=False, async_save=False)
  steps = checkpointer.all_steps()
  checkpointer.close()
  if step is None and not steps:
    raise UserError(f"no complete checkpoint in {run_dir} yet; train it first")
  return steps[-1] if step is None else step


def restore_ema_params(run: LoadedRun, step: int, mesh=None) -> Any:
  """The EMA parameters of checkpoint ``step`` (sharded like in training)."""
  mesh = mesh or shd.make_mesh()
  abstract, _ = train_lib.abstract_state(run.model, train_lib.make_optimizer(run.cfg), run.cfg,
                                         run.num_classes, mesh)
  checkpointer = ckpt_lib.Checkpointer(run.run_dir, with_data=False, async_save=False)
  if step not in checkpointer.all_steps():
    raise UserError(f"checkpoint step {step} does not exist in {checkpointer.directory}; "
                    f"complete checkpoints: {checkpointer.all_steps() or 'none'}")
  state = checkpointer.restore(step, abstract)
  checkpointer.close()
  return state["ema_params"]


def is_text_to_image(run: LoadedRun) -> bool:
  return getattr(run.model, "text_channels", 0) > 0


def make_batch_sampler(run: LoadedRun, *, batch_size: int, num_steps: int, noise_param: float,
                       guidance: float, mesh) -> Callable[..., jax.Array]:
  """A jitted ``(params, seed, batch_index[, cond]) -> uint8 [batch, H, W, 3]`` sampler; ``cond``
  (text-to-image) is {'text_emb' [B,T,D], 'text_mask' [B,T][, 'portrait' [B]]}."""
  shape = (batch_size, *run.cfg.hw, 3)
  nc = run.num_classes
  text = is_text_to_image(run)

  def one_batch(params, seed, index, cond=None):
    params = precast_params(run.model, params, shape[1:])   # once, not at every step
    rng = jax.random.fold_in(jax.random.key(seed), index)
    label_rng, sample_rng = jax.random.split(rng)
    labels = jax.random.randint(label_rng, (batch_size,), 0, nc) if nc else None

    def model_fn(z, logsnr, c):
      if not text:
        return run.model.apply({"params": params}, z, logsnr, label=c, train=False)
      extra = train_lib.extra_conditioning(run.model, dict(c, image=z))
      return run.model.apply({"params": params}, z, logsnr, label=None, text_emb=c["text_emb"],
                             train=False, **extra)

    if text:
      if cond is None:
        raise UserError("a text-to-image model samples from captions: pass conditions= with "
                        "text_emb and text_mask (e.g. core.data.captions.load_eval_captions)")
      emb, mask = jnp.asarray(cond["text_emb"], jnp.float32), cond.get("text_mask")
      c = {"text_emb": emb, **{k: cond[k] for k in ("text_mask", "portrait") if k in cond}}
      null_emb, null_mask = train_lib.null_text(emb, mask, jnp.ones((batch_size,), bool))
      n = dict(c, text_emb=null_emb, **({} if null_mask is None else {"text_mask": null_mask}))
      v_fn = sampling.guided_v_fn(model_fn, c, n, guidance)
    elif nc:
      v_fn = sampling.guided_v_fn(model_fn, labels, jnp.full_like(labels, nc), guidance)
    else:
      v_fn = lambda z, logsnr: model_fn(z, logsnr, None)
    x = sampling.ddpm_sample(v_fn, sample_rng, shape, logsnr_fn=run.logsnr_fn, num_steps=num_steps,
                             noise_param=noise_param)
    return sampling.to_uint8(x)

  return jax.jit(one_batch, static_argnums=(1,), out_shardings=shd.batch_sharding(mesh))


def batch_conditions(conditions: dict[str, np.ndarray] | None, index: int, batch_size: int
                     ) -> dict[str, np.ndarray] | None:
  """Rows [index * batch_size, (index + 1) * batch_size) of per-sample conditioning; a last batch
  that runs past the end repeats the last row (those samples are dropped)."""
  if conditions is None:
    return None
  n = len(next(iter(conditions.values())))
  rows = np.minimum(np.arange(index * batch_size, (index + 1) * batch_size), n - 1)
  out = {k: np.asarray(v[rows]) for k, v in conditions.items()}
  out["text_emb"] = out["text_emb"].astype(np.float32)
  return out


def caption_portraits(data_dir: str, keys: Sequence[str], split: str = "eval") -> np.ndarray:
  """int32 [len(keys)]: the portrait flag of the image each evaluation caption was drawn from.

  Section 5's 384x640 model: portrait images are rotated 90 degrees at preparation and flagged
  (core/data/prepare.py), so the reference statistics of the split hold rotated portraits in their
  proportion. Sampling caption ``i`` with its image's flag gives samples in that same proportion.
  The flags are read from the records' headers (``key`` and ``portrait``: images are not decoded);
  a split prepared without flags gives 0 (landscape), as the trainer feeds such records.
  """
  paths, meta = pipeline.split_paths(data_dir, split)
  source = pipeline.RecordSource(paths, meta, split)
  flags = {}
  for i in range(len(source)):
    header, _ = records.decode_header(source[i])
    flags[header.get("key", "")] = int(header.get("portrait", 0))
  missing = sorted({k for k in keys if k not in flags})
  if missing:
    raise UserError(f"{len(missing)} evaluation caption(s) of {data_dir} name images that are not "
                    f"in its {split} split (e.g. {missing[0]!r}); prepare the data set again "
                    f"(python -m core.data prepare ... overwrite=true)")
  return np.asarray([flags[k] for k in keys], np.int32)


CACHE_KEY_FILE = "cache.json"


def _fingerprint(conditions: dict[str, np.ndarray] | None) -> str | None:
  """A digest of the per-sample conditioning: text masks and portrait flags whole, the text
  embeddings by shape and first token (T5's outputs are contextual: the first token's embedding
  depends on the whole caption), so that 30K x 128 x 4096 embeddings are not hashed whole."""
  if conditions is None:
    return None
  h = hashlib.sha1()
  for k in sorted(conditions):
    a = np.asarray(conditions[k])
    h.update(f"{k}{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a[:, 0] if k == "text_emb" else a).tobytes())
  return h.hexdigest()


def _open_cache(cache_dir: str, key: dict[str, Any], paths: Sequence[str],
                shape: tuple[int, ...]) -> np.ndarray:
  """Which batches ``cache_dir`` holds for ``key`` (int32 0/1 per path); a cache written under
  another key (batch size, sampler settings, conditioning) is emptied first. Process 0 only."""
  os.makedirs(cache_dir, exist_ok=True)
  key_path = os.path.join(cache_dir, CACHE_KEY_FILE)
  try:
    with open(key_path, encoding="utf-8") as f:
      same = json.load(f) == key
  except (OSError, ValueError):
    same = False
  if not same:
    for name in os.listdir(cache_dir):
      if name.startswith("batch_"):
        os.remove(os.path.join(cache_dir, name))
    tmp = key_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(key, f)
    os.replace(tmp, key_path)
  have = np.zeros(len(paths), np.int32)
  for i, path in enumerate(paths):
    try:
      a = np.load(path, mmap_mode="r")
      have[i] = a.shape == shape and a.dtype == np.uint8
    except (OSError, ValueError):  # absent, or not a whole .npy file
      pass
  return have


def sample_images(run: LoadedRun, params: Any, *, num_samples: int, batch_size: int, num_steps: int,
                  noise_param: float = 0.2, guidance: float = 1.0, seed: int = 0, mesh=None,
                  cache_dir: str | None = None, progress: bool = True,
                  conditions: dict[str, np.ndarray] | None = None) -> np.ndarray:
  """``num_samples`` uint8 images, the same on every process; with ``cache_dir``, finished
  batches survive a restart.

  ``conditions``: per-sample arrays (at least num_samples rows) for a text-to-image model, sample i
  conditioned on row i: {'text_emb' [N,T,D], 'text_mask' [N,T] bool[, 'portrait' [N] int]}.

  The cache (one ``batch_<i>.npy`` per batch) is keyed by everything that makes a batch, written
  to ``cache.json`` in it: batch size, sampler settings, image shape and a fingerprint of the
  conditioning (the checkpoint is the caller's: one folder per checkpoint); a cache of another
  key is emptied, a batch file of the wrong shape is sampled again. Multi-host: process 0 alone
  reads and writes the cache, and broadcasts which batches it holds and their contents, so every
  process runs the same collectives whatever the other hosts' disks hold.
  """
  mesh = mesh or shd.make_mesh()
  if batch_size % mesh.devices.size:
    raise UserError(f"sampling batch_size={batch_size} must be divisible by the number of devices "
                    f"({mesh.devices.size})")
  fn = make_batch_sampler(run, batch_size=batch_size, num_steps=num_steps, noise_param=noise_param,
                          guidance=guidance, mesh=mesh)
  num_batches = -(-num_samples // batch_size)
  shape = (batch_size, *run.cfg.hw, 3)
  paths = [os.path.join(cache_dir, f"batch_{i:06d}.npy") for i in range(num_batches)
           ] if cache_dir else []
  cached = np.zeros(num_batches, np.int32)
  if cache_dir:
    key = {"batch_size": batch_size, "num_steps": num_steps, "noise_param": noise_param,
           "guidance": guidance, "seed": seed, "shape": list(shape[1:]),
           "num_classes": run.num_classes, "conditions": _fingerprint(conditions)}
    cached = multihost.from_chief(lambda: _open_cache(cache_dir, key, paths, shape), cached)
  images = np.empty((num_batches * batch_size, *shape[1:]), np.uint8)
  bar = Progress(total=num_batches, desc=f"sample w={guidance}",
                 enabled=progress and multihost.is_chief())
  for i in range(num_batches):
    if cached[i]:
      imgs = multihost.from_chief(lambda: np.load(paths[i]), np.zeros(shape, np.uint8))
    else:
      cond = batch_conditions(conditions, i, batch_size)
      out_i = fn(params, seed, i) if cond is None else fn(params, seed, i, cond)
      imgs = np.asarray(multihost_utils.process_allgather(out_i, tiled=True))
      if cache_dir and multihost.is_chief():
        tmp = paths[i] + ".tmp.npy"
        np.save(tmp, imgs)
        os.replace(tmp, paths[i])
    images[i * batch_size:(i + 1) * batch_size] = imgs  # a batch of another shape raises here
    bar.update(i + 1)
  bar.close()
  return images[:num_samples]
