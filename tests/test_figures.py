"""tables.figures: PNGs written, readable by PIL, of the size the figure asks for."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from tables import figures, measured, ordering, paper, render, runs
from tests.test_tables import result, table2_workdir, write_run


def png_size(path) -> tuple[int, int]:
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.load()  # decodes the whole file
    assert im.mode in ("RGB", "RGBA")
    return im.size


def test_schedules_figure(tmp_path):
  path = figures.schedules(str(tmp_path / "schedules.png"))
  assert png_size(path) == (800, 500)
  with Image.open(path) as im:
    assert np.asarray(im.convert("L")).std() > 5  # not blank


def test_guidance_figure_with_paper_and_ours(tmp_path):
  served = [("9", "128x128", "guidance 1.00"), ("9", "128x128", "guidance 2.00")]
  write_run(str(tmp_path), "uvit128", served, [
      result(10, "fid_train", 30.0, guidance=1.0), result(10, "is", 20.0, std=1.0, guidance=1.0),
      result(10, "fid_train", 35.0, guidance=2.0)])
  frame = measured.measure(runs.load(str(tmp_path)), paper.load_paper())
  assert png_size(figures.guidance(frame, str(tmp_path / "g.png"))) == (1500, 450)


def test_training_curves_from_metrics(tmp_path):
  metrics = [{"step": s, "loss": 1.0 / (1 + s), "lr": 1e-4, "grad_norm": 1.0, "steps_per_sec": 2.0}
             for s in range(0, 100, 10)]
  write_run(str(tmp_path), "a", [("2", "128x128", "cosine (shifted to 32)")], [], metrics=metrics)
  write_run(str(tmp_path), "b", [("2", "256x256", "cosine (shifted to 32)")], [],
            metrics=metrics[:5])
  recorded = runs.load(str(tmp_path))
  assert png_size(figures.curves(recorded, "2", str(tmp_path / "c.png"))) == (900, 500)
  assert figures.curves(recorded, "3", str(tmp_path / "none.png")) is None
  assert not os.path.exists(tmp_path / "none.png")


def test_sample_grids_from_npz_and_png(tmp_path):
  rng = np.random.default_rng(0)
  a = write_run(str(tmp_path), "a", [("2", "128x128", "cosine (shifted to 32)")], [
      result(100, "fid_train", 61.23, std=1.04, num_samples=500),
      result(100, "kid_eval", 0.01234, std=0.0005, num_samples=500)])
  np.savez(os.path.join(a, "eval", "samples_100.npz"),
           images=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
  np.savez(os.path.join(a, "eval", "samples_50.npz"), images=np.zeros((4, 8, 8, 3), np.uint8))
  b = write_run(str(tmp_path), "b", [("2", "256x256", "cosine (shifted to 32)")], [])
  Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
      os.path.join(b, "eval", "samples_7.png"))
  step, grid = figures.latest_samples(a)
  assert step == 100 and grid.shape == (3 * 16, 4 * 16, 3)  # 10 images on a 4-wide grid
  step, grid = figures.latest_samples(b)
  assert step == 7 and grid.shape == (40, 60, 3)
  recorded = runs.load(str(tmp_path))
  # Two panels side by side (4.5 x 5.3 inches each at 100 dpi) over one footer line (no group has
  # two measured rows, so no ordering sentence).
  assert png_size(figures.samples(recorded, "2", str(tmp_path / "s.png"))) == (900, 565)
  caption = figures.numbers_caption(ordering.latest_numbers(recorded, "a"))
  assert caption == "FID: train 61.2 ± 1.0\nKID x10^3: eval 12.34 ± 0.50 (n=500)"
  assert figures.samples(recorded, "4", str(tmp_path / "none.png")) is None


def test_render_with_figures_writes_pngs(tmp_path):
  workdir = table2_workdir(str(tmp_path / "runs"))
  out = tmp_path / "out"
  assert render.main([f"workdir={workdir}", f"out={out}", "table=9", "format=markdown",
                      "figures=true"]) == 0
  assert sorted(os.listdir(out / "figures")) == ["guidance.png", "schedules.png"]
  for name in os.listdir(out / "figures"):
    w, h = png_size(out / "figures" / name)
    assert 400 <= w <= 2000 and 300 <= h <= 1500
