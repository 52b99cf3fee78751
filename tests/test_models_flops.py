"""Analytic FLOPs vs the traced jaxpr (exact) and XLA's cost analysis (10%); benchmark smoke."""
from __future__ import annotations

import json
import os

import gin
import jax
import jax.numpy as jnp
import pytest

from core import benchmark
from core import hardware
from core.models import UNet, UViT, make_model, model_image_size
from core.models.flops import forward_flops
from tests.jaxpr_flops import jaxpr_flops
from core.models.summary import example_inputs, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One per distinct structure: U-Net none / dwt / conv patching, U-ViT dwt, U-ViT text + 32x32
# transformer level. (Every file builds: tests/test_models_config.py.)
GIN_FILES = [os.path.join(ROOT, "gin", "models", f) for f in (
    "unet_imagenet128.gin", "unet_imagenet512.gin", "unet_1024_patch4.gin",
    "uvit_imagenet512.gin", "uvit_t2i.gin")]
TEXT = dict(text_len=16, text_dim=64)


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  """UNet/UViT are gin-configurable: bindings left by other tests must not leak into these."""
  gin.clear_config()
  yield
  gin.clear_config()


def _traced_flops(model, size):
  kw = TEXT if getattr(model, "text_channels", 0) else {}
  params = param_shapes(model, size, **kw)
  args = example_inputs(model, size, **kw)
  return jaxpr_flops(lambda p, a: model.apply({"params": p}, **a), params, args)


@pytest.mark.parametrize("path", GIN_FILES, ids=[os.path.basename(p) for p in GIN_FILES])
def test_analytic_flops_equal_traced_matmul_flops_for_paper_configs(path):
  """Every conv / dense / attention matmul of the full-size network is counted, none twice."""
  gin.clear_config()
  gin.parse_config_file(path)
  model, size = make_model(), model_image_size()
  gin.clear_config()
  # One block per level keeps tracing short; widths, levels, patching and attention stay full.
  model = model.clone(num_res_blocks=[1] * len(model.num_res_blocks))
  kw = TEXT if getattr(model, "text_channels", 0) else {}
  assert forward_flops(model, size, **kw) == _traced_flops(model, size)


SMALL = [
    UNet(base_channels=32, emb_channels=64, channel_multiplier=(1, 2), num_res_blocks=(1, 1),
         attn_resolutions=(32,), num_heads=2, num_classes=10),
    UViT(base_channels=16, emb_channels=32, channel_multiplier=(1, 2, 4), num_res_blocks=(1, 1),
         num_transformer_blocks=2, num_heads=2, patching_type="dwt_1", attn_resolutions=(16,)),
    UNet(base_channels=32, emb_channels=64, channel_multiplier=(1, 2), num_res_blocks=(1, 1),
         attn_resolutions=(), patching_type="conv_2"),
]


@pytest.mark.parametrize("model", SMALL, ids=["unet", "uvit_dwt", "unet_conv2"])
def test_analytic_flops_within_10_percent_of_xla_cost_analysis(model):
  size = 64
  params = param_shapes(model, size)
  args = example_inputs(model, size)
  f = jax.jit(lambda p, a: model.apply({"params": p}, **a))
  cost = f.lower(params, args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  analytic = forward_flops(model, size)
  assert abs(cost["flops"] / analytic - 1.0) < 0.10, (cost["flops"], analytic)


def test_peak_table():
  assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert hardware.peak_flops("NVIDIA H200") == 989e12
  assert hardware.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert hardware.peak_flops("TPU v4") == 275e12
  assert hardware.peak_flops("TPU v5 lite") == 197e12
  assert hardware.peak_flops("TPU v5p") == 459e12
  assert hardware.peak_flops("cpu") is None


@pytest.mark.slow
def test_benchmark_cli_runs_a_train_step(tmp_path, capsys):
  out = tmp_path / "bench.jsonl"
  gin.clear_config()
  rc = benchmark.main([
      os.path.join(ROOT, "gin", "models", "uvit_benchmark256.gin"), "batch=2", "steps=1",
      "warmup=0", "image_size=16", "out=" + str(out), "UViT.base_channels=4",
      "UViT.emb_channels=8", "UViT.channel_multiplier=[1, 1, 2]", "UViT.num_res_blocks=[1, 1]",
      "UViT.num_transformer_blocks=1", "UViT.num_heads=1", "dtype=float32"])
  gin.clear_config()
  assert rc == 0
  res = json.loads(out.read_text().strip())
  assert res["arch"] == "UViT" and res["batch_size"] == 2 and res["img_per_sec"] > 0
  assert res["mfu"] is None and res["device"] == jax.devices()[0].device_kind
  assert jnp.isfinite(res["loss"]) and res["flops_per_image_fwd"] > 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
