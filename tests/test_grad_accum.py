"""Gradient accumulation (Train.grad_accum): k micro-batches make the whole batch's update.

Every example draws its t, eps, dropout and condition drop from ``fold_in(step key, its index in
the batch)`` (core/trainer.py), so the draws do not depend on how the batch is split, and the
summed micro-batch gradients are the batch's to float rounding: the same parameters, EMA and Adam
state after several steps.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import config as config_lib
from core import diffusion
from core import schedules
from core import trainer
from core.errors import UserError
from core.models.unet import UNet
from core.models.uvit import UViT

NUM_CLASSES = 3
# Dropout on every block and half the labels dropped: draws that would differ if they depended on
# the split. GroupNorm groups of two channels (group_norm.max_groups below): with one channel a
# group, the bias of the conv before it has a zero gradient up to rounding, which Adam (dividing
# each gradient by its own size) turns into steps of +-lr whatever the summation order.
MODEL = UNet(base_channels=16, emb_channels=16, channel_multiplier=(1,), num_res_blocks=(1,),
             attn_resolutions=(), num_heads=1, dropout=0.3, dropout_from_resolution=8,
             num_classes=NUM_CLASSES)
CFG = trainer.TrainConfig(image_size=8, batch_size=8, warmup_steps=0, learning_rate=1e-3,
                          ema_decay=0.9, cond_drop_prob=0.5)
LOGSNR = schedules.get_schedule("cosine_shifted", image_d=8, noise_d=4)


@pytest.fixture
def small_groups():
  with config_lib.scratch():
    gin.bind_parameter("group_norm.max_groups", 8)
    yield


def _batches(n: int, steps: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
           "label": rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32)} for _ in range(steps)]


def _train(cfg: trainer.TrainConfig, batches) -> tuple[dict, list[dict]]:
  tx = trainer.make_optimizer(cfg)
  state = trainer.init_state(MODEL, tx, cfg, jax.random.key(0), num_classes=NUM_CLASSES)
  step = jax.jit(functools.partial(trainer.train_step, model=MODEL, tx=tx, logsnr_fn=LOGSNR,
                                   cfg=cfg, num_classes=NUM_CLASSES))
  metrics = []
  for b in batches:
    state, m = step(state, b)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _is_key_bias(path) -> bool:
  """A bias added to every key of a query: of the keys' normalisation (U-ViT) or of the key
  projection (the U-Net's attention of its lineage)."""
  name = jax.tree_util.keystr(path)
  return ("norm_k" in name or "['key']" in name) and name.endswith("['bias']")


def _moment(path) -> str:
  name = jax.tree_util.keystr(path)
  return ".mu" if ".mu" in name else ".nu" if ".nu" in name else name


def _moment_scales(opt_state) -> dict[str, float]:
  """The largest entry of each Adam moment (mu, nu) over the whole model, 1.0 if all zero."""
  scale: dict[str, float] = {}
  for path, a in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    scale[_moment(path)] = max(scale.get(_moment(path), 0.0), float(np.abs(a).max()))
  return {k: v or 1.0 for k, v in scale.items()}


def test_micro_batches_update_like_the_whole_batch(small_groups):
  """3 Adam steps at batch 8 in 4 micro-batches of 2 against whole batches: the same losses,
  gradient norms, parameters, EMA and Adam moments to float rounding."""
  batches = _batches(8, 3)
  whole, m_whole = _train(CFG, batches)
  split, m_split = _train(dataclasses.replace(CFG, grad_accum=4), batches)
  for a, b in zip(m_whole, m_split):
    assert bool(a["finite"]) and bool(b["finite"])
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
  assert int(split["step"]) == int(whole["step"]) == 3
  scale = _moment_scales(whole["opt_state"])
  for key in ("params", "ema_params", "opt_state"):
    flat_whole = jax.tree_util.tree_flatten_with_path(whole[key])[0]
    for (path, a), b in zip(flat_whole, jax.tree.leaves(split[key])):
      a, b = np.asarray(a), np.asarray(b)
      if _is_key_bias(path):
        # A key bias adds one vector to every key of a query, which the
        # softmax ignores: its gradient is zero up to rounding (~1e-15 here), so Adam moves it
        # by noise whatever the summation order.
        assert np.abs(b - a).max() <= 3 * CFG.learning_rate
        continue
      # Adam's moments are sums of gradients (and their squares): rounding is relative to the
      # moment's scale over the model (the attention's value bias, behind a zero-initialised
      # output projection, has gradients ~1e-8 after 3 steps, rounded at the others' scale).
      atol = 1e-6 * (scale[_moment(path)] if key == "opt_state" else 1.0)
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=f"{key}{path}")
  # The steps did move the weights (the comparison is not of two untouched states).
  init = trainer.init_state(MODEL, trainer.make_optimizer(CFG), CFG, jax.random.key(0),
                            num_classes=NUM_CLASSES)
  change = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(init["params"])))
  assert change > CFG.learning_rate


