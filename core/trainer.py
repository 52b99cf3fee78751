"""The trainer: state, step and loop, configured by gin only, from a laptop CPU to a TPU pod.

One step (section 2, appendix A): t ~ U(0, 1) per image, ``z_t = alpha_t x + sigma_t eps`` under
the configured logSNR schedule, the unweighted loss of ``diffusion_loss`` on the predicted v, the
conditioning dropped 10% of the time for classifier-free guidance; Adam with warmup, clipping and
an EMA (appendix B); optionally in micro-batches (gradient accumulation). Every random number
derives from ``(seed, step, example)`` and the data iterator is checkpointed, so a killed run
resumes bit-exactly; SIGTERM checkpoints and exits 75; a non-finite step is skipped and counted.
The command line is core/train.py.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import diffusion
from core import errors
from core import hardware
from core import metric_writer
from core import progress as progress_lib
from core import runlock
from core import sampling
from core import schedules
from core import sharding as shd
from core.data import pipeline, prepare, records
from core.errors import Preempted, UserError
from core.io import rundir, storage
from core.models import flops as flops_lib
from core.models import validate as validate_model
from core.models.validate import image_hw


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@gin.configurable("Train")
@dataclasses.dataclass
class TrainConfig:
  """Everything about a run that is not the model or the schedule (appendix B values in gin/)."""
  image_size: int | tuple[int, int] = 32   # or (height, width), e.g. (384, 640) (section 5)
  batch_size: int = 32                # images per optimizer step (the paper's batch size)
  # Gradient accumulation: each step's batch in grad_accum micro-batches of batch_size / grad_accum
  # images, one after another, then one update: the paper's batch of 512 or 2048 in the memory of
  # a micro-batch. The update is the whole batch's (to float rounding; every example's noise,
  # dropout and condition drop are drawn from its own key, see train_step).
  grad_accum: int = 1
  num_steps: int = 1000
  learning_rate: float = 1e-4
  warmup_steps: int = 10_000
  lr_decay: str = "none"              # after warmup: 'none' (appendix B) or 'cosine' (to 0)
  adam_b1: float = 0.9
  adam_b2: float = 0.99
  adam_eps: float = 1e-12
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  ema_decay: float = 0.9999
  cond_drop_prob: float = 0.1         # classifier-free guidance (appendix A)
  seed: int = 0
  data_dir: str | None = None         # None: the built-in emoji data set at image_size
  num_data_shards: int | None = None  # None: one per process. Fix it to compare process counts.
  num_workers: int = 0                # grain worker processes per host
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  # Steps checkpointed and kept whatever keep_checkpoints says: a row evaluated at a snapshot of
  # a longer run (Table 3's "no dropout" at 700K of 1.5M, experiments/jobs.py).
  keep_steps: tuple[int, ...] = ()
  async_checkpoints: bool = True
  checkpoint_ocdbt: bool = True       # False: one zarr array per leaf (see core/checkpoint.py)
  sample_every: int = 0               # 0: no sample grids during training
  num_sample_images: int = 16
  sample_steps: int = 64
  max_nonfinite_in_a_row: int = 20
  text_len: int = 128                 # text-to-image: tokens and width of the text embeddings
  text_dim: int = 4096                # (T5-XXL, section 3.6)
  # The random-number generator of each step's noise, dropout and condition drop: JAX's default
  # threefry2x32 (as the authors' vdm code), or rbg / unsafe_rbg, cheaper on accelerators with
  # other random numbers (the same speed-for-bits trade the big JAX trainers make for dropout).
  # rbg / unsafe_rbg draw a vmapped batch's bits from its first key (jax.lax.rng_bit_generator),
  # so with them a grad_accum > 1 changes the draws (not their distribution); threefry does not.
  prng_impl: str = "threefry2x32"

  def __post_init__(self):
    if min(self.hw) < 1:
      raise UserError(f"Train.image_size={self.image_size} must be at least 1 (an int or (H, W))")
    for name in ("batch_size", "grad_accum", "num_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "num_sample_images", "sample_steps", "max_nonfinite_in_a_row"):
      if getattr(self, name) < 1:
        raise UserError(f"Train.{name}={getattr(self, name)} must be at least 1")
    for name in ("warmup_steps", "sample_every", "num_workers"):
      if getattr(self, name) < 0:
        raise UserError(f"Train.{name}={getattr(self, name)} must not be negative")
    if self.batch_size % self.grad_accum:
      raise UserError(f"Train.batch_size={self.batch_size} is not divisible by "
                      f"Train.grad_accum={self.grad_accum}; the micro-batches must be equal")
    if not self.learning_rate > 0:
      raise UserError(f"Train.learning_rate={self.learning_rate} must be positive")
    if self.prng_impl not in PRNG_IMPLS:
      raise UserError(f"Train.prng_impl={self.prng_impl!r} is unknown; use one of "
                      f"{', '.join(PRNG_IMPLS)}")


  @property
  def hw(self) -> tuple[int, int]:
    """(height, width) of the training images."""
    return image_hw(self.image_size)


LR_DECAYS = ("none", "cosine")


def learning_rate_schedule(cfg: TrainConfig):
  """Linear warmup (appendix B), then constant ('none', the paper) or cosine decay to 0 at
  ``num_steps`` ('cosine': short demo runs end at a low learning rate). A float when constant
  (Adam's state then has no schedule count, as in checkpoints written before lr_decay existed)."""
  if cfg.lr_decay not in LR_DECAYS:
    raise UserError(f"Train.lr_decay={cfg.lr_decay!r} is unknown; use one of "
                    f"{', '.join(LR_DECAYS)}")
  if cfg.lr_decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(cfg.num_steps, cfg.warmup_steps + 1))
  if cfg.warmup_steps:
    return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return cfg.learning_rate


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam with linear warmup and global-norm clipping (appendix B)."""
  lr = learning_rate_schedule(cfg)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay))


def forward_flops(model, cfg: TrainConfig) -> float:
  """Analytic forward FLOPs per image of ``model`` at the run's image size (and text length)."""
  text = getattr(model, "text_channels", 0) > 0
  return float(flops_lib.forward_flops(model, cfg.image_size, text_len=cfg.text_len if text else 0,
                                       text_dim=cfg.text_dim if text else 0))


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
  lr = learning_rate_schedule(cfg)
  return float(lr(step) if callable(lr) else lr)


