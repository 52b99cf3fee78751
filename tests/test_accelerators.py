"""Accelerators (issue 15): peak and memory tables, plan's bytes per device and refusals, the SLURM
launcher's scripts, the AOT-compiled paper-scale step on a faked 8-device mesh, the GPU check's
plumbing and JSON on a CPU, and the Tables 4/5 speed columns end to end."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from core import benchmark, hardware
from core.errors import UserError
from experiments import run
from tables import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UVIT2B_256 = "row=256x256/simple diffusion (U-ViT 2B)"


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.pop("XLA_FLAGS", None)
  return env


def test_tpu_slices_count_chips_like_cloud_tpu():
  # Cloud TPU: v2/v3/v4/v5p slice names count TensorCores (2 per chip), v5e/v6e count chips.
  acc, chips = hardware.parse_tpu_type("v4-256")
  assert (acc.name, chips, hardware.devices_in_slice(acc, chips)) == ("v4", 128, 128)  # paper: 128 TPUv4 chips
  acc, chips = hardware.parse_tpu_type("v2-64")
  assert (chips, hardware.devices_in_slice(acc, chips)) == (32, 64)  # paper: 64 TPUv2 devices
  assert hardware.parse_tpu_type("v6e-16")[1] == 16 and hardware.parse_tpu_type("v5p-128")[1] == 64
  # JAX enumerates one device per v2/v3 core: 45 TFLOP/s and 16 GiB per v2 chip, half per device.
  assert hardware.peak_flops("TPU v2") == 22.5e12 and hardware.TPUS["v2"].memory_per_device == 8 * 2 ** 30
  assert hardware.for_device_kind("NVIDIA H100 80GB HBM3").memory_bytes == 80 * 2 ** 30
  with pytest.raises(ValueError, match="unknown TPU type 'v9-8'"):
    hardware.parse_tpu_type("v9-8")


def test_state_bytes_follow_the_fsdp_rule():
  tree = {"big": jax.ShapeDtypeStruct((1024, 64), jnp.float32), "odd": jax.ShapeDtypeStruct((4099, 3), jnp.float32),
          "small": jax.ShapeDtypeStruct((10,), jnp.float32)}
  total, per_device = benchmark.state_bytes(tree, 8)
  assert total == 4 * (1024 * 64 + 4099 * 3 + 10)
  # 'big' splits 8 ways; 'odd' has no dimension divisible by 8 and 'small' is below 4096: replicated.
  assert per_device == 4 * (1024 * 64 // 8 + 4099 * 3 + 10)


def _plan(capsys, *args):
  assert run.main(["table=7", "scale=paper", "mode=plan", "format=json", UVIT2B_256, *args]) == 0
  return json.loads(capsys.readouterr().out)[0]


def test_plan_bytes_per_device_and_refusal(capsys, tmp_path):
  paper = _plan(capsys, "launcher=tpu")  # the paper's hardware: 128 TPUv4 chips
  m = paper["memory"]
  # Parameters, two Adam moments and the EMA in float32: 16 bytes per parameter (+ a few counters).
  assert abs(m["state_bytes_total"] - 16 * paper["params"]) < 1024
  assert paper["chips"] == 128 and paper["devices"] == 128 and m["fsdp"] == 128
  assert m["images_per_device"] == 2048 // 128 and paper["fits"]
  assert m["state_bytes_total"] / 128 <= m["state_bytes_per_device"] < 1.01 * m["state_bytes_total"] / 128
  assert paper["cost_unit"] == "TPU chip-hours" and paper["eval_sampler_steps"] == 256
  small = _plan(capsys, "launcher=tpu", "tpu_type=v4-8")
  assert not small["fits"] and small["bytes_per_device"] > 28 * 2 ** 30
  with pytest.raises(UserError, match=r"does not fit on TPU v4-8: about .* GiB per device .* use more chips"):
    run.main(["table=7", "scale=paper", UVIT2B_256, "launcher=tpu", "tpu_type=v4-8", "dry_run=true",
              f"workdir={tmp_path}", "repo_url=x", "data_dir=gs://b/imagenet{res}"])
  with pytest.raises(UserError, match="does not fit on 2x H100"):
    run.main(["table=7", "scale=paper", UVIT2B_256, "launcher=slurm", "nodes=1", "gpus_per_node=2",
              "dry_run=true", "workdir=/shared/sd", "data_dir=/shared/imagenet{res}"])


def test_plan_evaluation_cost_counts_guided_passes(capsys):
  assert run.main(["table=9", "scale=paper", "mode=plan", "format=json", "row=256x256/guidance 1.00",
                   "launcher=tpu"]) == 0
  one = json.loads(capsys.readouterr().out)[0]
  assert run.main(["table=9", "scale=paper", "mode=plan", "format=json", "row=256x256/guidance 1.40",
                   "launcher=tpu"]) == 0
  guided = json.loads(capsys.readouterr().out)[0]
  # Unguided: 257 forward passes per sample (256 steps + the final prediction); guided: twice that.
  assert guided["eval_cost"] == pytest.approx(2 * one["eval_cost"], rel=1e-9)
  flops = 50_000 * 257 * one["gflops_per_image"] * 1e9
  assert one["eval_hours"] == pytest.approx(flops / (0.4 * 275e12 * 128) / 3600, rel=1e-9)


def _scripts(text: str) -> dict[str, str]:
  out, name = {}, None
  for line in text.splitlines(keepends=True):
    if line.startswith("# ---- "):
      name = line[7:].strip()
      out[name] = ""
    elif name:
      out[name] += line
  return out


def test_slurm_scripts_parse_and_run_the_same_command_on_every_task(capsys, tmp_path):
  args = ["table=2", "scale=demo", "launcher=slurm", "dry_run=true", "workdir=/shared/sd", "nodes=2",
          "gpus_per_node=4", "row=128x128/cosine (shifted to 64)", "partition=gpu"]
  assert run.main(args) == 0
  scripts = _scripts(capsys.readouterr().out)
  assert run.main(args) == 0
  assert _scripts(capsys.readouterr().out) == scripts  # resubmitting is the same job: it resumes
  (name, text), = scripts.items()
  path = tmp_path / name
  path.write_text(text)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=TERM@120"):
    assert line in text.splitlines()
  # Run it with a stand-in srun that records its arguments and the environment it was given.
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "srun").write_text('#!/bin/bash\necho "$PWD|$PYTHONUNBUFFERED|$*" >> "$SRUN_LOG"\n')
  (bindir / "srun").chmod(stat.S_IRWXU)
  log = tmp_path / "srun.log"
  env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SRUN_LOG": str(log),
         "SLURM_SUBMIT_DIR": str(tmp_path)}
  assert subprocess.run(["bash", str(path)], env=env).returncode == 0
  train, evaluate = log.read_text().splitlines()
  run_dir = f"/shared/sd/{name[:-len('.sbatch')]}"
  assert train.startswith(f"{tmp_path}|1|--kill-on-bad-exit=1 {tmp_path}/.venv/bin/python -m core.train ")
  assert f"workdir={run_dir} mesh.fsdp=-1 distributed=true" in train
  assert "-m eval.worker" in evaluate and f"workdir={run_dir}" in evaluate and evaluate.endswith("distributed=true")


def test_slurm_needs_shared_storage():
  with pytest.raises(UserError, match="launcher=slurm needs workdir on shared storage"):
    run.main(["table=2", "scale=demo", "launcher=slurm", "dry_run=true", "workdir=runs/x",
              "row=128x128/cosine (shifted to 64)"])


@pytest.mark.slow
def test_paper_uvit2b_step_compiles_sharded_over_8_devices():
  """AOT-compiles the real training step of the paper's U-ViT 2B (256) on a faked 8-device mesh."""
  p = subprocess.run([sys.executable, "-m", "experiments.run", "table=7", "scale=paper", "mode=plan", "aot=true",
                      "aot_devices=8", "launcher=tpu", "format=json", UVIT2B_256],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-2000:]
  plan = json.loads(p.stdout)[0]
  aot = plan["aot"]
  assert aot["devices"] == 8 and aot["fsdp"] == 8 and aot["batch_size"] == 8
  state_total = aot["state_bytes_total"]
  assert state_total == plan["memory"]["state_bytes_total"]
  # XLA's arguments on one device: its state shard (about 1/8 of parameters + Adam + EMA) and its image.
  state_on_device = aot["compiled"]["argument_bytes"] - aot["batch_bytes_per_device"]
  assert state_on_device == aot["state_bytes_per_device"]  # exactly core.sharding's rule
  assert 1 / 8 <= state_on_device / state_total < 1.01 / 8
  assert aot["compiled"]["temp_bytes"] > 0


