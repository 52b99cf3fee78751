"""The trainer end to end on tiny real configurations (the paper's gin files at smoke scale)."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's ImageNet-128 U-Net gin files with the smoke layer, cut to two levels at 16x16 so that
# the many processes these tests start compile in seconds.
TINY = [
    "gin_file=models/unet_imagenet128.gin", "gin_file=train/unet_imagenet.gin", "gin_file=scales/smoke.gin",
    "Train.image_size=16", "model.image_size=16", "schedule.name='cosine_shifted'", "schedule.image_d=16",
    "schedule.noise_d=8", "UNet.channel_multiplier=[1,2]", "UNet.num_res_blocks=[1,1]",
    "UNet.attn_resolutions=[8]", "UNet.dropout_from_resolution=8", "Train.batch_size=4", "Train.log_every=1",
    "Train.checkpoint_every=2",
]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "core.train", *TINY, f"workdir={workdir}", *extra]


def run_train(workdir, *extra, check=True, env=None):
  p = subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                     timeout=600)
  if check and p.returncode:
    raise AssertionError(f"core.train failed ({p.returncode}):\n{p.stderr[-4000:]}")
  return p


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_sigkill_at_random_step_resumes_bit_exactly(tmp_path):
  """A run killed with SIGKILL and restarted logs the same loss at every step as one never killed."""
  steps = ["Train.num_steps=10"]
  ref = tmp_path / "ref"
  run_train(ref, *steps)
  want = losses(ref)
  assert sorted(want) == list(range(1, 11))

  killed = tmp_path / "killed"
  kill_after = random.Random(os.getpid()).randint(3, 8)
  p = subprocess.Popen(train_cmd(killed, *steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= kill_after:
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  p.wait()
  assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # The killed run's lock file still names it, but the kernel released the lock: no stale lock.
  assert json.loads((killed / "train.lock").read_text())["pid"] == p.pid
  run_train(killed, *steps)
  got = losses(killed)
  assert sorted(got) == sorted(want)
  for s in want:
    assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r} (killed after {kill_after} rows)"
  # Every logged step appears exactly once.
  rows = [json.loads(l)["step"] for l in open(metrics)]
  assert rows == sorted(set(rows))


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint(tmp_path):
  """SIGTERM stops the run with exit status 75 (EX_TEMPFAIL) after a checkpoint at the step it
  stopped, every row logged once. While it runs, a second trainer on the same run directory is
  refused with one line naming the first's pid (issue 12, harmful 1 and 2)."""
  from core import checkpoint as ckpt_lib
  from tests.test_faults_train import one_error_line
  workdir = tmp_path / "run"
  p = subprocess.Popen(train_cmd(workdir, "Train.num_steps=100000", "Train.checkpoint_every=100000"), cwd=ROOT,
                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 3):
      time.sleep(0.05)
    line = one_error_line(run_train(workdir, "Train.num_steps=100000", check=False))
    assert f"in use by process {p.pid} on " in line, line
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 75, err[-2000:]
  last = [l for l in err.splitlines() if l.strip()][-1]
  assert last.startswith("preempted: SIGTERM at step") and "rerun" in last, err[-2000:]
  step = int(last.split("at step ")[1].split(":")[0])
  assert step >= 3
  assert ckpt_lib.Checkpointer(str(workdir), with_data=False).all_steps() == [step]
  assert [json.loads(l)["step"] for l in open(metrics)] == list(range(1, step + 1))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """Two JAX processes on localhost (real collectives) equal one process with the same global batch."""
  common = ["Train.num_steps=4", "Train.num_data_shards=2", "Train.async_checkpoints=False"]
  single = tmp_path / "single"
  run_train(single, *common)
  port = _free_port()
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(train_cmd(multi, *common, f"coordinator=127.0.0.1:{port}", "num_processes=2",
                                      f"process_id={i}"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = losses(single), losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)


@pytest.mark.slow
def test_grad_accum_on_two_devices_trains_like_the_whole_batch(tmp_path):
  """Train.grad_accum=2 on two (CPU) devices, each micro-batch split over both: the same loss
  and gradient norm at every step as the whole batch at once. A grad_accum that leaves fewer
  images than devices in a micro-batch is a one-line error."""
  env = _env(XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
  common = ["Train.num_steps=3", "Train.async_checkpoints=False"]
  run_train(tmp_path / "whole", *common, env=env)
  run_train(tmp_path / "accum", *common, "Train.grad_accum=2", env=env)
  rows = {name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")] for name in ("whole", "accum")}
  assert [r["step"] for r in rows["accum"]] == [r["step"] for r in rows["whole"]] == [1, 2, 3]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in rows["accum"]], [r[key] for r in rows["whole"]], rtol=1e-5)
  p = run_train(tmp_path / "bad", *common, "Train.grad_accum=4", check=False, env=env)
  lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
  assert "1 images per micro-batch is not divisible by the 2 devices" in lines[0]


def test_bad_binding_is_one_line_error_before_compiling(tmp_path):
  p = run_train(tmp_path / "bad", "UNet.num_res_blockz=[1]", check=False)
  assert p.returncode == 2
  lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
  assert "num_res_blockz" in lines[0] and "num_res_blocks" in lines[0]  # names it and suggests the fix
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unknown_configurable_is_one_line_error(tmp_path):
  p = run_train(tmp_path / "bad", "UNett.base_channels=8", check=False)
  assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
  assert "UNett" in p.stderr


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
  """An infinite learning rate poisons the weights; later non-finite steps are not applied, and the
  run stops naming the step and the last good checkpoint."""
  workdir = tmp_path / "nan"
  p = run_train(workdir, "Train.num_steps=50", "Train.learning_rate=1e38", "Train.max_nonfinite_in_a_row=3",
                "Train.adam_eps=1e-30", check=False)
  assert p.returncode == 2, p.stderr[-2000:]
  msg = p.stderr.strip().splitlines()[-1]
  assert msg.startswith("error: stopping at step") and "last good checkpoint" in msg
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert any(not r["finite"] for r in rows)


@pytest.mark.slow
def test_prng_impl_changes_the_step_randomness_only():
  """Train.prng_impl: the default is JAX's threefry; rbg draws other noise and dropout,
  deterministically, from the same state; an unknown name is a one-line error."""
  import dataclasses
  import functools
  import jax
  from core import schedules, trainer
  from core.errors import UserError
  from core.models.unet import UNet
  model = UNet(base_channels=8, emb_channels=16, channel_multiplier=(1,), num_res_blocks=(1,),
               attn_resolutions=(), num_heads=1, dropout=0.5, dropout_from_resolution=16)
  base = trainer.TrainConfig(image_size=8, batch_size=4, warmup_steps=0)
  logsnr_fn = schedules.get_schedule("cosine_shifted", image_d=8, noise_d=8)
  state = trainer.init_state(model, trainer.make_optimizer(base), base, jax.random.key(0), num_classes=0)
  batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}

  def step(cfg):
    return jax.jit(functools.partial(trainer.train_step, model=model, tx=trainer.make_optimizer(cfg),
                                     logsnr_fn=logsnr_fn, cfg=cfg, num_classes=0))

  assert base.prng_impl == "threefry2x32"
  threefry = float(step(base)(state, batch)[1]["loss"])
  rbg_step = step(dataclasses.replace(base, prng_impl="rbg"))
  rbg = float(rbg_step(state, batch)[1]["loss"])
  assert np.isfinite(rbg) and rbg != threefry and float(rbg_step(state, batch)[1]["loss"]) == rbg
  with pytest.raises(UserError, match="Train.prng_impl='philox' is unknown"):
    trainer.TrainConfig(prng_impl="philox")