# ----------------------------------------------------------------------------------------------
# State and step


def init_state(model, tx, cfg: TrainConfig, rng: jax.Array, num_classes: int) -> dict[str, Any]:
  x = jnp.zeros((1, *cfg.hw, 3), jnp.float32)
  label = jnp.zeros((1,), jnp.int32) if num_classes else None
  text = jnp.zeros((1, cfg.text_len, cfg.text_dim), jnp.float32) if getattr(model, "text_channels",
                                                                            0) else None
  params = model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), label=label,
                      text_emb=text,
                      train=False)["params"]
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema_params": params,
      "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
  }


def train_step(state, batch, *, model, tx, logsnr_fn, cfg: TrainConfig, num_classes: int):
  """One optimisation step; a non-finite loss or gradient leaves the state unchanged but counted.

  Every example draws its t, eps, condition drop and dropout masks from keys of its own,
  ``fold_in(key, its index in the step's global batch)`` (diffusion_loss with per-example keys,
  :func:`per_example_dropout`), so the draws do not depend on how the batch is split:
  ``cfg.grad_accum`` micro-batches (examples j, j + k, j + 2k, ... in micro-batch j, so that every
  device keeps its share of each) sum to the gradient of the whole batch.
  """
  step_rng = jax.random.fold_in(jax.random.key(cfg.seed, impl=cfg.prng_impl), state["step"])
  loss_rng, drop_rng, cond_rng = jax.random.split(step_rng, 3)
  n = batch["image"].shape[0]
  index = jnp.arange(n)
  per_example = lambda key: jax.vmap(jax.random.fold_in, (None, 0))(key, index)
  # Classifier-free guidance: drop the conditioning of cond_drop_prob of the examples (appendix A);
  # a dropped class is the null class num_classes, a dropped text is the null text (null_text).
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.cond_drop_prob))(per_example(cond_rng))
  cond = extra_conditioning(model, batch)
  if num_classes:
    cond["label"] = jnp.where(drop, num_classes, batch["label"].astype(jnp.int32))
  if "text_emb" in batch:
    cond["text_emb"], mask = null_text(batch["text_emb"], cond.get("text_mask"), drop)
    if mask is not None:
      cond["text_mask"] = mask
  inputs = {"x": batch["image"].astype(jnp.float32) / 127.5 - 1.0, "cond": cond,
            "loss_key": per_example(loss_rng), "index": index}

  def loss_sum(params, micro):  # the sum of the micro-batch's per-example losses
    def v_fn(z, logsnr):
      with nn.intercept_methods(per_example_dropout(micro["index"])):
        return model.apply({"params": params}, z, logsnr, train=True, rngs={"dropout": drop_rng},
                           **micro["cond"])
    # The loss type (eps-MSE, v-MSE, multiscale) is gin-configured on diffusion_loss.
    _, aux = diffusion.diffusion_loss(v_fn, micro["x"], micro["loss_key"], logsnr_fn=logsnr_fn)
    return jnp.sum(aux["loss"])

  grad_fn = jax.value_and_grad(loss_sum)
  k = cfg.grad_accum
  if k == 1:
    total, grad_sum = grad_fn(state["params"], inputs)
  else:
    # [n, ...] -> [k, n / k, ...]: micro-batch j holds examples j, j + k, ... (strided, so that the
    # batch's split over devices splits every micro-batch the same way).
    split = lambda a: jnp.swapaxes(a.reshape(n // k, k, *a.shape[1:]), 0, 1)

    def accumulate(grad_sum, micro):
      loss, grads = grad_fn(state["params"], micro)
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    grad_sum, losses = jax.lax.scan(
        accumulate, jax.tree.map(jnp.zeros_like, state["params"]), jax.tree.map(split, inputs))
    total = jnp.sum(losses)
  loss = total / n
  grads = jax.tree.map(lambda g: g / n, grad_sum)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p,
                     state["ema_params"], params)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = {
      "step": state["step"] + 1,
      "params": keep(params, state["params"]),
      "opt_state": keep(opt_state, state["opt_state"]),
      "ema_params": keep(ema, state["ema_params"]),
      "nonfinite_in_a_row": jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1),
      "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
  }
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
  return new_state, metrics


