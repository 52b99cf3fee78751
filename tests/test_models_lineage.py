"""Model choices taken from the authors' code lineage: logSNR input types, the U-Net middle block
and attention layer, the U-ViT's per-block vs shared scale/shift projection (closed-form parameter
counts) and the position embedding of its attention-only conv levels."""
from __future__ import annotations

import math
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from core import config as config_lib
from core import schedules
from core.models import UNet, UViT, make_model
from core.models.layers import Downsample
from core.models.unet import SpatialAttention
from core.models.uvit import SpatialTransformerBlock
from core.models.conditioning import LOGSNR_INPUT_TYPES, logsnr_features, logsnr_to_unit
from core.models.flops import forward_flops
from tests.jaxpr_flops import jaxpr_flops
from core.models.summary import count_params, example_inputs, param_shapes
from experiments import jobs, registry
from tests.test_models import TINY_UNET, TINY_UVIT, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  gin.clear_config()
  yield
  gin.clear_config()


def _ddpm_embedding(u: np.ndarray, dim: int) -> np.ndarray:
  """The lineage's get_timestep_embedding(u, dim, max_time=1): sin/cos of 1000 u f_k, numpy."""
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  args = 1000.0 * np.asarray(u, np.float64)[:, None] * freqs[None]
  return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def test_logsnr_input_types_are_the_lineages():
  """u in [0, 1] by the lineage's three maps, then the DDPM timestep embedding of 1000 u."""
  assert set(LOGSNR_INPUT_TYPES) == {"linear", "sigmoid", "inv_cos"}
  lo, hi = -19.1589, 10.8411
  l = np.array([lo, -7.3, 0.0, 2.5, hi], np.float32)
  want = {"linear": (l - lo) / (hi - lo), "sigmoid": expit(l.astype(np.float64))}
  # inv_cos inverts the unshifted cosine schedule logsnr(t) = -2 log tan(pi t / 2).
  t = np.array([0.05, 0.3, 0.5, 0.8, 0.95])
  cos_logsnr = (-2.0 * np.log(np.tan(np.pi * t / 2))).astype(np.float32)
  np.testing.assert_allclose(np.asarray(logsnr_to_unit(cos_logsnr, "inv_cos")), t, atol=1e-6)
  want["inv_cos"] = t
  for kind, u in want.items():
    x = cos_logsnr if kind == "inv_cos" else l
    np.testing.assert_allclose(np.asarray(logsnr_to_unit(x, kind, (lo, hi))), u, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logsnr_features(x, 16, kind, (lo, hi))),
                               _ddpm_embedding(u, 16), atol=2e-3)   # float32 args up to 1000


def test_unet_embeds_linear_logsnr_over_the_schedule_range_by_default():
  """The U-Net's first conditioning layer sees the embedding of (logsnr - lo) / (hi - lo), not of
  the raw logSNR (the old behaviour)."""
  assert UNet.logsnr_input_type == "linear" and UViT.logsnr_input_type == "linear"
  lo, hi = -16.3863, 13.6137
  m = UNet(**TINY_UNET, logsnr_range=(lo, hi))
  z = jnp.zeros((3, 16, 16, 3))
  logsnr = jnp.array([lo, -2.0, hi])
  params = random_params(m, z, logsnr)
  _, state = m.apply({"params": params}, z, logsnr, capture_intermediates=True)
  dense0 = np.asarray(state["intermediates"]["cond"]["logsnr_dense0"]["__call__"][0])
  w = params["cond"]["logsnr_dense0"]
  feats = _ddpm_embedding((np.asarray(logsnr) - lo) / (hi - lo), TINY_UNET["base_channels"])
  np.testing.assert_allclose(dense0, feats @ np.asarray(w["kernel"]) + np.asarray(w["bias"]),
                             atol=2e-3)


@pytest.mark.parametrize("table,group,row,image_d,noise_d", [
    ("2", "128x128", "cosine (shifted to 32)", 128, 32),
    ("2", "256x256", "cosine (original at 256)", 256, 256),
    ("5", "512x512", "DWT-2", 512, 64),
    ("1024", "1024x1024", "U-Net 4x4 patching", 1024, 64),
])
def test_paper_unet_jobs_span_the_shifted_range(table, group, row, image_d, noise_d):
  """Every U-Net run binds 'linear' over its own (shifted) schedule's range: appendix A."""
  job = next(j for j in registry.jobs(registry.select(table))
             if any(e.group == group and e.row == row for e in j.entries))
  args = jobs.job_args(job, "paper", "unused", None)
  config_lib.parse([a.split("=", 1)[1] for a in args if a.startswith("gin_file=")],
                   [a for a in args if not a.startswith(("gin_file=", "workdir="))])
  model = make_model()
  shift = 2 * math.log(noise_d / image_d)
  assert model.logsnr_input_type == "linear" and model.middle_block
  np.testing.assert_allclose(model.logsnr_range, (-15 + shift, 15 + shift), atol=1e-4)
  np.testing.assert_allclose(model.logsnr_range, schedules.schedule_range(), atol=1e-9)


