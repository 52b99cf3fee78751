"""Text to image (Table 8, Figure 8, section 5): text mask, null text, portrait flag, H x W
sampling, sampling from captions, CLIP score, the Table 8 / Figure 8 outputs."""
from __future__ import annotations

import functools
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import config as config_lib
from core import schedules
from core import trainer as train_lib
from core.data import captions as captions_lib
from core.data import prepare
from core.errors import UserError
from core.models.uvit import UViT
from eval import clip_score, denoise, worker
from eval import sample as sample_lib
from experiments import jobs, registry
from experiments import run as run_lib
from tables import figures, render
from tests import t2i_fixtures as F

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


def _nonsquare_run():
  """The registry's 384x640 row at smoke scale (image size / 8 = 48x80), text dims of the test."""
  (job,) = registry.jobs(registry.select("t2i-384x640"))
  args = jobs.job_args(job, "smoke", "unused", None)
  files = [a.split("=", 1)[1] for a in args if a.startswith("gin_file=")]
  binds = [a for a in args if "=" in a and not a.startswith(("gin_file=", "workdir="))]
  config_lib.parse(files, binds + ["Train.batch_size=4", f"Train.text_len={T}",
                                   f"Train.text_dim={D}", "Train.num_steps=3"])
  try:
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    logsnr_fn = gin.query_parameter("train.logsnr_fn").scoped_configurable_fn()
    cfg = train_lib.TrainConfig()
  finally:
    gin.clear_config()
  return sample_lib.LoadedRun("", model, logsnr_fn, cfg, 0)


def _caption_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((n, T), bool)
  for i in range(n):
    mask[i, :rng.integers(1, T + 1)] = True
  return {"text_emb": rng.normal(size=(n, T, D)).astype(np.float32), "text_mask": mask,
          "portrait": (np.arange(n) % 2).astype(np.int32)}


@pytest.mark.slow
def test_nonsquare_model_with_portrait_flag_trains_and_samples():
  """Train.image_size = (48, 80) (the 384x640 model / 8): train steps on H x W batches with text,
  mask and portrait flag, then sample H x W images from captions; the flag reaches the model."""
  run = _nonsquare_run()
  model, cfg = run.model, run.cfg
  assert cfg.hw == (48, 80) and model.portrait_conditioning and model.text_channels > 0
  assert model.num_classes == 0
  tx = train_lib.make_optimizer(cfg)
  state = train_lib.init_state(model, tx, cfg, jax.random.key(0), 0)
  assert "portrait_emb" in state["params"]["cond"]
  down = 2 ** (len(model.num_res_blocks) + 1)   # DWT-1 (see scales._whole_levels), downsamplings
  assert state["params"]["pos_emb"].shape[0] == (48 // down) * (80 // down)
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   logsnr_fn=run.logsnr_fn, cfg=cfg, num_classes=0))
  rng = np.random.default_rng(0)
  batch = dict(_caption_batch(4), image=rng.integers(0, 256, (4, 48, 80, 3), dtype=np.uint8),
               label=np.zeros((4,), np.int32))
  before = state["params"]
  # Three steps: the conditioning reaches the loss only through zero-initialised layers (each
  # block's output conv, then its scale/shift projection), so its gradient is zero for two steps.
  for _ in range(3):
    state, m = step(state, batch)
    assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state["params"], before)
  assert moved["cond"]["portrait_emb"]["embedding"] > 0  # the flag is trained
  # The flag changes the prediction (random weights: the embedding rows differ).
  params = randomized(state["params"])
  z = jax.random.normal(jax.random.key(3), (2, 48, 80, 3))
  c = _caption_batch(2)
  out = [model.apply({"params": params}, z, jnp.zeros((2,)), text_emb=c["text_emb"],
                     text_mask=c["text_mask"], portrait=jnp.full((2,), p)) for p in (0, 1)]
  assert out[0].shape == (2, 48, 80, 3)
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
  imgs = sample_lib.sample_images(run, state["ema_params"], num_samples=3, batch_size=2, num_steps=2,
                                  noise_param=1.0, guidance=2.0, conditions=_caption_batch(3),
                                  progress=False)
  assert imgs.shape == (3, 48, 80, 3) and imgs.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# CLIP score


