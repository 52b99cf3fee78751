"""Blocks, U-Net and U-ViT behaviour: zero-init identities, dropout placement, scan, dtypes."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import UserError
from core.models import UNet, UViT
from core.models.conditioning import (
    Conditioning, logsnr_features, sinusoidal_features)
from core.models.layers import GroupNorm, ResBlock, dropout_rate, group_norm
from core.models.transformer import MLPBlock, TransformerBlock

@pytest.fixture(autouse=True)
def _no_gin_bindings():
  """UNet/UViT are gin-configurable: bindings left by other tests must not leak into these."""
  gin.clear_config()
  yield
  gin.clear_config()


TINY_UNET = dict(base_channels=8, emb_channels=16, channel_multiplier=(1, 2, 2),
                 num_res_blocks=(1, 1, 1), attn_resolutions=(8,), num_heads=2)
TINY_UVIT = dict(base_channels=8, emb_channels=16, channel_multiplier=(1, 2, 2, 4),
                 num_res_blocks=(1, 1, 1), num_transformer_blocks=3, num_heads=2)


def perturb(params, scale=0.2, seed=0):
  """Adds noise to every parameter so zero-initialised output layers stop hiding the rest."""
  rng = np.random.default_rng(seed)   # numpy: per-shape jax.random calls compile one by one
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def random_params(model, *args, seed=0, **kw):
  """Random, non-zero parameters of model's shapes (jax.eval_shape: no init compilation).

  Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases and embeddings ~ N(0, 0.1^2):
  every zero-initialised output layer is switched on, so every path affects the output.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kw)["params"]
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = str(path[-1].key)
    n = rng.standard_normal(leaf.shape, np.float32)
    if name == "kernel":
      stacked = "blocks" in str(path)
      fan_in = int(np.prod(leaf.shape[1 if stacked else 0:-1]))
      out.append(n / np.sqrt(fan_in))
    elif name == "scale":
      out.append(1.0 + 0.1 * n)
    else:
      out.append(0.1 * n)
  return jax.tree.unflatten(tree, [jnp.asarray(a) for a in out])


def test_fresh_resblock_and_transformer_block_are_identity():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  emb = jax.random.normal(jax.random.key(2), (2, 32))
  skip = jax.random.normal(jax.random.key(3), (2, 8, 8, 16))
  rb = ResBlock(16, dropout=0.1)
  y, p = jax.jit(rb.init_with_output)(jax.random.key(0), x, emb, skip)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  tokens = x.reshape(2, 64, 16)
  text = jax.random.normal(jax.random.key(4), (2, 5, 16))
  tb = TransformerBlock(num_heads=2, dropout=0.2, cross_attention=True)
  y, p = jax.jit(tb.init_with_output)(jax.random.key(0), tokens, emb, text)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(tokens))
  # ... and not the identity once their weights move away from the zero init.
  y2 = jax.jit(tb.apply)(perturb(p), tokens, emb, text)
  assert not np.allclose(np.asarray(y2), np.asarray(tokens))
  # A ResBlock that changes width projects the residual with a 1x1 layer.
  prb = jax.eval_shape(ResBlock(12).init, jax.random.key(0), x, emb)
  assert prb["params"]["skip_proj"]["kernel"].shape == (16, 12)


def _dropout_activity(model, params, z, logsnr, **kw):
  """Runs every ResBlock / MLPBlock a second time on the same input with a fresh dropout rng.

  Returns [(module kind, resolution, max |out1 - out2|)]: a difference means the block's own
  dropout is active (upstream blocks cannot cause it: both calls see the same input).
  """
  meta = []

  def run(params, rng):
    diffs, busy = [], []

    def icpt(next_fun, args, kwargs, context):
      mod = context.module
      if (context.method_name == "__call__" and isinstance(mod, (ResBlock, MLPBlock))
          and not busy):
        out1 = next_fun(*args, **kwargs)
        busy.append(True)
        out2 = mod.clone(parent=None).apply({"params": mod.variables["params"]}, *args,
                                            rngs={"dropout": mod.make_rng("dropout")}, **kwargs)
        busy.pop()
        x = args[0]
        res = x.shape[1] if isinstance(mod, ResBlock) else int(round(x.shape[1] ** 0.5))
        meta.append((type(mod).__name__, res))
        diffs.append(jnp.max(jnp.abs(out1 - out2)))
        return out1
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      model.apply({"params": params}, z, logsnr, train=True, rngs={"dropout": rng}, **kw)
    return diffs

  diffs = jax.jit(run)(params, jax.random.key(7))
  return [(kind, res, float(d)) for (kind, res), d in zip(meta, diffs)]


def test_unet_dropout_exactly_at_resolutions_up_to_setting():
  z = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  logsnr = jnp.array([1.0])
  label = jnp.array([2])
  m = UNet(**TINY_UNET, dropout=0.5, dropout_from_resolution=8, num_classes=5)
  params = random_params(m, z, logsnr, label=label)
  rows = _dropout_activity(m, params, z, logsnr, label=label)
  assert sorted({r for _, r, _ in rows}) == [4, 8, 16]
  # a down + (a+1) up per level, plus the middle block's two ResBlocks at the bottom (4x4)
  assert len(rows) == 3 + 6 + 2
  assert [r for _, r, _ in rows].count(4) == 1 + 2 + 2
  for _, res, diff in rows:
    assert (diff > 0) == (res <= 8), (res, diff)


