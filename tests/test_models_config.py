"""Every gin model config builds (smoke scale), paper parameter counts, build-time validation."""
from __future__ import annotations

import glob
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import UserError
from core.models import make_model, model_image_size
from core.models import summary
from core.models.patching import parse_patching
from tests.test_models import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "gin", "models", "*.gin")))
SMOKE_SHRINK = 8   # image and every resolution setting divided by this


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _smoke_model(path: str):
  """The config's model at smoke scale: tiny widths, one block per level, image / 8.

  Resolution-valued settings (attn_resolutions, dropout_from_resolution) shrink with the image so
  the level structure (which levels attend, where dropout starts) is the paper config's.
  """
  gin.parse_config_file(path)
  size = model_image_size()
  model = make_model()
  small = size // SMOKE_SHRINK
  over = dict(base_channels=8, emb_channels=16,
              num_res_blocks=[1] * len(model.num_res_blocks),
              attn_resolutions=[r // SMOKE_SHRINK for r in model.attn_resolutions])
  if model.dropout_from_resolution is not None:
    over["dropout_from_resolution"] = model.dropout_from_resolution // SMOKE_SHRINK
  if hasattr(model, "num_transformer_blocks"):
    over.update(num_transformer_blocks=2, text_channels=8 if model.text_channels else 0)
  return model.clone(**over), size, small


@pytest.mark.parametrize("path", GIN_FILES, ids=[os.path.basename(p) for p in GIN_FILES])
def test_every_gin_config_builds_at_smoke_scale(path):
  model, size, small = _smoke_model(path)
  assert size % SMOKE_SHRINK == 0
  z = jax.ShapeDtypeStruct((2, small, small, 3), jnp.float32)
  kw = {"logsnr": jax.ShapeDtypeStruct((2,), jnp.float32)}
  if model.num_classes:
    kw["label"] = jax.ShapeDtypeStruct((2,), jnp.int32)
  if getattr(model, "text_channels", 0):
    kw["text_emb"] = jax.ShapeDtypeStruct((2, 7, 32), jnp.float32)
  params = jax.eval_shape(lambda z, kw: model.init(jax.random.key(0), z, **kw), z, kw)["params"]
  out = jax.eval_shape(lambda p, z, kw: model.apply({"params": p}, z, train=True,
                                                    rngs={"dropout": jax.random.key(1)}, **kw),
                       params, z, kw)
  assert out.shape == z.shape and out.dtype == jnp.float32


def test_smoke_config_runs_numerically_dwt_unet():
  """One config end to end with real numbers: U-Net 512 (dwt_2) at 64x64, float32 output."""
  model, _, small = _smoke_model(os.path.join(ROOT, "gin", "models", "unet_imagenet512.gin"))
  z = jax.random.normal(jax.random.key(0), (2, small, small, 3))
  logsnr, label = jnp.array([0.5, -3.0]), jnp.array([3, 1000])
  params = random_params(model, z, logsnr, label)
  assert params["patch_in"]["conv"]["kernel"].shape == (3, 3, 48, 16)   # 3 x 4^2 DWT bands
  y = jax.jit(lambda p: model.apply({"params": p}, z, logsnr, label, train=True,
                                    rngs={"dropout": jax.random.key(1)}))(params)
  assert y.shape == z.shape and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) > 0


def _uvit_param_formula(patch_channels: int, classes: int, text: tuple[int, int] | None = None,
                        attn_levels: tuple[int, ...] = ()) -> int:
  """Closed-form parameter count of the B.2 U-ViT (written from the pseudo-code, not the code)."""
  e, widths, blocks, heads, n_tf, tokens = 1024, [128, 256, 512, 2048], [2, 2, 2], 4, 36, 256
  cond = 128 * e + e + e * e + e + (classes + 1) * e * (classes > 0)

  def resblock(c, skip):
    return 2 * c + (9 * c * c + c) + (2 * c * e + 2 * c) + 2 * c + (9 * c * c + c) + skip * 2 * c

  def attention(c, kv_dim):
    hd = c // heads
    return c + (c * c + c) + 2 * (kv_dim * c + c) + 4 * hd + (c * c + c)

  def transformer(c, skip):
    mlp = c + (c * 4 * c + 4 * c) + (e * 8 * c + 8 * c) + (4 * c * c + c) + skip * c
    t = mlp + attention(c, c)
    if text:
      t += attention(c, text[1])
    return t

  total = cond + (9 * patch_channels * 128 + 128) + (2 * 128 + 9 * 128 * patch_channels
                                                      + patch_channels)
  if text:
    total += 2 * text[0] + text[0] * text[1] + text[1]
  for i, c in enumerate(widths[:-1]):
    block = (lambda s: transformer(c, s)) if i in attn_levels else (lambda s: resblock(c, s))
    total += blocks[i] * (block(False) + block(True))
    if i in attn_levels:   # the attention level's position embedding, (128 / 2^i)^2 x c
      total += (128 // 2 ** i) ** 2 * c
    total += 2 * (9 * c * widths[i + 1]) + widths[i + 1] + c     # down + up resampling convs
  return total + tokens * widths[-1] + n_tf * transformer(widths[-1], False)


@pytest.mark.parametrize("name,patch_channels,classes,text,attn", [
    ("uvit_imagenet128.gin", 3, 1000, None, ()),
    ("uvit_imagenet256.gin", 12, 1000, None, ()),
    ("uvit_imagenet512.gin", 48, 1000, None, ()),
    ("uvit_t2i.gin", 12, 0, (4096, 1024), (2,)),
])
def test_summary_prints_paper_uvit_parameter_counts(name, patch_channels, classes, text, attn,
                                                    capsys):
  path = os.path.join(ROOT, "gin", "models", name)
  assert summary.main([path]) == 0
  out = capsys.readouterr().out
  expected = _uvit_param_formula(patch_channels, classes, text, attn)
  assert f"parameters: {expected:,}" in out, out
  assert 2.0e9 < expected < 3.0e9        # "U-ViT 2B" (Table 7)
  assert "forward FLOPs / image" in out


def test_summary_unet_parameter_count_and_flops(capsys):
  path = os.path.join(ROOT, "gin", "models", "unet_imagenet128.gin")
  assert summary.main([path, "UNet.num_res_blocks=[1, 1, 1, 1, 1]"]) == 0
  out = capsys.readouterr().out
  gin.clear_config()
  gin.parse_config_files_and_bindings([path], ["UNet.num_res_blocks=[1, 1, 1, 1, 1]"])
  s = summary.summarize(make_model(), 128)
  assert f"parameters: {s['params']:,}" in out
  assert s["flops_train"] == 3 * s["flops_forward"] > 0


@pytest.mark.parametrize("binding,size,match", [
    ("UNet.channel_multiplier = [1, 2, 4]", 128, "channel_multiplier has 3 entries"),
    ("UNet.num_res_blocks = [1, 1]", 128, "num_res_blocks has 2"),
    ("UNet.patching_type = 'dwt_9'", 128, "not divisible"),
    ("UNet.patching_type = 'haar_2'", 128, "patching_type='haar_2' is unknown"),
    ("UNet.num_heads = 3", 128, "num_heads=3 does not divide"),
    ("UNet.attn_resolutions = [12]", 128, "attn_resolutions contains 12"),
    ("UNet.dtype = 'float8'", 128, "dtype='float8'"),
    ("UNet.patching_type = 'none'", 120, "image size 120x120 is not divisible by 16"),
    ("model.arch = 'vit'", 128, "model.arch='vit' is unknown"),
])
def test_bad_unet_configs_fail_at_build_with_the_setting_named(binding, size, match):
  gin.parse_config_files_and_bindings(
      [os.path.join(ROOT, "gin", "models", "unet_imagenet128.gin")], [binding])
  with pytest.raises(UserError, match=match):
    make_model(image_size=size)


@pytest.mark.parametrize("binding,match", [
    ("UViT.channel_multiplier = [1, 2, 4]", "one entry per conv level plus one"),
    ("UViT.num_heads = 3", "num_transformer|does not divide the 2048"),
    ("UViT.patching_type = 'dwt_5/3_5'", "not divisible by 256"),
    ("UViT.attn_resolutions = [16]", "attn_resolutions contains 16"),
    ("UViT.logsnr_input_type = 'log'", "logsnr_input_type='log'"),
])
def test_bad_uvit_configs_fail_at_build_with_the_setting_named(binding, match):
  gin.parse_config_files_and_bindings(
      [os.path.join(ROOT, "gin", "models", "uvit_imagenet128.gin")], [binding])
  with pytest.raises(UserError, match=match):
    make_model(image_size=128)


def test_init_validates_too_and_cli_reports_one_line(capsys):
  """Without make_model's image_size, model.init itself raises the UserError."""
  gin.parse_config_files_and_bindings(
      [os.path.join(ROOT, "gin", "models", "uvit_imagenet256.gin")], ["UViT.num_heads = 6"])
  model = make_model(image_size=None)   # the gin file's model.image_size would validate here
  with pytest.raises(UserError, match="num_heads=6"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)), jnp.zeros((1,)))
  gin.clear_config()
  from core.errors import run_main
  with pytest.raises(SystemExit) as e:
    run_main(summary.main, [os.path.join(ROOT, "gin", "models", "uvit_imagenet256.gin"),
                            "UViT.patching_type='dwt_8'"])
  assert e.value.code == 2
  assert "error: image size 256x256 is not divisible" in capsys.readouterr().err


