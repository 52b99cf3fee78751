"""TensorBoard as a user sees runs: ``tensorboard --logdir <workdir>`` lists ``<run>/train`` and
``<run>/eval`` side by side, and TensorBoard's own loaders (the event multiplexer, its data provider
and the HParams plugin's handlers, as its web server uses them) read back the sample grids, the
grouped scalars with their spread and n, the results table and the hyperparameters its HParams
dashboard compares, one row per run (docs/tensorboard.md)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard import context
from tensorboard.backend.event_processing import data_provider as provider_lib
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment
from tensorboard.plugins.hparams import list_session_groups, metadata

from core import config as config_lib
from core import metric_writer
from core import trainer
from experiments import jobs, registry
from tests.test_train import ROOT, _env, run_train, train_cmd

ROW = "128x128/cosine (shifted to 32)"


class Board:
  """What TensorBoard's server reads from ``logdir``: runs, scalars, images, text, hparams."""

  def __init__(self, logdir: str):
    self.mux = plugin_event_multiplexer.EventMultiplexer()
    self.mux.AddRunsFromDirectory(logdir)
    self.mux.Reload()
    self.data = provider_lib.MultiplexerDataProvider(self.mux, logdir)
    self.ctx = context.RequestContext()
    tb_context = base_plugin.TBContext(logdir=logdir, multiplexer=self.mux, data_provider=self.data)
    self.hparams_context = backend_context.Context(tb_context)

  def runs(self) -> set[str]:
    return {r.run_name for r in self.data.list_runs(self.ctx, experiment_id="")}

  def scalars(self, run: str) -> dict[str, list[tuple[int, float]]]:
    tags = self.data.list_scalars(self.ctx, experiment_id="", plugin_name="scalars")[run]
    out = self.data.read_scalars(self.ctx, experiment_id="", plugin_name="scalars",
                                 downsample=1000, run_tag_filter=_filter(run, tags))[run]
    return {t: [(d.step, d.value) for d in ds] for t, ds in out.items()}

  def images(self, run: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Each image tag's (step, decoded image) pairs, as the images dashboard fetches them."""
    tags = self.data.list_blob_sequences(self.ctx, experiment_id="", plugin_name="images")[run]
    seqs = self.data.read_blob_sequences(self.ctx, experiment_id="", plugin_name="images",
                                         downsample=100, run_tag_filter=_filter(run, tags))[run]
    out = {}
    for tag, data in seqs.items():
      # A blob sequence holds width, height, then the encoded image(s).
      out[tag] = [(d.step, np.asarray(Image.open(io.BytesIO(
          self.data.read_blob(self.ctx, blob_key=d.values[2].blob_key))))) for d in data]
    return out

  def text(self, run: str) -> dict[str, list[tuple[int, str]]]:
    tags = self.data.list_tensors(self.ctx, experiment_id="", plugin_name="text")[run]
    out = self.data.read_tensors(self.ctx, experiment_id="", plugin_name="text", downsample=100,
                                 run_tag_filter=_filter(run, tags))[run]
    return {t: [(d.step, d.numpy.item().decode()) for d in ds] for t, ds in out.items()}

  def hparams(self):
    """(the experiment: hparam and metric columns, the session groups: the table's rows)."""
    exp = get_experiment.Handler(self.ctx, self.hparams_context, "",
                                 api_pb2.GetExperimentRequest(include_metrics=True)).run()
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_RUNNING,
                          api_pb2.STATUS_FAILURE],
        col_params=[api_pb2.ColParams(hparam=h.name) for h in exp.hparam_infos]
        + [api_pb2.ColParams(metric=m.name) for m in exp.metric_infos],
        start_index=0, slice_size=100, include_metrics=True)
    groups = list_session_groups.Handler(self.ctx, self.hparams_context, "", request).run()
    return exp, {g.name: g for g in groups.session_groups}


def _filter(run, tags):
  return provider.RunTagFilter(runs=[run], tags=list(tags))


def _value(v):
  return {"number_value": v.number_value, "string_value": v.string_value,
          "bool_value": v.bool_value}[v.WhichOneof("kind")]


def _metrics(group) -> dict[str, tuple[int, float]]:
  return {m.name.tag: (m.training_step, m.value) for m in group.metric_values}