# The stages the smoke test runs: each code path of the check once (the baseline's profile and
# its nearest up-sampling, the fallback-carrying 36-block stage, the scanned U-Net's profile, the
# sampler with weights cast once, and every training change together); the other five are the
# same core.benchmark runs with one setting each, which test_gpu_check_stages_change_one_setting_each
# reads from their arguments and tests/test_models_perf.py checks setting by setting.
SMOKE_RUN = ["train_uvit_benchmark256", "train_uvit36_256", "train_unet256", "sample_uvit_benchmark256",
             "train_uvit_benchmark256_all"]
GPU_CHECK_STAGES = ["train_uvit_benchmark256", "train_uvit_benchmark256_transposed",
                    "train_uvit_benchmark256_minimal", "train_uvit36_256", "train_unet256",
                    "sample_uvit_benchmark256", "sample_uvit_benchmark256_noprecast",
                    "train_uvit_benchmark256_pallas", "train_uvit_benchmark256_rbg",
                    "train_uvit_benchmark256_all"]


def _gpu_check():
  spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("smoke", [True, False])
def test_gpu_check_stages_change_one_setting_each(smoke):
  """Each A/B stage is the stage before it in the chain with the one setting its name says."""
  stages = {st["name"]: st["args"] for st in _gpu_check().stages(smoke)}
  assert list(stages) == GPU_CHECK_STAGES
  base = [a for a in stages["train_uvit_benchmark256"] if a not in ("profile=2", "UViT.upsample_impl='nearest'")]
  transposed = ["UViT.upsample_impl='transposed'"] if smoke else []   # 'auto' is transposed on a GPU
  pallas = ["UViT.attention_impl='pallas'"] + (["pallas_attention.block_q=16", "pallas_attention.block_k=16",
                                               "pallas_attention.block_backward=16"] if smoke else [])
  assert "UViT.upsample_impl='nearest'" in stages["train_uvit_benchmark256"]
  assert stages["train_uvit_benchmark256_transposed"] == base + transposed
  assert stages["train_uvit_benchmark256_minimal"] == base + transposed + ["remat_policy=minimal"]
  assert stages["train_uvit_benchmark256_pallas"] == base + transposed + pallas
  assert stages["train_uvit_benchmark256_rbg"] == base + transposed + ["Train.prng_impl='unsafe_rbg'"]
  assert stages["train_uvit_benchmark256_all"] == (base + transposed + ["remat_policy=minimal"] + pallas
                                                   + ["Train.prng_impl='unsafe_rbg'"])
  assert stages["sample_uvit_benchmark256_noprecast"] == stages["sample_uvit_benchmark256"] + ["precast=false"]
  assert "what=sample" in stages["sample_uvit_benchmark256"]