def test_uvit_dropout_transformer_and_resolution_gated_resblocks():
  z = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  logsnr = jnp.array([1.0])
  m = UViT(**TINY_UVIT, transformer_dropout=0.3, dropout=0.5, dropout_from_resolution=8,
           scan=False)
  params = random_params(m, z, logsnr)
  rows = _dropout_activity(m, params, z, logsnr)
  mlp = [r for r in rows if r[0] == "MLPBlock"]
  res_blocks = [r for r in rows if r[0] == "ResBlock"]
  assert len(mlp) == 3 and all(d > 0 for _, _, d in mlp)       # transformer_dropout everywhere
  assert len(res_blocks) == 6
  for _, res, diff in res_blocks:
    assert (diff > 0) == (res <= 8), (res, diff)


def _group_standardised(x, groups, eps=1e-5):
  """Closed form of GroupNorm before its scale and bias (numpy): per example and group of
  channels, over all positions, (x - mean) / sqrt(var + eps)."""
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)


def test_group_norm_max_groups_keeps_a_1x1_level_alive():
  """At width 32 on 1x1 feature maps (the demo U-Net's lowest level), the paper's 32 groups
  normalise one value each, so the norm outputs its bias whatever the input; with
  group_norm.max_groups = 8 (gin/scales/demo.gin) it is the closed-form standardisation over
  groups of 4 channels, and depends on the input."""
  x = np.random.default_rng(0).standard_normal((3, 1, 1, 32)).astype(np.float32) * 3.0 + 1.0

  def apply(max_groups=None):
    norm = group_norm(32, jnp.float32) if max_groups is None else group_norm(
        32, jnp.float32, max_groups=max_groups)
    params = norm.init(jax.random.key(0), x)
    return np.asarray(norm.apply(params, x)), np.asarray(norm.apply(params, x[::-1] * 2.0))

  paper, paper_other = apply()
  np.testing.assert_array_equal(paper, 0.0)         # init bias 0: a constant, input discarded
  np.testing.assert_array_equal(paper_other, 0.0)
  for groups in (8, 1):
    out, other = apply(groups)
    np.testing.assert_allclose(out, _group_standardised(x, groups), atol=1e-5)
    assert np.abs(out - other[::-1]).max() < 1e-4 and np.abs(out).max() > 0.5   # scale-free
  gin.parse_config("group_norm.max_groups = 8")
  out, _ = apply()                                   # the gin binding reaches every call site
  np.testing.assert_allclose(out, _group_standardised(x, 8), atol=1e-5)
  with pytest.raises(UserError, match="max_groups=0 must be an integer >= 1"):
    group_norm(32, jnp.float32, max_groups=0)


@pytest.mark.parametrize("shape,groups,dtype", [
    ((4, 16, 16, 16), 8, jnp.float32), ((3, 1, 1, 32), 32, jnp.float32),
    ((2, 5, 64), 4, jnp.float32), ((4, 8, 8, 32), 8, jnp.bfloat16)])