def test_train_and_eval_of_a_run_are_one_row_of_the_hparams_dashboard(tmp_path):
  """Two runs of a table, each a trainer writer and an eval worker writer: four TensorBoard runs
  named <run>/train and <run>/eval, two rows in the HParams table with the union of their scalars'
  last values as metrics, and the hyperparameter that differs flagged so."""
  logdir = str(tmp_path / "runs")
  for name, schedule, fid in (("a", "cosine", 30.0), ("b", "cosine_shifted", 20.0)):
    run = os.path.join(logdir, name)
    hp = {"schedule.name": schedule, "Train.batch_size": 32, "logsnr_shift": np.float64(
        0.0 if schedule == "cosine" else -1.5), "table": "2", "unset": None}
    with metric_writer.MetricWriter(run, tb_prefix="train/") as w:
      w.write_hparams(hp, group=name)
      w.write_hparams(hp, group=name)  # a repeat writes nothing
      w.write_scalars(10, {"loss": 1.0})
      w.write_scalars(20, {"loss": 0.5 if name == "a" else 0.25})
    with metric_writer.MetricWriter(run, jsonl=False, tb_dir="eval", tb_prefix="eval/") as w:
      w.write_hparams(hp, group=name)
      w.write_scalars(20, {"fid_train": fid, "fid_train_std": 1.5, "num_samples": 500})
  board = Board(logdir)
  assert board.runs() == {"a/train", "a/eval", "b/train", "b/eval"}
  assert board.scalars("a/train") == {"train/loss": [(10, 1.0), (20, 0.5)]}
  assert json.loads(open(os.path.join(logdir, "a", "metrics.jsonl")).readline())["loss"] == 1.0

  exp, groups = board.hparams()
  infos = {h.name: h for h in exp.hparam_infos}
  assert set(infos) == {"schedule.name", "Train.batch_size", "logsnr_shift", "table"}
  assert infos["schedule.name"].differs and infos["logsnr_shift"].differs
  assert set(infos["schedule.name"].domain_discrete.values[i].string_value for i in range(2)) == {
      "cosine", "cosine_shifted"}
  assert not infos["Train.batch_size"].differs and not infos["table"].differs
  assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "eval/fid_train",
                                                     "eval/fid_train_std", "eval/num_samples"}
  assert set(groups) == {"a", "b"}
  for name, loss, fid in (("a", 0.5, 30.0), ("b", 0.25, 20.0)):
    g = groups[name]
    assert sorted(s.name for s in g.sessions) == [f"{name}/eval", f"{name}/train"]
    assert _value(g.hparams["schedule.name"]) == ("cosine" if name == "a" else "cosine_shifted")
    assert _value(g.hparams["Train.batch_size"]) == 32.0
    assert _metrics(g) == {"train/loss": (20, loss), "eval/fid_train": (20, fid),
                           "eval/fid_train_std": (20, 1.5), "eval/num_samples": (20, 500.0)}
  # One session start per writer: the repeated write_hparams added nothing.
  acc = board.mux.GetAccumulator("a/train")
  assert len(acc.Tensors("_hparams_/session_start_info")) == 1


def _demo_job() -> registry.Job:
  (job,) = registry.jobs(registry.select("2", [ROW]))
  return job


def test_run_hparams_name_the_row_and_the_values_the_run_used(tmp_path):
  """The hyperparameters of a demo run of Table 2's row "shifted to 32": its table and row (from
  job.json), the schedule's settings at the demo's 16x16 (noise_d 32 at 128 is 4 at 16) and its
  logSNR shift 2 log(4/16) (Eq. 5), and the row's own gin bindings at the values used (the demo's
  2,000 steps, not the paper's 1.5M)."""
  job = _demo_job()
  run_dir = str(tmp_path / job.name)
  args = jobs.job_args(job, "demo", run_dir, None)
  jobs.write_job_json(job, "demo", run_dir, args)
  with config_lib.scratch():
    model, cfg, _ = jobs.build(args)
    hp = trainer.run_hparams(run_dir, model, cfg)
  assert (hp["table"], hp["group"], hp["row"]) == ("2", "128x128", "cosine (shifted to 32)")
  assert hp["scale"] == "demo" and hp["model"] == "UNet"
  assert (hp["schedule.name"], hp["schedule.image_d"], hp["schedule.noise_d"]) == (
      "cosine_shifted", 16, 4)
  assert hp["logsnr_shift"] == pytest.approx(2 * math.log(4 / 16))
  assert hp["Train.image_size"] == 16 and hp["Train.num_steps"] == 2000
  assert hp["Train.batch_size"] == 32 and hp["Train.learning_rate"] == 4e-3
  assert hp["Train.adam_b2"] == 0.999  # a binding of the row (appendix B for ImageNet 128)
  assert all(isinstance(v, (bool, int, float, str)) for v in hp.values() if v is not None)
  # A row that sets a parameter to None (Table 3's "no dropout") shows it, unlike an unset one.
  (job,) = registry.jobs(registry.select("3", ["no dropout"]))
  run_dir = str(tmp_path / job.name)
  args = jobs.job_args(job, "demo", run_dir, None)
  jobs.write_job_json(job, "demo", run_dir, args)
  with config_lib.scratch():
    hp = trainer.run_hparams(run_dir, *jobs.build(args)[:2])
  assert hp["UNet.dropout_from_resolution"] == "None" and hp["row"] == "no dropout"