def per_example_dropout(index: jax.Array):
  """A flax method interceptor (``nn.intercept_methods``): every active ``nn.Dropout`` of the
  model masks example i with flax's own Dropout under the key ``fold_in(the module's key,
  index[i])``, ``index`` being the examples' places in the step's batch. The module's key
  (``make_rng('dropout')``) is the same in every micro-batch of a step, so an example's masks do
  not depend on the batch around it. The model itself runs batched (vmapping the whole model
  over examples instead made a CPU step of the demo U-Net a quarter slower)."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.Dropout) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    deterministic = nn.merge_param("deterministic", module.deterministic,
                                   kwargs.get("deterministic", args[1] if len(args) > 1 else None))
    if deterministic or module.rate == 0.0:
      return next_fun(*args, **kwargs)
    key = module.make_rng(module.rng_collection)
    one = lambda x, i: next_fun(x[None], *args[1:], **dict(kwargs, rng=jax.random.fold_in(key, i)))
    return jax.vmap(one)(args[0], index)[:, 0]

  return intercept


def null_text(text_emb, text_mask, drop):
  """The text of the examples where ``drop`` is True replaced by the null text: zero embeddings
  and, with a mask, an all-False mask (no cross-attention update). Sampling's unconditional pass
  uses the same (eval/sample.py), so guidance contrasts with what training dropped to."""
  emb = jnp.where(drop[:, None, None], 0.0, jnp.asarray(text_emb).astype(jnp.float32))
  mask = None if text_mask is None else jnp.asarray(text_mask, bool) & ~drop[:, None]
  return emb, mask


def extra_conditioning(model, batch) -> dict[str, Any]:
  """The text mask and portrait flag of a batch, as keyword arguments of the model (if it has)."""
  out = {}
  if getattr(model, "text_channels", 0) and batch.get("text_mask") is not None:
    out["text_mask"] = jnp.asarray(batch["text_mask"], bool)
  if getattr(model, "portrait_conditioning", False):
    p = batch.get("portrait")
    out["portrait"] = (jnp.zeros((batch["image"].shape[0],), jnp.int32) if p is None
                       else jnp.asarray(p, jnp.int32))
  return out


def abstract_state(model, tx, cfg: TrainConfig, num_classes: int, mesh) -> tuple[Any, Any]:
  """(ShapeDtypeStructs with their FSDP shardings, the shardings) of the unallocated state."""
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, cfg, num_classes=num_classes),
                            jax.random.key(cfg.seed))
  shardings = shd.tree_shardings(mesh, abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          shardings)
  return abstract, shardings


def jit_train_step(model, tx, logsnr_fn, cfg: TrainConfig, num_classes: int, mesh, state_sharding):
  """The sharded, buffer-donating jitted :func:`train_step`."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, logsnr_fn=logsnr_fn, cfg=cfg,
                        num_classes=num_classes),
      in_shardings=(state_sharding, shd.batch_sharding(mesh)),
      out_shardings=(state_sharding, shd.replicated(mesh)),
      donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# Data


