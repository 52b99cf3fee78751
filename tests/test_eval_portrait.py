"""Evaluation of a model with the portrait flag (Sec. 5, the 384x640 text-to-image model): sample
``i`` gets the flag of the image caption ``i`` was drawn from, so portraits (rotated at
preparation, as in the reference statistics) are sampled in the reference's proportion.

Issue 28 item 1: eval.worker passed no flag, so every sample of that model was landscape."""
from __future__ import annotations

import gin
import jax
import numpy as np
import pytest

from core import config as config_lib
from core import trainer as train_lib
from core.data import captions as captions_lib
from core.data import prepare
from eval import sample, worker
from tests import t2i_fixtures as F
from tests.test_t2i import randomized

HW = (16, 24)
MAX_LEN = 12
BINDINGS = [f"Train.image_size={HW}", f"model.image_size={HW}", "UViT.portrait_conditioning=True",
            "UViT.channel_multiplier=[1, 2]", "UViT.num_res_blocks=[1]",
            "UViT.num_transformer_blocks=1", "UViT.attn_resolutions=[]", "UViT.text_channels=8",
            "UViT.num_heads=2", "UViT.transformer_dropout=0.0", f"Train.text_dim={F.DIM}",
            f"Train.text_len={MAX_LEN}", "schedule.image_d=16"]


@pytest.fixture(scope="module")
def portrait_run(tmp_path_factory):
  """The fake COCO (one portrait validation image of three) prepared at 16x24 with a tiny T5 and
  12 evaluation captions, and a run directory of a tiny U-ViT with the portrait flag on it."""
  root = tmp_path_factory.mktemp("portrait")
  data = str(root / "coco16x24")
  prepare.prepare(F.fake_coco(str(root / "coco")), "x".join(map(str, HW)), data,
                  text_encoder=F.tiny_t5(str(root / "t5")), max_len=MAX_LEN, eval_captions=12,
                  caption_seed=3, progress=False)
  run = root / "run"
  run.mkdir()
  config_lib.parse(["models/uvit_t2i.gin", "train/uvit_imagenet.gin", "scales/smoke.gin"],
                   [*BINDINGS, f"Train.data_dir='{data}'"])
  try:
    (run / "config.gin").write_text(gin.config_str())
  finally:
    gin.clear_config()
  return data, str(run)


@pytest.mark.slow
def test_evaluation_samples_each_caption_with_its_images_portrait_flag(portrait_run):
  data, run = portrait_run
  ev = worker.Evaluator(run, guidances=[2.0], num_samples=12, batch_size=4, sampler_steps=2,
                        noise_param=1.0, seed=0, extractor_source="fid-helper", clip_model=None)
  cond = ev.conditions()
  keys = captions_lib.load_eval_captions(data).keys[:12]
  # Independent truth: the fake COCO's validation images, portrait when narrower than high.
  sizes = {f"val2017/{image_id:012d}.jpg": size for image_id, size, _ in F.CAPTIONS["val"]}
  want = np.asarray([int(sizes[k][0] < sizes[k][1]) for k in keys], np.int32)
  assert 0 < want.sum() < len(want)  # the draw has both kinds: the test can tell them apart
  np.testing.assert_array_equal(cond["portrait"], want)

  # The flag reaches the model for exactly those samples: a tiny random U-ViT's samples change
  # where the flag is 1 and stay bit for bit where it is 0 (against all-landscape sampling).
  loaded = sample.load_run(run)
  assert loaded.model.portrait_conditioning and loaded.cfg.hw == HW
  state = train_lib.init_state(loaded.model, train_lib.make_optimizer(loaded.cfg), loaded.cfg,
                               jax.random.key(0), 0)
  params = randomized(state["ema_params"])
  kw = dict(num_samples=12, batch_size=4, num_steps=2, noise_param=1.0, guidance=2.0,
            progress=False)
  flagged = sample.sample_images(loaded, params, conditions=cond, **kw)
  landscape = sample.sample_images(loaded, params, conditions=dict(cond, portrait=0 * want), **kw)
  assert flagged.shape == (12, *HW, 3)
  changed = np.abs(flagged.astype(int) - landscape).reshape(12, -1).max(axis=1) > 0
  np.testing.assert_array_equal(changed, want.astype(bool))
