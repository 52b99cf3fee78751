"""The experiment registry against the paper: rows, appendix B settings, shared jobs, errors."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex

import gin
import pytest
import yaml

from core import config as config_lib
from core import schedules, trainer
from core.errors import UserError
from core.models import make_model
from experiments import jobs, registry, run, scales
from tables import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _csv_rows():
  with open(registry.PAPER_CSV) as f:
    return list(csv.DictReader(f))


def _ours(r):
  return "literature" not in r["note"]


def test_paper_csv_is_the_shared_transcription():
  shared = os.path.join(os.path.dirname(ROOT), "shared", "paper", "tables.csv")
  if not os.path.exists(shared):
    pytest.skip("no ../shared/paper here")
  assert open(shared).read() == open(registry.PAPER_CSV).read()


@pytest.mark.parametrize("table", sorted({r["table"] for r in _csv_rows()}))
def test_each_table_has_exactly_the_papers_rows(table):
  """Every non-literature row of the paper's table is an entry, in the paper's order, and no more."""
  want = [(r["group"], r["row"]) for r in _csv_rows() if r["table"] == table and _ours(r)]
  got = [(e.group, e.row) for e in registry.select(table)]
  assert got == want


def test_plan_json_lists_the_rows(capsys):
  assert run.main(["table=4", "scale=smoke", "mode=plan", "format=json"]) == 0
  planned = json.loads(capsys.readouterr().out)
  rows = [r for p in planned for r in p["rows"]]
  assert rows == [f"T4 128x128 / {r['row']}" for r in _csv_rows() if r["table"] == "4"]
  for p in planned:
    assert p["params"] > 0 and p["gflops_per_image"] > 0 and p["batch_size"] == 8 and p["steps"] == 4
    assert p["resolution"] == 16


def test_identical_configurations_are_one_job():
  jobs = registry.jobs()
  by_row = {(e.table, e.group, e.row): j.name for j in jobs for e in j.entries}
  # Table 3's "dropout from 16" and Table 4's "12+13" are Table 2's 128 shift-64 run (their paper
  # values are identical too: 2.41 / 3.03).
  assert by_row[("3", "128x128", "dropout from 16")] == by_row[("2", "128x128", "cosine (shifted to 64)")]
  assert by_row[("4", "128x128", "12+13 blocks at 16x16")] == by_row[("2", "128x128", "cosine (shifted to 64)")]
  # Table 6's baselines are Table 2's 256 shift-32 and Table 5's DWT-2 rows.
  assert by_row[("6", "256x256", "256 (shift 32)")] == by_row[("2", "256x256", "cosine (shifted to 32)")]
  assert by_row[("6", "512x512", "512 (shift 64)")] == by_row[("5", "512x512", "DWT-2")]
  # Table 7's U-Net rows come from Tables 2 and 6; Table 9 evaluates Table 7's U-ViTs.
  assert by_row[("7", "128x128", "simple diffusion (U-Net)")] == by_row[("2", "128x128", "cosine (shifted to 32)")]
  assert by_row[("7", "512x512", "simple diffusion (U-Net)")] == by_row[("6", "512x512", "+ multiscale loss (32)")]
  for res in (128, 256, 512):
    g = f"{res}x{res}"
    names = {by_row[("9", g, f"guidance {w:.2f}")] for w in (1.0, 1.05, 1.1, 1.2, 1.4, 1.8, 2.0, 3.0)}
    assert names == {by_row[("7", g, "simple diffusion (U-ViT 2B)")]}
  # Different configurations stay apart, and a name does not depend on which table asked for it.
  assert len({j.name for j in jobs}) == len(jobs)
  assert registry.jobs(registry.select("6"))[0].name == by_row[("6", "256x256", "256 (shift 32)")]


def _operative(job, scale="paper"):
  """Builds model, schedule and trainer settings from the job's gin, then reads gin's operative config."""
  args = jobs.job_args(job, scale, "unused", None)
  files = [a.split("=", 1)[1] for a in args if a.startswith("gin_file=")]
  binds = [a for a in args if not a.startswith(("gin_file=", "workdir="))]
  config_lib.parse(files, binds)
  make_model(), schedules.get_schedule(), trainer.TrainConfig()
  text = gin.operative_config_str()  # what a run built from this config writes as config.gin
  loss = config_lib.query("diffusion_loss.loss_type")  # used inside the train step, so query it
  multiscale = config_lib.query("diffusion_loss.multiscale", False)
  gin.clear_config()
  values = {}
  for line in text.splitlines():
    if " = " in line and not line.startswith("#"):
      k, v = line.split(" = ", 1)
      values[k.strip()] = v.strip()
  return values, loss, multiscale


def _job(table, group, row):
  return next(j for j in registry.jobs(registry.select(table)) if any(e.row == row and e.group == group for e in j.entries))


def test_paper_scale_unet128_matches_appendix_b1():
  v, loss, _ = _operative(_job("2", "128x128", "cosine (shifted to 64)"))
  assert v["UNet.base_channels"] == "128" and v["UNet.emb_channels"] == "1024"
  assert v["UNet.channel_multiplier"] == "[1, 2, 4, 8, 8]"
  assert v["UNet.num_res_blocks"] == "[3, 4, 4, 12, 4]"
  assert v["UNet.attn_resolutions"] == "[8, 16]" and v["UNet.num_heads"] == "4"
  assert v["UNet.dropout"] == "0.1" and v["UNet.dropout_from_resolution"] == "16"
  assert v["UNet.patching_type"] == "'none'"
  assert v["schedule.name"] == "'cosine_shifted'" and v["schedule.image_d"] == "128" and v["schedule.noise_d"] == "64"
  assert v["Train.adam_b1"] == "0.9" and v["Train.adam_b2"] == "0.999" and v["Train.adam_eps"] == "1e-12"
  assert v["Train.learning_rate"] == "5e-05" and v["Train.warmup_steps"] == "10000"
  assert v["Train.batch_size"] == "512" and v["Train.num_steps"] == "1500000"
  assert v["Train.ema_decay"] == "0.9999" and v["Train.grad_clip"] == "1.0" and v["Train.weight_decay"] == "0.0"
  assert loss == "eps_mse"


def test_paper_scale_unet512_variants_match_appendix_b1():
  v, _, _ = _operative(_job("5", "512x512", "None"))
  assert v["UNet.channel_multiplier"] == "[1, 1, 1, 2, 4, 8, 8]" and v["UNet.num_res_blocks"] == "[1, 1, 2, 2, 4, 12, 4]"
  assert v["UNet.patching_type"] == "'none'" and v["Train.adam_b2"] == "0.99" and v["Train.num_steps"] == "2000000"
  v, _, _ = _operative(_job("5", "512x512", "Conv (2x2)"))
  assert v["UNet.channel_multiplier"] == "[1, 2, 2, 4, 8, 8]" and v["UNet.num_res_blocks"] == "[2, 2, 2, 4, 12, 4]"
  assert v["UNet.patching_type"] == "'conv_2'"
  v, _, multiscale = _operative(_job("6", "512x512", "+ multiscale loss (32)"))
  assert v["UNet.channel_multiplier"] == "[2, 3, 4, 8, 8]" and v["UNet.num_res_blocks"] == "[3, 3, 4, 12, 4]"
  assert v["UNet.patching_type"] == "'dwt_2'" and v["schedule.noise_d"] == "64" and multiscale is True


def test_paper_scale_uvit512_matches_appendix_b2():
  v, loss, _ = _operative(_job("7", "512x512", "simple diffusion (U-ViT 2B)"))
  assert v["UViT.base_channels"] == "128" and v["UViT.emb_channels"] == "1024"
  assert v["UViT.channel_multiplier"] == "[1, 2, 4, 16]" and v["UViT.num_res_blocks"] == "[2, 2, 2]"
  assert v["UViT.num_transformer_blocks"] == "36" and v["UViT.num_heads"] == "4"
  assert v["UViT.transformer_dropout"] == "0.2" and v["UViT.logsnr_input_type"] == "'linear'"
  assert v["UViT.patching_type"] in ("'dwt_2'", "'dwt_5/3_2'")
  assert v["Train.learning_rate"] == "0.0001" and v["Train.batch_size"] == "2048" and v["Train.num_steps"] == "500000"
  assert v["Train.adam_b2"] == "0.99" and loss == "v_mse"


def test_smoke_scale_keeps_relative_meaning():
  """At smoke scale the image is 1/8 of the paper's and so are noise_d and the dropout start."""
  job = _job("3", "128x128", "dropout from 32")
  b = scales.scale_bindings(job.gin_files, job.bindings, job.arch, job.resolution, "smoke")
  assert "Train.image_size = 16" in b and "schedule.image_d = 16" in b and "schedule.noise_d = 8" in b
  assert "UNet.dropout_from_resolution = 4" in b and "UNet.attn_resolutions = [1, 2]" in b
  blocks = [_job("4", "128x128", f"{a}+{a + 1} blocks at 16x16") for a in (2, 4, 8, 12)]
  demo = [next(x for x in scales.scale_bindings(j.gin_files, j.bindings, j.arch, j.resolution, "demo")
               if x.startswith("UNet.num_res_blocks")) for j in blocks]
  sixteen = [int(d.split("[")[1].rstrip("]").split(",")[3]) for d in demo]
  assert sixteen == sorted(sixteen) and len(set(sixteen)) == 4  # Table 4's ordering survives