def resolve_data_dir(cfg: TrainConfig, text: bool = False) -> tuple[str, dict[str, Any]]:
  """The run's data set (the built-in emoji set, captioned for a text model, when none is given)
  and its meta.json, checked against the image size (and the text width of a text model)."""
  data_dir = cfg.data_dir or prepare.default_data_dir(cfg.image_size, captions=text)
  meta = records.read_meta(data_dir)
  dim = (meta.get("text") or {}).get("dim")
  if text and dim is not None and int(dim) != cfg.text_dim:
    raise UserError(f"the text embeddings in {data_dir} are {dim}-d "
                    f"({meta['text'].get('encoder')}) "
                    f"but Train.text_dim={cfg.text_dim}; bind Train.text_dim={dim}")
  have = image_hw(meta.get("image_size", meta["resolution"]))
  if have != cfg.hw:
    res = cfg.image_size if isinstance(cfg.image_size, int) else "{}x{}".format(*cfg.hw)
    raise UserError(f"data in {data_dir} is {have[0]}x{have[1]} but "
                    f"Train.image_size={cfg.image_size}; prepare the data at res={res} "
                    f"(python -m core.data prepare ... res={res}) or change Train.image_size")
  return data_dir, meta


# ----------------------------------------------------------------------------------------------
# The loop