def save_tiny_clip(path) -> str:
  """A tiny random CLIPModel and a CLIPProcessor (character-level BPE vocabulary) saved to path."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = tf.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16)
  model = tf.CLIPModel(cfg).eval()
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
  path = str(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = tf.CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
  proc = tf.CLIPProcessor(image_processor=tf.CLIPImageProcessor(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok)
  model.save_pretrained(path)
  proc.save_pretrained(path)
  return path


def test_clip_score_is_100_max_cos_0_of_clip_features(tmp_path):
  """Equals an independent computation: get_image_features / get_text_features, torch cosine,
  100 * max(cos, 0), mean (CLIPScore's convention with weight 100)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf  # pylint: disable=import-outside-toplevel
  path = save_tiny_clip(tmp_path / "clip")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 24, 40, 3), dtype=np.uint8)  # non-square: the processor crops
  captions = ["a red apple", "smiling face", "blue car", "flag", "cat", "a dog with a hat"]
  scorer = clip_score.ClipScore(path, batch_size=4)
  got = dict(scorer(images, captions))
  model = tf.CLIPModel.from_pretrained(path).eval()
  proc = tf.CLIPProcessor.from_pretrained(path)
  with torch.no_grad():
    img = model.get_image_features(**proc(images=list(images), return_tensors="pt"))
    txt = model.get_text_features(**proc(text=captions, return_tensors="pt", padding=True))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1).double().numpy()
  diag = np.diag(cos)
  np.testing.assert_allclose(scorer.cosines(images, captions), diag, atol=1e-5)
  np.testing.assert_allclose(got["clip_score"], np.mean(100 * np.maximum(diag, 0)), atol=1e-3)
  # Swapping captions scores the swapped pairs (the off-diagonal of the independent matrix).
  perm = [1, 0, 3, 2, 5, 4]
  np.testing.assert_allclose(scorer.cosines(images, [captions[p] for p in perm]),
                             cos[np.arange(6), perm], atol=1e-5)
  # The clamp: a pair with a negative cosine (a random model has them) scores 0.
  neg = np.argwhere(cos < 0)
  if len(neg):
    i, j = neg[0]
    assert scorer.scores(images[i:i + 1], [captions[j]])[0] == 0.0


def test_clip_model_not_loadable_offline_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(UserError) as e:
    clip_score.ClipScore("no-such-org/no-such-clip")
  msg = str(e.value)
  assert "\n" not in msg and "huggingface-cli download no-such-org/no-such-clip" in msg
  assert "clip_model=none" in msg


# ----------------------------------------------------------------------------------------------
# End to end at smoke scale: prepare -> train -> sample from captions -> FID, CLIP -> Table 8.


ROW_256 = "256x256 COCO zero-shot/simple diffusion (U-ViT 2B)"
GUIDANCES = "1,2"


@pytest.fixture(scope="module")
def smoke_table8(tmp_path_factory):
  """The fake COCO prepared at 32x32 with a tiny T5 (width 64, the smoke scale's text_dim), then
  ``experiments.run table=8`` (its 256 row) at smoke scale with a tiny random CLIP."""
  root = tmp_path_factory.mktemp("t8")
  t5 = F.tiny_t5(str(root / "t5"), d_model=64)
  out = str(root / "coco32")
  prepare.prepare(F.fake_coco(str(root / "coco")), "32", out, text_encoder=t5, max_len=24,
               eval_captions=16, caption_seed=0, progress=False)
  clip = save_tiny_clip(root / "clip")
  workdir = str(root / "runs")
  assert run_lib.main(["table=8", f"row={ROW_256}", "scale=smoke", f"workdir={workdir}",
                       f"data_dir={out}", "eval=false"]) == 0
  (job,) = registry.jobs(registry.select("8", [ROW_256]))
  run_dir = os.path.join(workdir, job.name)
  e_args = jobs.eval_args(job, "smoke", run_dir, {
      "num_samples": None, "extractor": "fid-helper", "resize": None, "clip_model": clip})
  # The row's evaluation is Figure 8's sweep; the test evaluates two of its scales (time).
  sweep = next(a for a in e_args if a.startswith("guidance="))
  assert sweep == "guidance=" + ",".join(f"{w:g}" for w in registry.FIGURE8_GUIDANCE)
  assert worker.main([a if a != sweep else f"guidance={GUIDANCES}" for a in e_args]) == 0
  return out, clip, workdir, run_dir


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_table8")  # one worker builds the module's smoke_table8 once
def test_denoise_asks_a_text_run_with_its_own_swapped_and_null_captions(smoke_table8):
  """eval.denoise on a text-to-image run: each image's own caption (its first), the next image's,
  and the null text; the captions reach the model (swapping them changes its predictions)."""
  run_dir = smoke_table8[3]
  step, rows = denoise.run_denoise(run_dir, logsnrs=[-5.0, 5.0], num_images=8)
  assert step == 4 and [r["logsnr"] for r in rows] == [-5.0, 5.0]
  assert all(np.isfinite(r[k]) for r in rows for k in ("mse_model", "mse_swapped", "mse_null"))
  assert rows[0]["mse_swapped"] != rows[0]["mse_model"] != rows[0]["mse_null"]


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_table8")
def test_table8_smoke_end_to_end(smoke_table8, tmp_path):
  data_dir, clip, workdir, run_dir = smoke_table8
  rows = worker.read_results(run_dir)
  got = {(r["metric"], r["guidance"]) for r in rows}
  scales = [float(w) for w in GUIDANCES.split(",")]
  want = {(m, w) for m in ("fid_eval", "clip_score") for w in scales}
  assert want <= got and not any(r["metric"] == "fid_train" for r in rows)
  assert all(r["noise_param"] == 1.0 and r["num_samples"] == 16 for r in rows)
  # Each CLIP row = the CLIP score of the saved samples with the evaluation captions, recomputed.
  caps = captions_lib.load_eval_captions(data_dir).captions[:16]
  scorer = clip_score.ClipScore(clip)
  for r in rows:
    if r["metric"] == "clip_score":
      fid_row = next(x for x in rows if x["metric"] == "fid_eval" and x["guidance"] == r["guidance"])
      images = np.load(os.path.join(run_dir, fid_row["samples"]))["images"]
      assert images.shape == (16, 32, 32, 3)
      assert abs(dict(scorer(images, caps))["clip_score"] - r["value"]) < 1e-3
  # Table 8 shows our best FID with its guidance scale beside the paper's 8.30.
  text = render.render(["8"], workdir, fmt="markdown")["table_8.md"]
  best = min((r for r in rows if r["metric"] == "fid_eval"), key=lambda r: r["value"])
  line = next(l for l in text.splitlines() if "simple diffusion (U-ViT 2B)" in l and "8.30" in l)
  assert f"{best['value']:.2f}" in line and f"| {best['guidance']:g} |" in line
  # Trained on the fake COCO's own train split: not zero-shot, and the table says so.
  assert line.count("(COCO-trained, not zero-shot)") == 1
  paths = figures.draw_all(workdir, str(tmp_path / "fig"), ["8"], ("clip_fid",))
  assert [os.path.basename(p) for p in paths] == ["clip_fid.png"]
  pts = figures.clip_fid_points(figures.runs.load(workdir), os.path.basename(run_dir))
  assert sorted(pts["guidance"]) == scales and pts["clip"].notna().all()
  # The FID axis says how many samples each FID has (FID@30K only when 30K were scored).
  n = {r["num_samples"] for r in rows if r["metric"] == "fid_eval"}
  assert set(pts["n"]) == n and 30000 not in n
  assert figures.fid_axis_label(pts["n"]) == f"FID (n={min(n)}; the paper's is FID@30K)"
  assert figures.fid_axis_label([30000, 30000]) == "FID@30K"