def _resblock_params(c: int, e: int) -> int:
  return 2 * c + (9 * c * c + c) + (2 * c * e + 2 * c) + 2 * c + (9 * c * c + c)


def _attention_params(c: int, heads: int) -> int:
  """The U-ViT's attention: LayerNorm scale, q k v, q / k LayerNorms (scale + bias), output."""
  return c + 3 * (c * c + c) + 2 * 2 * (c // heads) + (c * c + c)


def _unet_attention_params(c: int) -> int:
  """The U-Net's (the lineage's AttnBlock): GroupNorm scale + bias, q k v, output."""
  return 2 * c + 3 * (c * c + c) + (c * c + c)


def test_unet_middle_block_is_resblock_attention_resblock_at_the_bottom():
  """middle_block (default on) adds exactly two ResBlocks and one attention at the lowest level,
  whatever attn_resolutions says (the lineage's mid.block_1, mid.attn_1, mid.block_2)."""
  with_mid = UNet(**{**TINY_UNET, "attn_resolutions": ()})
  assert with_mid.middle_block
  p = param_shapes(with_mid, 16)
  assert {k for k in p if k.startswith("mid")} == {"mid_block0", "mid_attn", "mid_block1"}
  assert not any(k.endswith("_attn") and not k.startswith("mid") for k in p)
  c = TINY_UNET["base_channels"] * TINY_UNET["channel_multiplier"][-1]
  extra = 2 * _resblock_params(c, TINY_UNET["emb_channels"]) + _unet_attention_params(c)
  assert count_params(p) - count_params(param_shapes(with_mid.clone(middle_block=False), 16)) \
      == extra


def _uvit_params(shared: bool) -> int:
  """Closed form of the paper U-ViT 512 (B.2), per-block or shared (scale, shift) projection.

  Independent of the code: written from B.2 / B.2.1 (as tests/test_models_config.py's formula).
  """
  e, widths, blocks, heads, n_tf, tokens, patch = 1024, [128, 256, 512, 2048], 2, 4, 36, 256, 48
  cond = 128 * e + e + e * e + e + 1001 * e
  total = cond + (9 * patch * 128 + 128) + (2 * 128 + 9 * 128 * patch + patch)
  for i, c in enumerate(widths[:-1]):
    total += blocks * (2 * _resblock_params(c, e) + 2 * c)       # down + up (skip norm)
    total += 2 * (9 * c * widths[i + 1]) + widths[i + 1] + c       # resampling convs
  c = widths[-1]
  modulation = e * 8 * c + 8 * c
  mlp = c + (c * 4 * c + 4 * c) + (4 * c * c + c)
  block = mlp + _attention_params(c, heads)
  total += tokens * c + n_tf * block
  return total + (modulation if shared else n_tf * modulation)


@pytest.mark.parametrize("shared", [False, True])
def test_uvit_parameter_count_literal_and_shared_projection(shared):
  """Paper label "U-ViT 2B"; B.2.1 read literally gives 2.47B, the shared variant 1.89B."""
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", "uvit_imagenet512.gin"))
  model = make_model()
  assert model.shared_modulation is False                    # the literal reading is the default
  n = count_params(param_shapes(model.clone(shared_modulation=shared), 512))
  assert n == _uvit_params(shared)
  assert n == (1_886_431_792 if shared else 2_474_207_792)


def test_shared_projection_equals_literal_when_the_projections_agree():
  """shared_modulation=True is the literal model whose 36 (here 3) projections are tied."""
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([-3.0, 2.0])
  shared = UViT(**TINY_UVIT, shared_modulation=True, scan=False)
  literal = shared.clone(shared_modulation=False)
  p = random_params(shared, z, logsnr)
  proj = p["transformer"].pop("shared_emb_proj")
  for name, blk in p["transformer"].items():
    blk["mlp"]["emb_proj"] = proj
  y_literal = literal.apply({"params": p}, z, logsnr)
  p["transformer"]["shared_emb_proj"] = proj
  for blk in (v for k, v in p["transformer"].items() if k.startswith("block_")):
    del blk["mlp"]["emb_proj"]
  y_shared = shared.apply({"params": p}, z, logsnr)
  assert float(jnp.abs(y_shared).max()) > 0
  np.testing.assert_allclose(np.asarray(y_shared), np.asarray(y_literal), rtol=1e-5, atol=1e-5)


def test_flops_count_the_middle_block_and_the_shared_projection():
  """Analytic FLOPs equal the traced matmul FLOPs with either switch (one projection if shared)."""
  for model in (UNet(**TINY_UNET), UNet(**TINY_UNET, middle_block=False),
                UViT(**TINY_UVIT, shared_modulation=True),
                UViT(**TINY_UVIT, shared_modulation=True, scan=False)):
    params = param_shapes(model, 16)
    args = example_inputs(model, 16)
    traced = jaxpr_flops(lambda p, a, m=model: m.apply({"params": p}, **a), params, args)
    assert forward_flops(model, 16) == traced, model
  e, c, n = TINY_UVIT["emb_channels"], 8 * 4, TINY_UVIT["num_transformer_blocks"]
  literal = UViT(**TINY_UVIT)
  assert forward_flops(literal, 16) - forward_flops(literal.clone(shared_modulation=True), 16) \
      == (n - 1) * 2 * e * 8 * c


def _group_norm(x: np.ndarray, groups: int, scale, bias, eps=1e-5) -> np.ndarray:
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def test_unet_attention_is_the_lineages_attnblock():
  """U-Net attention = the lineage's AttnBlock (diffusion_distillation unet.py, ADM): GroupNorm
  with bias, q / k / v projections without q / k normalisation, softmax(q k^T / sqrt d) v, output
  projection, residual. Checked against a numpy forward pass with the module's own parameters."""
  b, hw, c, heads = 2, 4, 64, 2
  x = jax.random.normal(jax.random.key(0), (b, hw, hw, c)) * 3.0 + 1.0
  m = SpatialAttention(num_heads=heads)
  p = random_params(m, x)
  assert set(p) == {"norm", "attn"} and set(p["norm"]) == {"scale", "bias"}
  assert set(p["attn"]) == {"query", "key", "value", "out"}        # no q / k norms
  y = np.asarray(jax.jit(m.apply)({"params": p}, x), np.float64)
  n = {k: jax.tree.map(lambda a: np.asarray(a, np.float64), v) for k, v in p.items()}
  xn = np.asarray(x, np.float64)
  h = _group_norm(xn, 32, n["norm"]["scale"], n["norm"]["bias"]).reshape(b, hw * hw, c)
  proj = lambda w: np.einsum("btc,chd->bthd", h, w["kernel"]) + w["bias"]
  q, k, v = proj(n["attn"]["query"]), proj(n["attn"]["key"]), proj(n["attn"]["value"])
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(c // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshd->bthd", w, v)
  out = np.einsum("bthd,hdc->btc", o, n["attn"]["out"]["kernel"]) + n["attn"]["out"]["bias"]
  want = xn + out.reshape(b, hw, hw, c)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  # The U-Net's attention layers are this block (parameter tree of a whole model).
  pu = param_shapes(UNet(**TINY_UNET), 16)
  assert set(pu["mid_attn"]) == {"norm", "attn"} and "norm_q" not in pu["mid_attn"]["attn"]


def test_uvit_attention_only_level_gets_a_learned_position_embedding():
  """A conv level whose ResBlocks are replaced by transformer blocks (attn_resolutions, the text-
  to-image model's 32x32 level) gets a learned position embedding where its tokens enter the
  first block, as the transformer's 16x16 tokens do; the up path gets none of its own."""
  model = UViT(**TINY_UVIT, attn_resolutions=(8,))    # levels 16, 8, 4; transformer at 2x2
  z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  logsnr = jnp.array([-1.0, 3.0])
  p = random_params(model, z, logsnr)
  c = TINY_UVIT["base_channels"] * TINY_UVIT["channel_multiplier"][1]
  assert p["down1_pos_emb"].shape == (8 * 8, c) and p["pos_emb"].shape == (2 * 2, 4 * 8)
  assert not any(k.endswith("pos_emb") for k in p if k not in ("down1_pos_emb", "pos_emb"))
  init = jax.eval_shape(model.init, jax.random.key(0), z, logsnr)["params"]["down1_pos_emb"]
  assert init.dtype == jnp.float32
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name
    if isinstance(context.module, Downsample) and name == "down0_resample":
      seen["resampled"] = out
    if isinstance(context.module, SpatialTransformerBlock) and name == "down1_block0":
      seen["block_input"] = args[0]
    return out

  with nn.intercept_methods(record):
    model.apply({"params": p}, z, logsnr)
  want = seen["resampled"] + p["down1_pos_emb"].reshape(1, 8, 8, c)
  np.testing.assert_allclose(np.asarray(seen["block_input"]), np.asarray(want), rtol=1e-6,
                             atol=1e-6)
  # The embedding reaches the output (its gradient is not zero).
  g = jax.grad(lambda e: jnp.sum(model.apply({"params": {**p, "down1_pos_emb": e}}, z,
                                             logsnr) ** 2))(p["down1_pos_emb"])
  assert float(jnp.abs(g).max()) > 0