def test_unknown_table_row_and_binding_are_one_line_errors():
  with pytest.raises(UserError, match=r"unknown table '10'; valid tables: 2, 3"):
    run.main(["table=10"])
  with pytest.raises(UserError, match=r"no row 'shifted to 16'; valid rows: .*cosine \(shifted to 32\)"):
    run.main(["table=2", "row=shifted to 16", "mode=plan"])
  with pytest.raises(UserError, match=r"takes only the gin bindings Train.log_every, .*\(got 'UNet.base_channels=8'\)"):
    run.main(["table=2", "UNet.base_channels=8"])
  with pytest.raises(UserError, match="unknown option 'tabel'"):
    run.main(["tabel=2"])


def test_paper_scale_on_cpu_is_refused_with_its_cost():
  with pytest.raises(UserError, match=r"scale=paper needs accelerators: .* accelerator-hours"):
    run.main(["table=4", "scale=paper", "row=2+3 blocks at 16x16"])


def test_tpu_dry_run_commands_are_well_formed(capsys):
  run.main(["table=7", "row=simple diffusion (U-ViT 2B)", "scale=paper", "launcher=tpu", "dry_run=true",
            "workdir=gs://bucket/sd", "repo_url=https://example.org/sd.git", "tpu_zone=us-central2-b",
            "data_dir=gs://bucket/imagenet{res}"])
  blocks = capsys.readouterr().out.split("# ---- ")[1:]   # one SkyPilot task YAML per job
  tasks = [yaml.safe_load(b.split("\n", 1)[1].rsplit("sky jobs launch", 1)[0]) for b in blocks]
  assert len(tasks) == 3 and all(t["resources"]["accelerators"] == "tpu-v4-256" for t in tasks)
  assert all(t["resources"]["infra"] == "gcp/us-central2/us-central2-b" for t in tasks)
  train = [l for l in tasks[0]["run"].splitlines() if "core.train" in l][0]
  inner = shlex.split(train)  # every command parses as shell
  assert "distributed=true" in inner and any(a.startswith("workdir=gs://bucket/sd/uvit128-") for a in inner)
  assert "gin_file=models/uvit_imagenet128.gin" in inner and "UViT.logsnr_range=@schedule_range()" in inner
  assert "Train.data_dir='gs://bucket/imagenet128'" in inner  # {res}: the job's resolution
  with pytest.raises(UserError, match="needs workdir on GCS"):
    run.main(["table=7", "row=simple diffusion (U-ViT 2B)", "scale=paper", "launcher=tpu", "dry_run=true",
              "workdir=/tmp/x", "repo_url=u", "data_dir=gs://bucket/imagenet{res}"])