@pytest.mark.slow
def test_swapping_the_caption_changes_the_samples():
  """A tiny model trained on two captions (A: red images, B: blue images): under the same seeds,
  samples for A are redder than for B, by far more than two runs with the same caption differ
  (which is exactly 0: sampling is deterministic in the seed)."""
  model = tiny_uvit(channel_multiplier=(1, 2), num_res_blocks=(1,), text_channels=16)
  # 400 steps: redness gap 0.81 and mean difference 0.29 (on this project's 2-core machine);
  # at 150 they were 0.53 and 0.19, on one side or the other of the bounds depending on the CPU.
  cfg = train_lib.TrainConfig(image_size=8, batch_size=8, num_steps=400, warmup_steps=0,
                              learning_rate=3e-3, text_len=T, text_dim=D, ema_decay=0.9)
  run = sample_lib.LoadedRun("", model, schedules.logsnr_cosine, cfg, 0)
  tx = train_lib.make_optimizer(cfg)
  state = train_lib.init_state(model, tx, cfg, jax.random.key(0), 0)
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   logsnr_fn=schedules.logsnr_cosine, cfg=cfg, num_classes=0))
  caps = _caption_batch(2, seed=5)
  which = np.arange(8) % 2   # caption A for even, B for odd examples
  red, blue = np.array([230, 30, 30], np.uint8), np.array([30, 30, 230], np.uint8)
  image = np.where(which[:, None, None, None] == 0, red, blue) * np.ones((8, 8, 8, 3), np.uint8)
  batch = {"image": image, "label": np.zeros((8,), np.int32),
           "text_emb": caps["text_emb"][which], "text_mask": caps["text_mask"][which]}
  for _ in range(cfg.num_steps):
    state, _ = step(state, batch)

  def samples(c):
    cond = {k: np.repeat(caps[k][c:c + 1], 8, axis=0) for k in ("text_emb", "text_mask")}
    return sample_lib.sample_images(run, state["ema_params"], num_samples=8, batch_size=8,
                                    num_steps=16, guidance=1.0, seed=7, conditions=cond,
                                    progress=False).astype(np.float64) / 255.0

  a, a2, b = samples(0), samples(0), samples(1)
  redness = lambda x: float((x[..., 0] - x[..., 2]).mean())
  assert np.abs(a - a2).max() == 0.0
  assert redness(a) - redness(b) > 0.5, (redness(a), redness(b))
  assert float(np.abs(a - b).mean()) > 0.2
