"""Gradient accumulation (Train.grad_accum): k micro-batches make the whole batch's update.

Every example draws its t, eps, dropout and condition drop from ``fold_in(step key, its index in
the batch)`` (core/trainer.py), so the draws do not depend on how the batch is split, and the
summed micro-batch gradients are the batch's to float rounding: the same parameters, EMA and Adam
state after several steps.
"""
from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import config as config_lib
from core import schedules
from core import trainer
from core.errors import UserError
from core.models.unet import UNet
from tests.jaxpr_flops import jaxpr_flops

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


def _is_key_norm_bias(path) -> bool:
  return "norm_k" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)


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
  for key in ("params", "ema_params", "opt_state"):
    flat_whole = jax.tree_util.tree_flatten_with_path(whole[key])[0]
    for (path, a), b in zip(flat_whole, jax.tree.leaves(split[key])):
      a, b = np.asarray(a), np.asarray(b)
      if _is_key_norm_bias(path):
        # The bias of the normalised keys adds one vector to every key of a query, which the
        # softmax ignores: its gradient is zero up to rounding (~1e-15 here), so Adam moves it
        # by noise whatever the summation order.
        assert np.abs(b - a).max() <= 3 * CFG.learning_rate
        continue
      # Adam's moments are sums of gradients (and their squares): rounding is relative to the
      # leaf's scale.
      atol = 1e-6 * (float(np.abs(a).max()) if key == "opt_state" else 1.0)
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=f"{key}{path}")
  # The steps did move the weights (the comparison is not of two untouched states).
  init = trainer.init_state(MODEL, trainer.make_optimizer(CFG), CFG, jax.random.key(0),
                            num_classes=NUM_CLASSES)
  change = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(init["params"])))
  assert change > CFG.learning_rate


def test_per_example_loss_is_the_batched_model():
  """The per-example (vmapped) loss runs the model as batched ops: the same number of
  convolutions and matmul FLOPs as one batched forward pass, and no loop over examples."""
  tx = trainer.make_optimizer(CFG)
  state = trainer.init_state(MODEL, tx, CFG, jax.random.key(0), num_classes=NUM_CLASSES)
  batch = _batches(8, 1)[0]
  step_key = jax.random.key(1)
  example = {"x": jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0,
             "label": jnp.asarray(batch["label"]),
             "key": jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(8))}
  per_example = functools.partial(
      trainer._example_loss,  # pylint: disable=protected-access
      model=MODEL, logsnr_fn=LOGSNR, cfg=CFG, num_classes=NUM_CLASSES)
  vmapped = lambda p: jax.vmap(per_example, (None, 0))(p, example)
  batched = lambda p: MODEL.apply({"params": p}, example["x"], jnp.zeros((8,)),
                                  label=example["label"], train=True,
                                  rngs={"dropout": step_key})
  assert jaxpr_flops(vmapped, state["params"]) == jaxpr_flops(batched, state["params"]) > 0

  def primitives(fn):
    names = []

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for v in eqn.params.values():
          for j in (v if isinstance(v, (list, tuple)) else [v]):
            inner = getattr(j, "jaxpr", None)
            if inner is not None:
              walk(getattr(inner, "jaxpr", inner))
    walk(jax.make_jaxpr(fn)(state["params"]).jaxpr)
    return names

  got, want = primitives(vmapped), primitives(batched)
  assert got.count("conv_general_dilated") == want.count("conv_general_dilated") > 0
  assert not {"scan", "while", "map"} & set(got)


def test_grad_accum_must_divide_the_batch():
  with pytest.raises(UserError, match="Train.batch_size=6 is not divisible by Train.grad_accum=4"):
    trainer.TrainConfig(batch_size=6, grad_accum=4)
  with pytest.raises(UserError, match="Train.grad_accum=0 must be at least 1"):
    trainer.TrainConfig(grad_accum=0)