@pytest.mark.slow
def test_table2_smoke_end_to_end_and_rerun_skips_finished_jobs(tmp_path, capsys):
  """table=2 scale=smoke trains, evaluates and records rows of both groups; the renderer reads
  them; a rerun after an interruption redoes nothing that finished.

  Three of the seven rows, both groups (the suite's longest test; all seven took 8 of its 17
  minutes): the other rows differ from these only in the schedule's shift, which
  tests/test_schedules.py pins, and every job's model is built in tests/test_scales.py.
  """
  workdir = str(tmp_path / "runs")
  # A label in both groups selects one job each; the group qualifies it.
  assert {e.group for e in registry.select("2", ["cosine (shifted to 64)"])} == {"128x128", "256x256"}
  first = "128x128/cosine (shifted to 64)"
  rows = f"{first},128x128/cosine (original at 128),256x256/cosine (shifted to 32)"
  # A first invocation that stops after one row stands for an interrupted table run; it evaluates
  # in background eval.worker subprocesses (eval_in_background); the second trains the other rows
  # two at once in core.train subprocesses (parallel=2), then evaluates them two at once in
  # eval.worker subprocesses.
  run.main(["table=2", f"row={first}", "scale=smoke", f"workdir={workdir}",
            "eval_in_background=true"])
  done_before = {d: open(os.path.join(workdir, d, "eval", "results.jsonl")).read() for d in os.listdir(workdir)}
  assert len(done_before) == 1
  capsys.readouterr()
  run.main(["table=2", f"row={rows}", "scale=smoke", f"workdir={workdir}", "parallel=2"])
  out = capsys.readouterr().out
  assert out.count("trained already") == len(done_before) and out.count("evaluated already") == len(done_before)
  assert out.count("training (") == 3 - len(done_before)   # the other jobs, trained by the pool
  assert out.count("2 at once") == 2 * 3 - len(done_before)      # ... and all evaluated by one
  for d, text in done_before.items():
    assert open(os.path.join(workdir, d, "eval", "results.jsonl")).read() == text
  runs = sorted(os.listdir(workdir))
  assert len(runs) == 3
  out_dir = tmp_path / "tables"
  render.main(["table=2", f"workdir={workdir}", f"out={out_dir}", "format=markdown"])
  md = (out_dir / "table_2.md").read_text()
  lines, group = {}, None
  for line in md.splitlines():
    cells = [c.strip() for c in line.split("|")]
    if len(cells) > 3 and cells[1].startswith("**"):
      group = cells[1].strip("*")
    elif len(cells) > 3 and group:
      lines[(group, cells[1].rstrip("†"))] = cells
  trained = {(e.group, e.row) for e in registry.select("2", rows.split(","))}
  assert len(trained) == 3
  for r in [r for r in _csv_rows() if r["table"] == "2"]:
    cells = lines[(r["group"], r["row"])]
    assert cells[2] == r["fid_train"] and cells[4] == r["fid_eval"]  # the paper's numbers
    ours = [cells[3].split(" ± "), cells[5].split(" ± ")]  # ours, filled in, with bootstrap spread
    if (r["group"], r["row"]) in trained:
      assert all(len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0 for v in ours) and "smoke" in cells
    else:  # a row not run has the paper's numbers only
      assert ours == [["–"], ["–"]], cells
  # A third run does nothing at all.
  run.main(["table=2", f"row={rows}", "scale=smoke", f"workdir={workdir}"])
  assert capsys.readouterr().out.count("trained already") == 3