class _Preemption:
  """SIGTERM, wherever it arrives, becomes a stop at a checkpoint that every process agrees on.

  One process: a Python handler sets ``requested`` from the start of :func:`train` (compiling,
  restoring, training); a SIGTERM that core/train.py deferred while the command started counts too.

  Several (``jax.distributed``): JAX's preemption sync manager owns SIGTERM (its C++ handler tells
  every process; a Python handler would hide the signal from it), and the loop asks orbax's
  ``reached_preemption`` at every step with the number of steps this invocation has run (1, 2,
  ...). The sync point is one past the largest count the processes had reported when the notice
  came, 0 before the loop: with the global step, a run resumed at step N that was signalled while
  it compiled or restored would have waited for step 1 and never stopped (seen under SLURM, where
  ``--signal=TERM@120`` lands early in short allocations). A SIGTERM deferred before
  ``jax.distributed`` started is sent again, to the sync manager's handler.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._depth = 0

  def __enter__(self):
    self._depth += 1
    if self._depth > 1:
      return self
    if jax.process_count() > 1:
      if errors.take_deferred_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)  # now to the preemption sync manager
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not in the main thread
      self._previous = None
    self.requested = errors.take_deferred_sigterm()
    return self

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    self._depth -= 1
    if self._depth == 0 and self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _json_float(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None


def _lock_run_dir(workdir: str) -> runlock.RunLock | runlock.GcsLease | None:
  """Locks the run directory on the chief (a flock, or a lease on gs://: core/runlock.py); every
  process learns whether that worked."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = runlock.lock_run_dir(workdir)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = UserError(f"process 0 could not lock the run directory {workdir} (see its error)")
  if error is not None:
    raise error
  return lock


@gin.configurable("train", denylist=["workdir"])
def train(workdir: str, *, model=gin.REQUIRED, logsnr_fn=gin.REQUIRED,
          stop_at_step: int | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes) the gin-configured run in ``workdir``; returns a small summary.

  Raises :class:`core.errors.Preempted` after writing its checkpoint when SIGTERM stopped it.
  """
  cfg = TrainConfig()
  if not storage.is_remote(workdir):
    workdir = os.path.abspath(workdir)
  try:
    storage.makedirs(workdir)
  except OSError as e:
    raise UserError(f"cannot create run directory {workdir} ({e.strerror or e}); choose a writable "
                    f"workdir=") from None
  lock = _lock_run_dir(workdir)
  try:
    # SIGTERM from here on (compiling, restoring, training) stops at a checkpoint.
    with _Preemption() as preemption:
      return _train(workdir, cfg, model, logsnr_fn, stop_at_step, preemption)
  finally:
    if lock is not None:
      lock.release()


def _train(workdir: str, cfg: TrainConfig, model, logsnr_fn, stop_at_step: int | None,
           preemption: _Preemption) -> dict[str, Any]:

  is_chief = jax.process_index() == 0
  validate_model(model, cfg.image_size)
  data_dir, meta = resolve_data_dir(cfg, text=getattr(model, "text_channels", 0) > 0)
  num_classes = int(getattr(model, "num_classes", 0) or 0)
  if num_classes and int(meta.get("num_classes", 0)) > num_classes:
    raise UserError(f"the data has {meta['num_classes']} classes but the model's "
                    f"num_classes={num_classes}; "
                    f"bind UNet/UViT.num_classes={meta['num_classes']}")

  mesh = shd.make_mesh()
  shd.check_batch_size(mesh, cfg.batch_size)
  micro = cfg.batch_size // cfg.grad_accum
  if micro % mesh.devices.size:
    raise UserError(f"Train.batch_size / Train.grad_accum = {micro} images per micro-batch is not "
                    f"divisible by the {mesh.devices.size} devices; choose a grad_accum that "
                    f"leaves a multiple of {mesh.devices.size}")
  tx = make_optimizer(cfg)
  abstract, state_sharding = abstract_state(model, tx, cfg, num_classes, mesh)
  step_fn = jit_train_step(model, tx, logsnr_fn, cfg, num_classes, mesh, state_sharding)

  loader = pipeline.ShardedLoader(data_dir, batch_size=cfg.batch_size, seed=cfg.seed,
                                  num_shards=cfg.num_data_shards or jax.process_count(),
                                  num_workers=cfg.num_workers)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=cfg.keep_checkpoints,
                                       keep_steps=cfg.keep_steps,
                                       async_save=cfg.async_checkpoints,
                                       use_ocdbt=cfg.checkpoint_ocdbt)
  start, state = checkpointer.restore_latest(abstract, loader)
  if start is None:
    state = jax.jit(functools.partial(init_state, model, tx, cfg, num_classes=num_classes),
                    out_shardings=state_sharding)(jax.random.key(cfg.seed))
    start = 0
  else:
    print(f"resumed from step {start} ({checkpointer.directory})", flush=True)

  # The operative config is known once the model and schedule have been built and called.
  writer = metric_writer.MetricWriter(workdir, start_step=start, is_chief=is_chief,
                                      tb_dir=rundir.TRAIN_EVENTS, tb_prefix="train/",
                                      legacy_tb_dir="tb")
  if is_chief:
    storage.write_text(rundir.config_path(workdir), config_lib.operative_config())
    writer.write_text("config", config_lib.operative_config(), step=start, code=True)
    writer.write_hparams(run_hparams(workdir, model, cfg), group=storage.basename(workdir))

  flops_per_image = 3.0 * forward_flops(model, cfg)
  peak = hardware.peak_flops_per_second()
  sampler = _make_sampler(model, logsnr_fn, cfg, num_classes) if cfg.sample_every else None
  end = cfg.num_steps if stop_at_step is None else min(cfg.num_steps, stop_at_step)
  bar = progress_lib.Progress(total=cfg.num_steps, initial=start, desc="train", enabled=is_chief)
  last_log_time, last_log_step = time.time(), start
  step = start
  preempted = False
  with preemption:  # installed by train() before compiling; re-entering it is a no-op
    while step < end:
      batch = shd.global_batch(mesh, next(loader))
      if step == start:
        bar.write("compiling the train step ...")
        compile_start = time.perf_counter()
      state, m = step_fn(state, batch)
      if step == start:  # the first call compiles (45-130 s for the demo on a small CPU)
        jax.block_until_ready(m)
        bar.write(f"compiled the train step in "
                  f"{progress_lib.format_duration(time.perf_counter() - compile_start)} "
                  f"(its first step included)")
      step += 1
      if step % cfg.log_every == 0 or step == end:
        now = time.time()
        steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        img_per_sec = steps_per_sec * cfg.batch_size
        last = _write_row(step, m, writer, cfg, {
            "steps_per_sec": steps_per_sec, "img_per_sec": img_per_sec,
            "mfu": (img_per_sec * flops_per_image / (peak * jax.device_count())) if peak else None})
        bar.update(step, loss=last["loss"])
        streak = int(state["nonfinite_in_a_row"])
        if streak:
          print(f"step {step}: {streak} non-finite step(s) in a row skipped "
                f"({int(state['nonfinite_total'])} in total)", file=sys.stderr, flush=True)
        if streak >= cfg.max_nonfinite_in_a_row:
          checkpointer.wait()
          raise UserError(
              f"stopping at step {step}: {streak} non-finite losses or gradients in a row "
              f"(Train.max_nonfinite_in_a_row={cfg.max_nonfinite_in_a_row}); last good checkpoint: "
              f"step {checkpointer.latest_step()} in {checkpointer.directory}. Lower the learning "
              f"rate or check the data, then rerun to resume from it")
      if sampler is not None and step % cfg.sample_every == 0:
        sample_start = time.perf_counter()
        writer.write_images(step, {"samples_ema": sampler(state["ema_params"], step)})
        bar.write(f"step {step}: sample grid of {cfg.num_sample_images} EMA images "
                  f"({cfg.sample_steps} sampler steps) in {time.perf_counter() - sample_start:.1f}s"
                  + ("" if sampler.compiled else " (compiling the sampler included)"))
        sampler.compiled = True
      # Every host calls reached_preemption at every step, counting the steps run since this
      # invocation's start (see _Preemption): all stop at the same one.
      preempted = preemption.requested or checkpointer.reached_preemption(step - start)
      if step % cfg.checkpoint_every == 0 or step == end or preempted or step in cfg.keep_steps:
        checkpointer.save(step, state, loader, force=True)
      if preempted:
        break
  checkpointer.close()
  writer.close()
  loader.close()
  bar.close()
  if preempted:
    raise Preempted(f"SIGTERM at step {step}: checkpoint written to {checkpointer.directory}; "
                    f"rerun the same command to resume")
  return {"step": step, "workdir": workdir}


def _write_row(step: int, m: dict[str, jax.Array], writer, cfg: TrainConfig,
               extra: dict[str, Any]) -> dict[str, Any]:
  """One metrics.jsonl / TensorBoard row for ``step`` (the only host sync of the loop)."""
  m = jax.device_get(m)
  row = {k: _json_float(v) for k, v in m.items() if k != "finite"}
  row["finite"] = bool(m["finite"])
  row["lr"] = learning_rate_at(cfg, step - 1)
  row.update(extra)
  writer.write_scalars(step, row)
  return row


def run_hparams(workdir: str, model, cfg: TrainConfig) -> dict[str, Any]:
  """What TensorBoard's HParams dashboard compares across runs (docs/tensorboard.md).

  The table, group and row(s) the run serves and its scale (``job.json``, written by
  experiments.run), the model, the schedule and its logSNR shift 2 log(noise_d / image_d) (Eq. 5),
  the main ``Train`` settings and the value this run used of every gin parameter its table row
  sets. Needs the run's gin configuration bound: the trainer's, or config.gin parsed by
  eval.sample.load_run (the eval worker writes the same values beside its results).
  """
  h: dict[str, Any] = {"model": type(model).__name__}  # the run's name is the HParams trial id
  job = {}
  if storage.exists(rundir.job_path(workdir)):
    job = json.loads(storage.read_text(rundir.job_path(workdir)))
  for key in ("table", "group", "row"):  # "2", "128x128", "cosine (shifted to 32)"
    values = [str(r[key]) for r in job.get("rows", [])]
    h[key] = "; ".join(values if key == "row" else dict.fromkeys(values)) or None
  h["scale"] = job.get("scale")
  defaults = {k: p.default for k, p in inspect.signature(schedules.get_schedule).parameters.items()}
  sched = {**defaults, **gin.get_bindings("schedule")}
  used = {"cosine": (), "cosine_shifted": ("image_d", "noise_d"),
          "cosine_interpolated": ("image_d", "noise_d_low", "noise_d_high", "order")}
  h["schedule.name"] = sched["name"]
  h.update({f"schedule.{k}": sched[k] for k in used.get(sched["name"], ())})
  if sched["name"] == "cosine":
    h["logsnr_shift"] = 0.0
  elif sched["name"] == "cosine_shifted":
    h["logsnr_shift"] = schedules.shift(sched["image_d"], sched["noise_d"])
  for name in ("image_size", "batch_size", "learning_rate", "lr_decay", "num_steps", "ema_decay",
               "seed"):
    h[f"Train.{name}"] = getattr(cfg, name)
  for binding in job.get("bindings", []):  # the row's own settings, at the values used here
    name, value = (x.strip() for x in binding.split("=", 1))
    try:
      v = gin.query_parameter(name)
    except ValueError:
      try:
        v = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        v = value
    h[name] = "None" if v is None else v  # set to None ("no dropout") is not unset
  return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
          for k, v in h.items()}


def _make_sampler(model, logsnr_fn, cfg: TrainConfig, num_classes: int):
  """Sample grids from the EMA parameters for TensorBoard (fixed seed and labels)."""
  n = cfg.num_sample_images
  labels = jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None
  shape = (n, *cfg.hw, 3)

  @jax.jit
  def run(params, rng):
    v_fn = lambda z, logsnr: model.apply({"params": params}, z, logsnr, label=labels, train=False)
    return sampling.ddpm_sample(v_fn, rng, shape, logsnr_fn=logsnr_fn, num_steps=cfg.sample_steps)

  def sample(params, step):
    x = run(params, jax.random.key(cfg.seed + 1))
    img = np.asarray(sampling.to_uint8(x))
    return metric_writer.image_grid(img, ncols=int(np.ceil(np.sqrt(n))))

  sample.compiled = False  # the first call compiles
  return sample

