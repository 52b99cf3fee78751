"""Speed and memory options that keep the model's function (issue 29): each one gives the same
outputs and gradients as the reference path, to float tolerance, on a tiny CPU model."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import sampling
from core.errors import UserError
from core.models import UNet, UViT
from core.models.layers import Dropout, Upsample, upsample_impl
from core.models.precast import precast_params
from core.models.transformer import TransformerStack, dot_product_attention, pallas_attention
from tests.test_models import TINY_UNET, TINY_UVIT, perturb, random_params


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  gin.clear_config()
  yield
  gin.clear_config()


def _value_and_grad(model, params, *args, **kw):
  """Compiled (loss, grads) of a train-mode forward with dropout, and the compiled temp bytes."""

  def loss(p):
    v = model.apply({"params": p}, *args, train=True, rngs={"dropout": jax.random.key(3)}, **kw)
    return jnp.mean(jnp.square(v - 0.3))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  value, grads = compiled(params)
  return float(value), grads, compiled.memory_analysis().temp_size_in_bytes


def _assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_remat_policies_keep_outputs_and_gradients_and_minimal_keeps_less():
  """remat_policy 'minimal' / 'full' recompute what 'none' stores: same loss and gradients (with
  dropout on, so the saved or redrawn masks must agree), and 'minimal' compiles to fewer
  temporary bytes than 'none' (the transformer's stash), 'full' to no more than 'minimal'."""
  model = UViT(**{**TINY_UVIT, "num_transformer_blocks": 2}, attn_resolutions=(8,),
               transformer_dropout=0.3, dropout=0.2, dropout_from_resolution=8)
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([-2.0, 3.0])
  params = random_params(model, z, logsnr)
  out = {pol: _value_and_grad(model.clone(remat_policy=pol), params, z, logsnr)
         for pol in ("none", "minimal", "full")}
  loss, grads, temp = out["none"]
  assert loss > 0
  for pol in ("minimal", "full"):
    assert out[pol][0] == pytest.approx(loss, rel=1e-6)
    _assert_trees_close(out[pol][1], grads, rtol=1e-5, atol=1e-6)
  assert out["minimal"][2] < temp and out["full"][2] <= out["minimal"][2], \
      {p: o[2] for p, o in out.items()}
  # remat=True alone still means full remat of the transformer (the old switch).
  assert model.clone(remat=True).remat_policy is None
  with pytest.raises(UserError, match="remat_policy='some' is unknown"):
    jax.eval_shape(model.clone(remat_policy="some").init, jax.random.key(0), z, logsnr)


def test_named_dropout_is_flax_dropout_bit_for_bit():
  """The dropout whose mask a remat policy can keep draws the same mask as flax's nn.Dropout
  (same module name, same random stream): checkpoints and runs keep their dropout."""
  def block(cls):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        return cls(0.3, deterministic=False)(nn.Dense(8)(x))
    return Block()

  x = jax.random.normal(jax.random.key(0), (4, 5, 8))
  p = block(nn.Dropout).init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2)}
  theirs = block(nn.Dropout).apply(p, x, rngs=rngs)
  ours = block(Dropout).apply(p, x, rngs=rngs)
  assert 0 < int(jnp.sum(theirs == 0)) < theirs.size
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_transposed_upsampling_is_nearest_then_conv():
  """upsample_impl='transposed' (one stride-2 transposed conv, folded 4x4 kernel) is the same
  function as nearest x2 then the 3x3 conv, with the same parameters (names, shapes, initial
  values): equal outputs and gradients in float32, at a non-square map with borders."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  near, trans = Upsample(4, impl="nearest"), Upsample(4, impl="transposed")
  p = near.init(jax.random.key(1), x)
  p_t = trans.init(jax.random.key(1), x)
  _assert_trees_close(p_t, p, rtol=0, atol=0)                     # same init, same tree
  p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), p)
  y = near.apply(p, x)
  assert y.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(np.asarray(trans.apply(p, x)), np.asarray(y), rtol=1e-5, atol=1e-5)
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(p, x)
  _assert_trees_close(grad(trans), grad(near), rtol=1e-4, atol=1e-5)
  # bfloat16 compute: the folded kernel is summed in float32, then rounded once.
  y16 = Upsample(4, jnp.bfloat16, "transposed").apply(p, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_models_with_transposed_upsampling_equal_nearest(arch):
  """Whole models: outputs and parameter gradients with either upsampling path agree."""
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([-2.0, 3.0])
  model = (UNet(**TINY_UNET) if arch == "unet" else UViT(**TINY_UVIT)).clone(
      upsample_impl="nearest")
  params = random_params(model, z, logsnr)
  ref = _value_and_grad(model, params, z, logsnr)
  got = _value_and_grad(model.clone(upsample_impl="transposed"), params, z, logsnr)
  assert got[0] == pytest.approx(ref[0], rel=1e-5)
  _assert_trees_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
  assert upsample_impl("auto") == "nearest"       # this CPU; 'transposed' on GPU / TPU
  with pytest.raises(UserError, match="upsample_impl='bilinear' is unknown"):
    jax.eval_shape(model.clone(upsample_impl="bilinear").init, jax.random.key(0), z, logsnr)


def test_pallas_attention_equals_reference_in_interpret_mode():
  """attention_impl='pallas' (the Triton flash-attention kernel, Pallas interpret mode on this
  CPU) gives XLA's softmax(q k^T s) v and its gradients; with a key mask, or lengths its tiles do
  not divide, it takes XLA's path."""
  b, t, heads, d = 2, 32, 2, 24                  # head size 24: the kernel pads it to 32
  q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, d)) for i in range(3))
  scale = d ** -0.5
  gin.bind_parameter("pallas_attention.block_q", 16)
  gin.bind_parameter("pallas_attention.block_k", 16)
  gin.bind_parameter("pallas_attention.block_backward", 8)
  assert pallas_attention(q, k, v, scale) is not None
  fn = lambda impl: (lambda q, k, v: dot_product_attention(q, k, v, scale, impl))
  ref = fn("xla")(q, k, v)
  np.testing.assert_allclose(np.asarray(fn("pallas")(q, k, v)), np.asarray(ref), rtol=1e-5,
                             atol=1e-5)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  _assert_trees_close(grad(fn("pallas")), grad(fn("xla")), rtol=1e-4, atol=1e-5)
  mask = jnp.arange(t)[None, :] < jnp.array([[20], [32]])
  masked = dot_product_attention(q, k, v, scale, "pallas", mask)
  np.testing.assert_array_equal(np.asarray(masked),
                                np.asarray(dot_product_attention(q, k, v, scale, "xla", mask)))
  assert pallas_attention(q[:, :24], k[:, :24], v[:, :24], scale) is None   # 24 % 16 != 0