def test_eval_sampler_steps_are_the_rows_at_paper_scale_and_the_scales_below():
  """The registry's sampler steps (not in the paper: a choice) reach the eval worker at paper scale."""
  job = _job("2", "128x128", "cosine (shifted to 64)")
  opts = {"num_samples": None, "extractor": "auto", "resize": None}
  def steps(j, scale):
    return dict(a.split("=", 1) for a in jobs.eval_args(j, scale, "r", opts))["sampler_steps"]
  assert steps(job, "paper") == str(registry.SAMPLER_STEPS) == "256"
  fewer = dataclasses.replace(job, entries=[dataclasses.replace(e, sampler_steps=100) for e in job.entries])
  assert steps(fewer, "paper") == "100"
  assert steps(fewer, "demo") == str(jobs.EVAL["demo"]["sampler_steps"])


SHIFT32 = "128x128/cosine (shifted to 32)"


def _dry_train_args(capsys, *extra):
  """The core.train arguments experiments.run prints for Table 2's shift-32 row at paper scale
  (a dry run needs no accelerator)."""
  run.main(["table=2", f"row={SHIFT32}", "scale=paper", "dry_run=true", "eval=false",
            "workdir=/runs", "data_dir=/data/imagenet{res}", *extra])
  line = [l for l in capsys.readouterr().out.splitlines() if "core.train" in l][0]
  return shlex.split(line)[3:]


