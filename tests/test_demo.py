"""The demo: its rows, its scale layer, its learning-rate schedule and its ordering sentence."""
from __future__ import annotations

import json
import math
import os
import re

import gin
import pytest

from core import config as config_lib
from core import trainer
from core.errors import UserError
from experiments import registry, scales
from tables import ordering, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _makefile_rows() -> list[str]:
  text = open(os.path.join(ROOT, "Makefile")).read()
  return [r.strip() for r in re.search(r"^DEMO_ROWS \?= (.*)$", text, re.M).group(1).split(",")]


def test_make_demo_trains_table2_128_group():
  """`make demo` names two of Table 2's 128x128 rows, the unshifted schedule and the best shift
  (one resolution group, one image size), and trains them side by side."""
  entries = registry.select("2", _makefile_rows())
  assert [e.row for e in entries] == ["cosine (original at 128)", "cosine (shifted to 32)"]
  assert {e.resolution for e in entries} == {128} and len(registry.jobs(entries)) == 2
  assert "parallel=2" in open(os.path.join(ROOT, "Makefile")).read()


def _bound(bindings, name):
  return next(b.split("=", 1)[1].strip() for b in reversed(bindings) if b.startswith(name + " "))


def test_demo_caps_unet_widths_but_keeps_every_level_and_the_shift_ratio():
  for job in registry.jobs([e for e in registry.ENTRIES if e.arch == "unet" and e.table in "23456"]):
    config_lib.parse(list(job.gin_files), list(job.bindings))
    paper = list(gin.query_parameter("UNet.channel_multiplier"))
    name = gin.query_parameter("schedule.name")
    ratio = (gin.query_parameter("schedule.image_d") / gin.query_parameter("schedule.noise_d")
             if name == "cosine_shifted" else None)
    gin.clear_config()
    b = scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, "demo")
    demo = json.loads(_bound(b, "UNet.channel_multiplier"))
    assert demo == [min(m, 2) for m in paper], job.name
    assert len(json.loads(_bound(b, "UNet.num_res_blocks"))) == len(paper)
    if ratio is not None:
      assert int(_bound(b, "schedule.image_d")) / int(_bound(b, "schedule.noise_d")) == ratio


def test_demo_unet_keeps_a_third_of_the_paper_blocks_as_smoke():
  """The demo U-Net's block counts are the paper's total / 3 shared out as at smoke scale (a CPU
  step's time follows the number of blocks, README "Where its time goes"): the 128x128 rows'
  [3, 4, 4, 12, 4] become [1, 1, 1, 4, 2], every level kept."""
  for entry in registry.select("2", _makefile_rows()):
    job = registry.jobs([entry])[0]
    demo = scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, "demo")
    smoke = scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, "smoke")
    assert json.loads(_bound(demo, "UNet.num_res_blocks")) == [1, 1, 1, 4, 2]
    assert _bound(demo, "UNet.num_res_blocks") == _bound(smoke, "UNet.num_res_blocks")
  assert scales.scaled_blocks([3, 4, 4, 12, 4], 3) == [1, 1, 1, 4, 2]


def test_cosine_lr_decay_matches_closed_form_and_constant_keeps_the_paper_schedule():
  cfg = trainer.TrainConfig(learning_rate=1e-3, warmup_steps=100, num_steps=1100, lr_decay="cosine")
  assert trainer.learning_rate_at(cfg, 50) == pytest.approx(5e-4)
  for s in (100, 350, 600, 1100):
    want = 0.5e-3 * (1.0 + math.cos(math.pi * (s - 100) / 1000))
    assert trainer.learning_rate_at(cfg, s) == pytest.approx(want, abs=1e-9)
  paper = trainer.TrainConfig(learning_rate=1e-4, warmup_steps=10, num_steps=100)
  assert trainer.learning_rate_at(paper, 5) == pytest.approx(5e-5)
  assert trainer.learning_rate_at(paper, 99) == pytest.approx(1e-4)
  with pytest.raises(UserError, match="Train.lr_decay='linear' is unknown"):
    trainer.make_optimizer(trainer.TrainConfig(lr_decay="linear"))


def _fake_workdir(tmp_path, fids, stds, kids=None):
  rows = ["cosine (original at 128)", "cosine (shifted to 64)", "cosine (shifted to 32)"]
  for i, (row, fid, std) in enumerate(zip(rows, fids, stds)):
    d = tmp_path / f"run{i}"
    (d / "eval").mkdir(parents=True)
    (d / "job.json").write_text(json.dumps({"run_name": f"run{i}", "rows": [
        {"table": "2", "group": "128x128", "row": row}]}))
    lines = [{"step": 10, "metric": "fid_train", "value": 999.0, "std": 1.0, "num_samples": 500,
              "guidance": 1.0},  # an older step: ignored
             {"step": 20, "metric": "fid_train", "value": fid, "std": std, "num_samples": 500,
              "guidance": 1.0}]
    if kids:
      lines.append({"step": 20, "metric": "kid_train", "value": kids[i], "std": 1e-4,
                    "num_samples": 500, "guidance": 1.0})
    (d / "eval" / "results.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return runs.load(str(tmp_path))


def test_ordering_sentence_says_held_or_not_and_whether_the_spread_resolves_it(tmp_path):
  # The paper (Table 2, 128x128): shifted to 32 (2.26) < shifted to 64 (2.41) < original (2.96).
  held = ordering.sentences(_fake_workdir(tmp_path / "a", [60.0, 50.0, 40.0], [1.0, 1.0, 1.0],
                                          kids=[0.03, 0.02, 0.01]), "2")
  assert len(held) == 1
  assert "(cosine (shifted to 32) < cosine (shifted to 64) < cosine (original at 128)) held" in held[0]
  assert "n=500: 40.0 ± 1.0 < 50.0 ± 1.0 < 60.0 ± 1.0" in held[0]
  assert "each neighbouring difference is larger than twice" in held[0] and "by KID train it held" in held[0]
  flipped = ordering.sentences(_fake_workdir(tmp_path / "b", [40.0, 50.0, 60.0], [1.0, 1.0, 1.0]), "2")
  assert "did NOT hold" in flipped[0] and "cosine (original at 128): 40.0 ± 1.0" in flipped[0]
  noisy = ordering.sentences(_fake_workdir(tmp_path / "c", [60.0, 50.0, 40.0], [9.0, 9.0, 9.0]), "2")
  assert " held" in noisy[0] and "not every neighbouring difference is larger" in noisy[0]