def test_transformer_stack_with_pallas_attention_equals_xla():
  """The scanned transformer blocks with the Pallas kernel: same outputs and gradients."""
  gin.bind_parameter("pallas_attention.block_q", 16)
  gin.bind_parameter("pallas_attention.block_k", 16)
  gin.bind_parameter("pallas_attention.block_backward", 16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  emb = jax.random.normal(jax.random.key(1), (2, 8))
  stack = TransformerStack(2, 2, attention_impl="xla")
  p = perturb(stack.init(jax.random.key(2), x, emb))

  def run(impl):
    f = lambda p, x: jnp.sum(jnp.sin(stack.clone(attention_impl=impl).apply(p, x, emb)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x)

  (y_ref, g_ref), (y, g) = run("xla"), run("pallas")
  assert float(y) == pytest.approx(float(y_ref), rel=1e-5)
  _assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_sampler_with_weights_cast_once_is_bit_identical(arch):
  """precast_params casts the kernels of the Dense / Conv / Embed layers (which cast them at
  every call) to bfloat16 once, before the sampler's loop: identical samples, bit for bit, from
  a program with fewer converts. Norm parameters and the folded up-sampling kernel stay
  float32."""
  kw = dict(dtype="bfloat16", num_classes=5, upsample_impl="transposed")
  if arch == "unet":
    model = UNet(**TINY_UNET, **kw)
  else:
    model = UViT(**TINY_UVIT, **kw, attn_resolutions=(8,))
  shape = (2, 16, 16, 3)
  params = random_params(model, jnp.zeros(shape), jnp.zeros((2,)))
  cast = precast_params(model, params, shape[1:])
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
  assert any(k.endswith("['kernel']") and d == jnp.bfloat16 for k, d in dtypes.items())
  assert dtypes["['cond']['class_emb']['embedding']"] == jnp.bfloat16
  assert all(d == jnp.float32 for k, d in dtypes.items() if "norm" in k or "up0_resample" in k)
  labels = jnp.array([1, 3])
  logsnr_fn = lambda t: 10.0 - 20.0 * t

  def sample(p):
    model_fn = lambda z, logsnr, c: model.apply({"params": p}, z, logsnr, label=c)
    v_fn = sampling.guided_v_fn(model_fn, labels, jnp.full_like(labels, 5), 1.5)
    return sampling.ddpm_sample(v_fn, jax.random.key(0), shape, logsnr_fn=logsnr_fn, num_steps=3)

  a, b = jax.jit(sample).lower(params), jax.jit(sample).lower(cast)
  np.testing.assert_array_equal(np.asarray(b.compile()(cast)), np.asarray(a.compile()(params)))
  converts = lambda lowered: lowered.as_text().count("stablehlo.convert")
  assert converts(b) < converts(a)


def stack_unet_levels(model, params):
  """Unrolled U-Net parameters (down<i>_block<j>[_attn]) -> the scan_blocks layout
  (down<i>_blocks / up<i>_blocks: {'block': stacked, 'attn': stacked})."""
  out = {k: v for k, v in params.items() if "_block" not in k or k.startswith("mid")}
  for i, n in enumerate(model.num_res_blocks):
    for path, count in (("down", n), ("up", n + 1)):
      names = [f"{path}{i}_block{j}" for j in range(count)]
      if not count:
        continue
      level = {"block": jax.tree.map(lambda *a: jnp.stack(a), *[params[k] for k in names])}
      if names[0] + "_attn" in params:
        level["attn"] = jax.tree.map(lambda *a: jnp.stack(a),
                                     *[params[k + "_attn"] for k in names])
      out[f"{path}{i}_blocks"] = level
  return out


def test_unet_scan_blocks_equals_unrolled_blocks():
  """scan_blocks=True (one nn.scan per level and path) is the unrolled U-Net with its block
  parameters stacked: same outputs and gradients; attention levels and dropout levels included."""
  model = UNet(**{**TINY_UNET, "num_res_blocks": (2, 1, 3)}, dropout=0.2,
               dropout_from_resolution=8)
  scanned = model.clone(scan_blocks=True)
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([0.5, -1.0])
  params = random_params(model, z, logsnr)
  stacked = stack_unet_levels(model, params)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), z, logsnr)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  assert {"block", "attn"} == set(stacked["down1_blocks"]) and "attn" not in stacked["up2_blocks"]

  def run(m, p):
    loss = lambda p: jnp.mean(jnp.square(m.apply({"params": p}, z, logsnr) - 0.3))
    return jax.jit(jax.value_and_grad(loss))(p)

  (y_ref, g_ref), (y, g) = run(model, params), run(scanned, stacked)
  assert float(y) == pytest.approx(float(y_ref), rel=1e-5)
  _assert_trees_close(g, stack_unet_levels(model, g_ref), rtol=1e-4, atol=1e-6)
  # Selective remat of the scanned blocks (keep conv and projection outputs): same again.
  y_min, g_min = run(scanned.clone(remat_policy="minimal"), stacked)
  assert float(y_min) == pytest.approx(float(y_ref), rel=1e-5)
  _assert_trees_close(g_min, g, rtol=1e-4, atol=1e-6)
  # Training mode (dropout drawn per scanned block) runs and differs from evaluation mode.
  v = jax.jit(lambda p: scanned.apply({"params": p}, z, logsnr, train=True,
                                      rngs={"dropout": jax.random.key(1)}))(stacked)
  assert v.shape == z.shape and not np.allclose(np.asarray(v), np.asarray(
      scanned.apply({"params": stacked}, z, logsnr)))