def test_overrides_reach_core_train_after_the_row_and_name_the_run(capsys):
  """batch_size=, grad_accum=, steps= and the allowed gin bindings come after the row's own
  settings (gin's last binding wins) and give the run its own name; values equal to the row's
  change nothing."""
  job = _job("2", "128x128", "cosine (shifted to 32)")
  plain = _dry_train_args(capsys)
  assert plain[-1] == f"workdir=/runs/{job.name}" and "Train.num_steps=1500000" in plain
  assert _dry_train_args(capsys, "batch_size=512", "grad_accum=1", "steps=1500000") == plain
  args = _dry_train_args(capsys, "batch_size=256", "grad_accum=4", "steps=1000",
                         "Train.checkpoint_every=500")
  assert args[:len(plain) - 1] == plain[:-1]  # the row's arguments, unchanged, first
  assert args[len(plain) - 1:] == ["Train.batch_size=256", "Train.grad_accum=4",
                                   "Train.num_steps=1000", "Train.checkpoint_every=500",
                                   f"workdir=/runs/{job.name}-batch256-accum4-steps1000"]
  # Gin resolves them as the run will: the overrides win over the row's values.
  changed = jobs.with_overrides(job, "paper", batch_size=256, grad_accum=4, steps=1000)
  assert jobs.train_settings(changed, "paper") == {"batch_size": 256, "grad_accum": 4,
                                                   "num_steps": 1000}
  assert jobs.modified(changed, "paper") == {"batch_size": [512, 256], "grad_accum": [1, 4],
                                             "num_steps": [1_500_000, 1000]}
  # A snapshot row keeps its fraction of the schedule (Table 3's "no dropout": 700K of the 1.5M
  # of the others): steps=150000 is the schedule, its run stops and is evaluated at 70,000.
  no_dropout = jobs.with_overrides(_job("3", "128x128", "no dropout"), "paper", steps=150_000)
  assert jobs.train_settings(no_dropout, "paper")["num_steps"] == 150_000
  assert scales.snapshot_step(no_dropout, "paper") == (70_000, 150_000)
  assert "train.stop_at_step=70000" in jobs.job_args(no_dropout, "paper", "/r", None)
  with pytest.raises(UserError, match="Train.batch_size=60 is not divisible by Train.grad_accum=8"):
    run.main(["table=2", f"row={SHIFT32}", "scale=paper", "dry_run=true", "batch_size=60",
              "grad_accum=8", "data_dir=/d"])
  with pytest.raises(UserError, match="bad value for grad_accum"):
    run.main(["table=2", "grad_accum=0"])


def test_plan_counts_one_micro_batch_of_activations(capsys):
  """mode=plan with grad_accum: activations of batch / grad_accum images per device, plus the
  summed gradients; the paper's 128x128 U-Net at batch 512 fits one H100 only so."""
  def plan(*extra):
    run.main(["table=2", f"row={SHIFT32}", "scale=paper", "mode=plan", "format=json", *extra])
    return json.loads(capsys.readouterr().out)[0]
  whole, accum = plan(), plan("grad_accum=8")
  assert whole["memory"]["images_per_device"] == 512 and not whole["fits"]
  assert accum["memory"]["images_per_device"] == 64 and accum["fits"] and accum["grad_accum"] == 8
  assert accum["batch_size"] == whole["batch_size"] == 512
  assert accum["memory"]["grad_accum_bytes_per_device"] == 4 * accum["params"]  # float32
  assert accum["train_cost"] == whole["train_cost"]


@pytest.mark.slow
def test_smoke_row_with_overrides_trains_and_records_them(tmp_path):
  """grad_accum=2 steps=2 at smoke scale: the run trains 2 steps in micro-batches of 4, its
  config.gin says so, and job.json records what changed against the row."""
  workdir = str(tmp_path / "runs")
  run.main(["table=2", f"row={SHIFT32}", "scale=smoke", f"workdir={workdir}", "eval=false",
            "grad_accum=2", "steps=2"])
  (name,) = os.listdir(workdir)
  assert name == _job("2", "128x128", "cosine (shifted to 32)").name + "-accum2-steps2"
  run_dir = os.path.join(workdir, name)
  with open(os.path.join(run_dir, "job.json")) as f:
    record = json.load(f)
  assert record["modified"] == {"batch_size": [8, 8], "grad_accum": [1, 2], "num_steps": [4, 2]}
  assert record["overrides"] == ["Train.grad_accum = 2", "Train.num_steps = 2"]
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [2]
  with open(os.path.join(run_dir, "config.gin")) as f:
    config = f.read()
  assert "Train.grad_accum = 2" in config and "Train.num_steps = 2" in config