@pytest.mark.slow
def test_a_trained_and_evaluated_run_as_tensorboard_shows_it(tmp_path):
  """A few-step run of Table 2's row with training sample grids, then the eval worker at two
  guidance scales: runs <run>/train and <run>/eval; the EMA grids at the sampled steps; the
  worker's grids equal to its PNG files; scalars grouped under train/ and eval/ with each metric's
  spread and n equal to results.jsonl; its results table as text; one HParams row with the table
  row, the schedule and the metrics of both (the same values written by the trainer and the
  worker); and a line while the train step compiles."""
  job = _demo_job()
  logdir = tmp_path / "runs"
  run_dir = logdir / job.name
  grids = ["Train.sample_every=2", "Train.num_sample_images=4", "Train.sample_steps=2"]
  jobs.write_job_json(job, "smoke", str(run_dir), train_cmd(run_dir, *grids)[3:])
  p = run_train(run_dir, *grids)
  assert "compiling the train step ...\ncompiled the train step in " in p.stderr
  assert "step 4: sample grid of 4 EMA images (2 sampler steps) in " in p.stderr
  worker = [sys.executable, "-m", "eval.worker", f"workdir={run_dir}", "num_samples=16",
            "batch_size=8", "sampler_steps=4", "guidance=1,2", "max_reference_images=16",
            "extractor=fid-helper", "once=true"]
  e = subprocess.run(worker, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert e.returncode == 0, e.stderr[-3000:]
  results = [json.loads(l) for l in open(run_dir / "eval" / "results.jsonl")]

  board = Board(str(logdir))
  assert board.runs() == {f"{job.name}/train", f"{job.name}/eval"}
  train = board.scalars(f"{job.name}/train")
  assert [s for s, _ in train["train/loss"]] == [1, 2, 3, 4]
  rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert [v for _, v in train["train/loss"]] == pytest.approx([r["loss"] for r in rows])
  assert {"train/lr", "train/grad_norm", "train/steps_per_sec"} <= set(train)
  (samples,) = board.images(f"{job.name}/train").values()
  assert [s for s, _ in samples] == [2, 4]
  assert all(img.shape == (2 * 16, 2 * 16, 3) for _, img in samples)
  assert board.text(f"{job.name}/train")["train/config/text_summary"][0][1].count("UNet.") > 3

  ev = board.scalars(f"{job.name}/eval")
  for r in results:
    tag = "eval/" + r["metric"] + ("" if r["guidance"] == 1.0 else f"_w{r['guidance']:g}")
    assert ev[tag] == [(4, pytest.approx(r["value"]))]
    assert ev[tag + "_std"] == [(4, pytest.approx(r["std"]))]
  assert ev["eval/num_samples"] == ev["eval/num_samples_w2"] == [(4, 16.0)]
  images = board.images(f"{job.name}/eval")
  for tag, png in (("eval/samples", "samples_4.png"), ("eval/samples_w2", "samples_4_w2.png")):
    ((step, img),) = images[tag]
    assert step == 4
    np.testing.assert_array_equal(img, np.asarray(Image.open(run_dir / "eval" / png)))
  ((step, table),) = board.text(f"{job.name}/eval")["eval/results/text_summary"]
  assert step == 4 and len(table.splitlines()) == 2 + len(results) == 2 + 8
  fid_w2 = [r for r in results if r["metric"] == "fid_train" and r["guidance"] == 2.0][0]
  assert f"| fid_train | 2 | {fid_w2['value']:.4g} | {fid_w2['std']:.4g} (bootstrap) | 16 | 4 |" in table

  # The eval worker, from config.gin, wrote the values the trainer wrote from its live config.
  starts = [metadata.parse_session_start_info_plugin_data(board.mux.SummaryMetadata(
      f"{job.name}/{r}", metadata.SESSION_START_INFO_TAG).plugin_data.content) for r in
      ("train", "eval")]
  assert starts[0].hparams == starts[1].hparams and starts[0].group_name == job.name
  exp, groups = board.hparams()
  (group,) = groups.values()
  assert group.name == job.name
  assert sorted(s.name for s in group.sessions) == [f"{job.name}/eval", f"{job.name}/train"]
  hp = {k: _value(v) for k, v in group.hparams.items()}
  assert (hp["table"], hp["group"], hp["row"]) == ("2", "128x128", "cosine (shifted to 32)")
  assert hp["schedule.name"] == "cosine_shifted" and hp["schedule.noise_d"] == 8  # as trained
  metrics = _metrics(group)
  assert metrics["train/loss"] == (4, pytest.approx(rows[-1]["loss"]))
  fid = [r for r in results if r["metric"] == "fid_train" and r["guidance"] == 1.0][0]["value"]
  assert metrics["eval/fid_train"] == (4, pytest.approx(fid))
