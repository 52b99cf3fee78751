"""Text to image (Table 8, Figure 8, section 5): text mask, null text, portrait flag, H x W
sampling, sampling from captions, CLIP score, the Table 8 / Figure 8 outputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import schedules
from core import trainer as train_lib
from core.models.uvit import UViT
from eval import sample as sample_lib

T, D = 6, 12   # text tokens, text embedding width


def tiny_uvit(**kw) -> UViT:
  args = dict(base_channels=8, emb_channels=16, channel_multiplier=(1, 2, 2), num_res_blocks=(1, 1),
              num_transformer_blocks=1, num_heads=2, transformer_dropout=0.0, text_channels=8,
              patching_type="dwt_1", attn_resolutions=(), num_classes=0)
  args.update(kw)
  return UViT(**args)


def randomized(params, seed=0, scale=0.2):
  """Every parameter drawn at random (the zero-initialised output layers would hide the text)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, l.shape) for k, l in
                                   zip(keys, leaves)])


def _init(model, hw=(16, 16)):
  z = jnp.zeros((2, *hw, 3))
  params = model.init(jax.random.key(0), z, jnp.zeros((2,)), text_emb=jnp.zeros((2, T, D)),
                      text_mask=jnp.ones((2, T), bool))["params"]
  return randomized(params)


def test_text_mask_keeps_padding_out_of_cross_attention():
  model = tiny_uvit(attn_resolutions=(4,))  # cross-attention in a conv level and the transformer
  params = _init(model)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  logsnr = jnp.array([0.5, -1.0])
  emb = rng.normal(size=(2, T, D)).astype(np.float32)
  mask = np.zeros((2, T), bool)
  mask[0, :2], mask[1, :4] = True, True
  other = emb.copy()
  other[~mask] = rng.normal(size=other[~mask].shape)  # change only the padding
  f = lambda e, m: model.apply({"params": params}, z, logsnr, text_emb=jnp.asarray(e), text_mask=m)
  np.testing.assert_allclose(f(emb, mask), f(other, mask), atol=1e-5)
  # Without the mask the padding is attended: the same change moves the output.
  assert float(jnp.abs(f(emb, None) - f(other, None)).max()) > 1e-3
  # And the real tokens matter under the mask.
  changed = emb.copy()
  changed[0, 0] = rng.normal(size=D)  # (a constant shift would vanish in the LayerNorm)
  assert float(jnp.abs(f(changed, mask) - f(emb, mask))[0].max()) > 1e-3


def test_null_text_is_no_cross_attention():
  """An all-False mask (the null text) = the same model with every cross-attention output zeroed."""
  model = tiny_uvit(attn_resolutions=(4,))
  params = _init(model)
  z = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  logsnr = jnp.array([0.0, 2.0])
  emb, mask = train_lib.null_text(jax.random.normal(jax.random.key(2), (2, T, D)),
                                  jnp.ones((2, T), bool), jnp.ones((2,), bool))
  assert not bool(mask.any()) and float(jnp.abs(emb).max()) == 0.0
  got = model.apply({"params": params}, z, logsnr, text_emb=emb, text_mask=mask)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", None) == "cross_attn" for k in path)
      and getattr(path[-2], "key", None) == "out" else x, params)
  n_zeroed = sum(int(jnp.all(a == 0)) for a in jax.tree.leaves(zeroed)) - sum(
      int(jnp.all(a == 0)) for a in jax.tree.leaves(params))
  assert n_zeroed >= 4  # out kernel and bias of the conv-level and transformer cross-attentions
  want = model.apply({"params": zeroed}, z, logsnr, text_emb=emb, text_mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_trainer_drops_text_to_the_null_text():
  """Dropped examples get zero embeddings and an all-False mask; the others are untouched."""
  emb = np.random.default_rng(0).normal(size=(4, T, D)).astype(np.float32)
  mask = np.ones((4, T), bool)
  mask[:, 3:] = False
  drop = jnp.array([True, False, True, False])
  e, m = train_lib.null_text(emb, mask, drop)
  np.testing.assert_array_equal(np.asarray(e)[[1, 3]], emb[[1, 3]])
  assert float(jnp.abs(e[jnp.array([0, 2])]).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(m), mask & ~np.asarray(drop)[:, None])