def test_group_norm_equals_flax_group_norm(shape, groups, dtype):
  """layers.GroupNorm (two-stage reduction) is flax.linen.GroupNorm: the same parameter tree,
  the same outputs (to float32 rounding) and gradients, in float32 and bfloat16."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 3.0 + 1.0).astype(dtype)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  ours = GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape,
                                                                                   params)
  params = jax.tree.map(lambda p: p + rng.standard_normal(p.shape).astype(np.float32), params)
  want, got = ref.apply(params, x), ours.apply(params, x)
  assert got.dtype == want.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=1e-5 if dtype == jnp.float32 else 2e-2)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  g_want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  g_got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  if dtype == jnp.float32:
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)


def test_dropout_rate_rule():
  assert dropout_rate(16, 0.1, 16) == 0.1 and dropout_rate(8, 0.1, 16) == 0.1
  assert dropout_rate(32, 0.1, 16) == 0.0 and dropout_rate(8, 0.1, None) == 0.0


def test_scan_matches_unrolled_loop_and_bfloat16_path():
  """nn.scan over stacked params == unrolled blocks (+remat); bf16 compute returns float32."""
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([-2.0, 4.0])
  text = jax.random.normal(jax.random.key(1), (2, 4, 24))
  # conv_2 patching, conv levels at 8 (transformer blocks, attn_resolutions) and 4, text
  # cross-attention, transformer at 2x2.
  scanned = UViT(**{**TINY_UVIT, "channel_multiplier": (1, 2, 4), "num_res_blocks": (1, 1)},
                 patching_type="conv_2", text_channels=16, attn_resolutions=(8,), scan=True)
  unrolled = scanned.clone(scan=False, remat=True)
  p = random_params(scanned, z, logsnr, text_emb=text)
  assert "text_proj" in p and "cross_attn" in p["down0_block0"]["block"]
  stacked = p["transformer"]["blocks"]["block"]
  n = scanned.num_transformer_blocks
  assert all(a.shape[0] == n for a in jax.tree.leaves(stacked))
  p_unrolled = dict(p)
  p_unrolled["transformer"] = {f"block_{i}": jax.tree.map(lambda a: a[i], stacked)
                               for i in range(n)}
  ref_shapes = jax.eval_shape(unrolled.init, jax.random.key(0), z, logsnr,
                              text_emb=text)["params"]
  assert jax.tree.structure(ref_shapes) == jax.tree.structure(p_unrolled)
  apply = lambda m: jax.jit(lambda p: m.apply({"params": p}, z, logsnr, text_emb=text))
  y_scan = apply(scanned)(p)
  y_loop = apply(unrolled)(p_unrolled)
  assert y_scan.shape == z.shape and float(jnp.abs(y_scan).max()) > 0
  np.testing.assert_allclose(np.asarray(y_scan), np.asarray(y_loop), rtol=1e-4, atol=1e-4)
  # bfloat16 compute, float32 parameters: same params, float32 output close to float32 compute.
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
  y16 = apply(scanned.clone(dtype="bfloat16", remat=True))(p)     # remat inside the scan too
  assert y16.dtype == jnp.float32 and y16.shape == z.shape
  err = float(jnp.abs(y16 - y_scan).max()) / float(jnp.abs(y_scan).max())
  assert 0 < err < 0.1, err


@pytest.mark.parametrize("model", [
    UNet(**TINY_UNET, remat=True, dropout_from_resolution=8),
    UViT(**TINY_UVIT, remat=True, scan=True, dropout=0.1, dropout_from_resolution=8),
], ids=["unet", "uvit"])
def test_remat_models_differentiate(model):
  """Gradients trace through nn.remat'd blocks (shapes only: jax.eval_shape, no compile)."""
  z = jnp.zeros((2, 16, 16, 3))
  logsnr = jnp.zeros((2,))
  params = jax.eval_shape(model.init, jax.random.key(0), z, logsnr)["params"]

  def loss(p):
    v = model.apply({"params": p}, z, logsnr, train=True, rngs={"dropout": jax.random.key(0)})
    return jnp.mean(v ** 2)

  grads = jax.eval_shape(jax.grad(loss), params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_class_conditioning_null_class_and_unconditional():
  cond = Conditioning(emb_channels=16, feature_dim=8, num_classes=5)
  logsnr = jnp.array([0.0, 3.0])
  p = perturb(cond.init(jax.random.key(0), logsnr, jnp.array([0, 1]), 2))
  assert p["params"]["class_emb"]["embedding"].shape == (6, 16)   # num_classes + null
  null = cond.apply(p, logsnr, jnp.array([5, 5]), 2)
  np.testing.assert_array_equal(np.asarray(cond.apply(p, logsnr, None, 2)), np.asarray(null))
  assert not np.allclose(np.asarray(cond.apply(p, logsnr, jnp.array([1, 2]), 2)),
                         np.asarray(null))
  unc = Conditioning(emb_channels=16, feature_dim=8, num_classes=0)
  pu = unc.init(jax.random.key(0), logsnr, None, 2)
  assert "class_emb" not in pu["params"]
  np.testing.assert_array_equal(np.asarray(unc.apply(pu, logsnr, jnp.array([3, 4]), 2)),
                                np.asarray(unc.apply(pu, logsnr, None, 2)))


def test_logsnr_features():
  lo, hi = -17.0, 13.0
  f = logsnr_features(jnp.array([lo, hi]), 8, "linear", (lo, hi))
  np.testing.assert_allclose(np.asarray(f), np.asarray(sinusoidal_features(
      jnp.array([0.0, 1000.0]), 8)), atol=2e-4)
  np.testing.assert_allclose(np.asarray(f[0]), [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-6)
  g = logsnr_features(jnp.array([0.0]), 8, "inv_cos")           # logSNR 0 <-> cosine t = 1/2
  np.testing.assert_allclose(np.asarray(g), np.asarray(sinusoidal_features(jnp.array([500.0]), 8)),
                             atol=1e-4)
  with pytest.raises(UserError, match="logsnr_input_type"):
    logsnr_features(jnp.array([0.0]), 8, "cosine")


def test_call_errors_name_the_setting():
  z = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(UserError, match="text_emb"):
    jax.eval_shape(UViT(**TINY_UVIT, text_channels=8).init, jax.random.key(0), z, jnp.zeros((1,)))
  with pytest.raises(UserError, match="cross-attention"):
    jax.eval_shape(UNet(**TINY_UNET).init, jax.random.key(0), z, jnp.zeros((1,)),
                   text_emb=jnp.zeros((1, 2, 4)))
  with pytest.raises(UserError, match="num_heads"):
    jax.eval_shape(UNet(**{**TINY_UNET, "num_heads": 3}).init, jax.random.key(0), z,
                   jnp.zeros((1,)))
