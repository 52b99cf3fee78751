"""core.metric_writer: metrics.jsonl rows and TensorBoard events, read back with TensorBoard's reader."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from core import metric_writer
from core.io import storage
from core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tb(logdir: str) -> ea.EventAccumulator:
  acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
  acc.Reload()
  return acc


def read_rows(path: str) -> list[dict]:
  return [json.loads(l) for l in storage.read_text(path).splitlines()]


def decode_png(s: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(s)))


def test_image_grid_layout():
  imgs = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
  g = metric_writer.image_grid(imgs, ncols=2)
  assert g.shape == (3 * 2, 2 * 3, 1) and g.dtype == np.uint8
  for i in range(5):
    r, c = divmod(i, 2)
    np.testing.assert_array_equal(g[2 * r:2 * r + 2, 3 * c:3 * c + 3], imgs[i])
  assert (g[4:6, 3:6] == 0).all()  # empty last cell
  g = metric_writer.image_grid(imgs, ncols=3, padding=1, pad_value=255)
  assert g.shape == (2 * 2 + 1, 3 * 3 + 2, 1)
  assert (g[2, :] == 255).all() and (g[:, 3] == 255).all()
  np.testing.assert_array_equal(g[3:5, 4:7], imgs[4])
  assert metric_writer.image_grid(imgs).shape == (2 * 2, 3 * 3, 1)  # ncols = ceil(sqrt(5)) = 3
  with pytest.raises(UserError):
    metric_writer.image_grid(imgs[0])


def test_scalars_images_text_roundtrip(tmp_path):
  wd = str(tmp_path / "run")
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
  single = rng.integers(0, 256, (10, 12, 1), dtype=np.uint8)
  config = "UViT.num_transformer_blocks = 2\ntrain.batch_size = 8"
  with metric_writer.MetricWriter(wd) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"loss": 1.0 / step, "lr": np.float32(1e-4 * step),
                             "num_images": np.int64(8 * step), "note": "x"})
    w.write_images(3, {"samples": batch, "gray": single})
    w.write_text("config", config, step=0)
  rows = read_rows(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[1] == {"step": 2, "loss": 0.5, "lr": pytest.approx(2e-4), "num_images": 16,
                     "note": "x"}
  assert isinstance(rows[2]["num_images"], int)

  acc = load_tb(os.path.join(wd, "train"))
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
      (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
  assert [e.value for e in acc.Scalars("num_images")] == [8.0, 16.0, 24.0]
  assert "note" not in acc.Tags()["scalars"]
  (img,) = acc.Images("samples")
  assert img.step == 3 and (img.height, img.width) == (2 * 8, 2 * 6)
  np.testing.assert_array_equal(decode_png(img.encoded_image_string),
                                metric_writer.image_grid(batch, 2))
  (gray,) = acc.Images("gray")
  assert (gray.height, gray.width) == (10, 12)
  np.testing.assert_array_equal(decode_png(gray.encoded_image_string)[..., 0], single[..., 0])
  tag = "config/text_summary"
  assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
  (t,) = acc.Tensors(tag)
  assert t.tensor_proto.string_val[0].decode() == config


def test_resume_drops_rows_after_checkpoint(tmp_path):
  wd = str(tmp_path / "run")
  w = metric_writer.MetricWriter(wd)
  for step in range(1, 11):
    w.write_scalars(step, {"loss": float(step)})
  w.close()
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 11, "lo')  # torn line from a crash mid-write
  # The run died after checkpointing step 5; the resumed run logs 6 and 7 again.
  with metric_writer.MetricWriter(wd, start_step=5) as w:
    assert [r["step"] for r in read_rows(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    for step in (6, 7):
      w.write_scalars(step, {"loss": 100.0 + step})
  rows = read_rows(os.path.join(wd, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(s, float(s)) for s in range(1, 6)] + [
      (6, 106.0), (7, 107.0)]
  acc = load_tb(os.path.join(wd, "train"))  # TensorBoard purges the dead run's steps 6..10
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == rows_as_pairs(rows)
  assert len(os.listdir(os.path.join(wd, "train"))) == 2


def rows_as_pairs(rows):
  return [(r["step"], r["loss"]) for r in rows]


def test_tensorboard_only_writer_purges_nothing(tmp_path):
  """The eval worker's use: TensorBoard only, into <run>/eval with an ``eval/`` prefix, steps of
  whichever checkpoints were evaluated (newest first when it fell behind)."""
  wd = str(tmp_path / "run")
  opts = dict(jsonl=False, tb_dir="eval", tb_prefix="eval/")
  with metric_writer.MetricWriter(wd, **opts) as w:
    w.write_scalars(2000, {"fid_train": 20.0})
  with metric_writer.MetricWriter(wd, **opts) as w:  # the worker restarted
    w.write_scalars(1000, {"fid_train": 30.0})
  assert os.listdir(wd) == ["eval"]
  acc = load_tb(os.path.join(wd, "eval"))
  assert [(e.step, e.value) for e in acc.Scalars("eval/fid_train")] == [(2000, 20.0),
                                                                       (1000, 30.0)]


def test_non_chief_writes_nothing(tmp_path):
  wd = str(tmp_path / "run")
  with metric_writer.MetricWriter(wd, is_chief=False) as w:
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    w.write_text("config", "a")
    w.flush()
  assert not os.path.exists(wd)


def test_bad_inputs(tmp_path):
  with metric_writer.MetricWriter(str(tmp_path)) as w:
    with pytest.raises(UserError, match="single number"):
      w.write_scalars(1, {"loss": np.ones(3)})
    with pytest.raises(UserError, match="uint8"):
      w.write_images(1, {"x": np.zeros((2, 2, 3), np.float32)})


def test_gcs_workdir_stages_and_syncs(gcs_bucket):
  wd = storage.join(gcs_bucket, "run")
  with metric_writer.MetricWriter(wd) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"loss": float(step)})
    w.flush()
    assert [r["step"] for r in read_rows(storage.join(wd, "metrics.jsonl"))] == [1, 2, 3]
    w.write_scalars(4, {"loss": 4.0})
  assert [r["step"] for r in read_rows(storage.join(wd, "metrics.jsonl"))] == [1, 2, 3, 4]
  assert len(storage.listdir(storage.join(wd, "train"))) == 1
  with metric_writer.MetricWriter(wd, start_step=2, tensorboard=False) as w:
    w.write_scalars(3, {"loss": 30.0})
  assert [(r["step"], r["loss"]) for r in read_rows(storage.join(wd, "metrics.jsonl"))] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def test_config_text_renders_as_a_code_block(tmp_path):
  """An operative gin config (``#`` comment lines, ``====``) written with code=True is rendered by
  TensorBoard's own markdown renderer as one verbatim code block, not as headings."""
  from tensorboard import plugin_util
  config = ("# Parameters for Train:\n# =====\nTrain.batch_size = 8\n\n# Parameters for UNet:\n"
            "UNet.channel_multiplier = [1, 2]\n")
  wd = str(tmp_path / "run")
  with metric_writer.MetricWriter(wd) as w:
    w.write_text("config", config, step=0, code=True)
  (t,) = load_tb(os.path.join(wd, "train")).Tensors("config/text_summary")
  html = plugin_util.markdown_to_safe_html(t.tensor_proto.string_val[0].decode())
  assert "<h1>" not in html and html.count("<pre><code>") == 1, html
  assert "# Parameters for Train:\n# =====\nTrain.batch_size = 8" in html
  plain = plugin_util.markdown_to_safe_html(config)
  assert "<h1>" in plain  # what the config looked like before: its comments became headings


def test_prefix_groups_tensorboard_tags_and_keeps_jsonl_keys(tmp_path):
  """The trainer's ``train/`` prefix: TensorBoard groups the charts by it; metrics.jsonl (read by
  tables/) keeps the plain names."""
  wd = str(tmp_path / "run")
  with metric_writer.MetricWriter(wd, tb_prefix="train/") as w:
    w.write_scalars(1, {"loss": 0.5})
    w.write_images(1, {"samples_ema": np.zeros((2, 4, 4, 3), np.uint8)})
    w.write_text("config", "x", step=0)
  assert read_rows(os.path.join(wd, "metrics.jsonl")) == [{"step": 1, "loss": 0.5}]
  tags = load_tb(os.path.join(wd, "train")).Tags()
  assert tags["scalars"] == ["train/loss"] and tags["images"] == ["train/samples_ema"]
  assert tags["tensors"] == ["train/config/text_summary"]


def test_events_of_the_earlier_layout_are_adopted_on_resume(tmp_path):
  """A run started by an earlier version (events in <run>/tb) and resumed by this one keeps one
  TensorBoard run: the old files move to <run>/train, where the restart's purge still applies."""
  wd = str(tmp_path / "run")
  with metric_writer.MetricWriter(wd, tb_dir="tb") as w:  # the earlier layout
    for step in range(1, 7):
      w.write_scalars(step, {"loss": float(step)})
  with metric_writer.MetricWriter(wd, start_step=4, legacy_tb_dir="tb") as w:
    w.write_scalars(5, {"loss": 50.0})
  assert sorted(os.listdir(wd)) == ["metrics.jsonl", "train"]
  assert len(os.listdir(os.path.join(wd, "train"))) == 2
  acc = load_tb(os.path.join(wd, "train"))
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                             (4, 4.0), (5, 50.0)]
  # The eval worker's earlier <run>/eval/tb moves up into <run>/eval, next to results.jsonl.
  os.makedirs(os.path.join(wd, "eval"))
  open(os.path.join(wd, "eval", "results.jsonl"), "w").close()
  with metric_writer.MetricWriter(wd, jsonl=False, tb_dir="eval/tb") as w:
    w.write_scalars(6, {"fid": 1.0})
  with metric_writer.MetricWriter(wd, jsonl=False, tb_dir="eval", legacy_tb_dir="eval/tb") as w:
    w.write_scalars(6, {"fid": 1.0})
  names = os.listdir(os.path.join(wd, "eval"))
  assert "tb" not in names and len([n for n in names if "tfevents" in n]) == 2


def test_quick_restarts_are_read_in_the_order_they_ran(tmp_path):
  """Twelve restarts within a second, each resuming at the step the one before reached: TensorBoard
  reads the files in name order, so every restart's file must sort after the earlier ones (a
  counter or process id in the name would not: "10" sorts before "9")."""
  wd = str(tmp_path / "run")
  for k in range(12):
    with metric_writer.MetricWriter(wd, start_step=k) as w:
      w.write_scalars(k + 1, {"loss": float(k + 1)})
      w.write_scalars(k + 2, {"loss": -1.0})  # logged after the last checkpoint: purged
  acc = load_tb(os.path.join(wd, "train"))
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == (
      [(k + 1, float(k + 1)) for k in range(12)] + [(13, -1.0)])


def test_a_trainer_process_does_not_import_torch():
  """The trainer writes TensorBoard events without torch (tensorboardX imports it: about 2 s of
  every trainer process's start); the eval worker's Inception network is what needs torch."""
  code = "import sys, core.train; print(sorted(m for m in ('torch', 'tensorboardX') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert out.stdout.strip() == "[]", out.stderr[-2000:]