def test_uvit_scanned_blocks_with_dropout_accumulate_like_the_whole_batch(small_groups):
  """The U-ViT's transformer (nn.scan over rematerialised blocks) with dropout in its MLPs and
  ResBlocks: one step in 2 micro-batches gives the whole batch's loss, gradient norm and Adam
  moments. Random weights: at initialisation every dropout sits before a zero-initialised layer,
  where its masks change nothing yet."""
  model = UViT(base_channels=16, emb_channels=16, channel_multiplier=(1, 2), num_res_blocks=(1,),
               num_transformer_blocks=2, num_heads=2, transformer_dropout=0.3, dropout=0.3,
               dropout_from_resolution=8, attn_resolutions=(), num_classes=NUM_CLASSES,
               scan=True, remat=True)
  batch = _batches(4, 1)[0]
  out = []
  for k in (1, 2):
    cfg = dataclasses.replace(CFG, batch_size=4, grad_accum=k)
    tx = trainer.make_optimizer(cfg)
    state = trainer.init_state(model, tx, cfg, jax.random.key(0), num_classes=NUM_CLASSES)
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    state["params"] = jax.tree.unflatten(
        tree, [0.1 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)])
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, logsnr_fn=LOGSNR,
                                     cfg=cfg, num_classes=NUM_CLASSES))
    out.append(jax.device_get(step(state, batch)))
  (whole, m_whole), (split, m_split) = out
  np.testing.assert_allclose(m_split["loss"], m_whole["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_split["grad_norm"], m_whole["grad_norm"], rtol=1e-5)
  # Float noise is judged against each moment's largest entry over the whole model: some
  # gradients are zero in exact arithmetic (an attention key's bias, which the softmax ignores),
  # and their rounding residue (~1e-8) has no scale of its own.
  scale = _moment_scales(whole["opt_state"])
  flat_whole = jax.tree_util.tree_flatten_with_path(whole["opt_state"])[0]
  for (path, a), b in zip(flat_whole, jax.tree.leaves(split["opt_state"])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale[_moment(path)],
                               err_msg=jax.tree_util.keystr(path))


class _Dropped(nn.Module):
  """A dense layer then flax's Dropout, as the models use it (deterministic set at construction)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dropout(0.5, deterministic=False)(nn.Dense(64)(x))


def test_per_example_dropout_masks_do_not_depend_on_the_batch():
  """Under trainer.per_example_dropout an example's dropout mask is a function of its index in
  the step's batch alone: examples 2 and 3 are masked alike inside a batch of 6 and as a batch of
  two; the masks differ between examples, keep about half and scale by 2 as flax's Dropout does."""
  module = _Dropped()
  x = jnp.ones((6, 8))
  params = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)

  def apply(xs, index):
    with nn.intercept_methods(trainer.per_example_dropout(index)):
      return module.apply(params, xs, rngs={"dropout": jax.random.key(2)})

  dense = nn.Dense(64).apply({"params": params["params"]["Dense_0"]}, x)
  whole = np.asarray(apply(x, jnp.arange(6)))
  part = np.asarray(apply(x[2:4], jnp.arange(2, 4)))
  np.testing.assert_array_equal(part, whole[2:4])
  kept = whole != 0
  assert 0.3 < kept.mean() < 0.7 and len({row.tobytes() for row in kept}) == 6
  np.testing.assert_allclose(whole[kept], 2.0 * np.asarray(dense)[kept], rtol=1e-6)
  # Without the interceptor the batch of two draws other masks (flax's one mask per batch).
  plain = np.asarray(module.apply(params, x[2:4], rngs={"dropout": jax.random.key(2)}))
  assert not np.array_equal(plain != 0, kept[2:4])


def test_diffusion_loss_with_per_example_keys_draws_each_example_alone():
  """diffusion_loss with one key per example: an example's t (hence its loss) is the same in a
  batch of 4 and alone."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(1), jnp.arange(4))
  v_fn = lambda z, logsnr: 0.5 * z
  _, batch = diffusion.diffusion_loss(v_fn, x, keys, logsnr_fn=LOGSNR)
  _, alone = diffusion.diffusion_loss(v_fn, x[1:2], keys[1:2], logsnr_fn=LOGSNR)
  np.testing.assert_allclose(alone["t"], batch["t"][1:2])
  np.testing.assert_allclose(alone["loss"], batch["loss"][1:2], rtol=1e-6)
  assert len(set(np.asarray(batch["t"]).tolist())) == 4


def test_grad_accum_must_divide_the_batch():
  with pytest.raises(UserError, match="Train.batch_size=6 is not divisible by Train.grad_accum=4"):
    trainer.TrainConfig(batch_size=6, grad_accum=4)
  with pytest.raises(UserError, match="Train.grad_accum=0 must be at least 1"):
    trainer.TrainConfig(grad_accum=0)