def test_non_square_images_text_model():
  """384x640 (the paper's 5:3 text-to-image model) at smoke scale: levels use the shorter side."""
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", "uvit_t2i.gin"))
  model = make_model().clone(base_channels=8, emb_channels=16, num_res_blocks=[1, 1, 1],
                             num_transformer_blocks=1, text_channels=8, attn_resolutions=[6])
  z = jax.ShapeDtypeStruct((1, 48, 80, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, 5, 32), jnp.float32)
  logsnr = jax.ShapeDtypeStruct((1,), jnp.float32)
  out, _ = jax.eval_shape(lambda z, l, t: model.init_with_output(jax.random.key(0), z, l,
                                                                 text_emb=t), z, logsnr, text)
  assert out.shape == (1, 48, 80, 3)


def test_paper_patching_spelling_in_gin_and_levels():
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", "uvit_imagenet512.gin"))
  gin.bind_parameter("UViT.patching_type", "dwt_5/3_2")
  m = make_model(image_size=512)
  assert parse_patching(m.patching_type).factor == 4
  # conv levels at 128, 64, 32 and the transformer at 16x16 for all three resolutions (B.2).
  from core.models.validate import level_resolutions
  assert level_resolutions(m, 512) == [128, 64, 32, 16]
  assert np.isclose(m.logsnr_range[0], -15 + 2 * np.log(64 / 512), atol=1e-4)