@pytest.mark.slow
def test_gpu_check_smoke_writes_one_json(tmp_path):
  """The check's plumbing on a CPU: stages (the baseline and A/Bs of docs/performance.md) each in
  its own process at tiny shapes, with the settings it names, the comparisons with the baseline,
  the targets (not judged in smoke mode), the stages not asked for listed as skipped, one JSON file."""
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), f"out={tmp_path}",
                      "budget_s=3000", "only=" + ",".join(SMOKE_RUN)],
                     env={**_env(), "GPU_CHECK_SMOKE": "1"}, capture_output=True, text=True, timeout=3000)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  (path,) = glob.glob(str(tmp_path / "*.json"))
  doc = json.load(open(path))
  assert os.path.basename(path) == f"cpu-{doc['date']}-smoke.json" and doc["smoke"] and doc["device"] == "cpu"
  names = SMOKE_RUN
  assert [s["stage"] for s in doc["summary"]] == GPU_CHECK_STAGES
  assert {s["stage"]: s["status"] for s in doc["summary"]} == {
      n: "ok" if n in names else "skipped" for n in GPU_CHECK_STAGES}
  res = {n: doc["stages"][n]["result"] for n in names}
  for s in doc["summary"]:
    if s["stage"] in names:
      assert s["value"] > 0 and s["tflops_per_sec"] > 0 and s["mfu"] is None and s["compiled_bytes"] > 0
  base = res["train_uvit_benchmark256"]
  assert base["arch"] == "UViT" and base["dtype"] == "bfloat16" and base["batch_size"] == 2
  # The baseline is the 2026-11-27 configuration; each A/B changes the settings it names.
  assert (base["prng_impl"], base["upsample_impl"], base["remat_policy"], base["attention_impl"]) == (
      "threefry2x32", "nearest", None, "auto")
  assert res["train_uvit36_256"]["remat_policy"] == "minimal" and not res["train_uvit36_256"]["remat"]
  assert res["train_unet256"]["arch"] == "UNet" and res["train_unet256"]["compile_s"] > 0
  every = res["train_uvit_benchmark256_all"]
  assert (every["remat_policy"], every["attention_impl"], every["prng_impl"], every["upsample_impl"]) == (
      "minimal", "pallas", "unsafe_rbg", "transposed")
  by_stage = {s["stage"]: s for s in doc["summary"]}
  assert by_stage["train_uvit_benchmark256"]["vs_baseline"] is None
  rel = by_stage["train_uvit_benchmark256_all"]["vs_baseline"]
  assert rel == pytest.approx(every["img_per_sec"] / base["img_per_sec"])
  # Sampling: image-forwards/s counts both guided passes of every step and the final prediction.
  sample = res["sample_uvit_benchmark256"]
  assert sample["guided_batch"] == 2 * sample["batch_size"] and sample["precast"]
  assert sample["image_forwards_per_sec"] == pytest.approx(
      sample["guided_batch"] * (sample["sampler_steps"] + 1) / sample["seconds_per_call"])
  assert by_stage["sample_uvit_benchmark256"]["port"] == 745.0 and by_stage["train_uvit_benchmark256"]["port"] == 173.0
  # The targets of issue 29, each with the stage that measured it; never judged on smoke shapes.
  t = {x["metric"] + ":" + str(x["goal"]): x for x in doc["targets"]}
  assert set(t) == {"img_per_sec:250.0", "img_per_sec:150.0", "image_forwards_per_sec:1100.0", "compile_s:60.0"}
  assert all(x["met"] is None and x["value"] is not None for x in t.values())
  assert t["img_per_sec:150.0"]["stage"] == "train_uvit36_256"
  assert "core.benchmark" in doc["stages"][names[0]]["command"]
  # The profiled stages say where their device time went, and the kinds add up to the total.
  for name in ("train_uvit_benchmark256", "train_unet256"):
    prof = res[name]["profile"]
    assert prof["device_ms_per_step"] > 0 and prof["mapped_fraction"] > 0.8
    assert abs(sum(prof["by_kind"].values()) - prof["device_ms_per_step"]) < 0.01
    assert {"conv", "attention"} <= set(prof["by_kind"]) and by_stage[name]["device_ms_by_kind"] == prof["by_kind"]


@pytest.mark.slow
def test_table4_speed_column_measured_and_rendered(tmp_path, capsys):
  rows = "row=2+3 blocks at 16x16,4+5 blocks at 16x16"
  assert run.main(["table=4", "mode=throughput", "scale=smoke", f"workdir={tmp_path}", rows,
                   "throughput_steps=2"]) == 0
  lines = [json.loads(l) for l in open(tmp_path / "throughput.jsonl")]
  assert [l["row"] for l in lines] == ["2+3 blocks at 16x16", "4+5 blocks at 16x16"]
  assert all(l["steps_per_sec"] > 0 and l["table"] == "4" for l in lines)
  capsys.readouterr()
  render.main(["table=4", f"workdir={tmp_path}", f"out={tmp_path / 'tables'}"])
  md = open(tmp_path / "tables" / "table_4.md").read()
  ours = lines[0]["steps_per_sec"] / lines[1]["steps_per_sec"]
  row = next(l for l in md.splitlines() if l.startswith("| 2+3 blocks"))
  assert "114" in row and f"{100 * ours:.0f}" in row

