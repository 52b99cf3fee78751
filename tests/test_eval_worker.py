"""The eval worker on a real (tiny) trained run: exactly-once results under SIGKILL, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import ROOT, _env, run_train

pytestmark = pytest.mark.xdist_group("trained_run")

WORKER = ["num_samples=16", "batch_size=8", "sampler_steps=4", "guidance=1,2", "max_reference_images=16",
          "extractor=fid-helper", "once=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step smoke run of the paper's 128 U-Net config (class-conditional on the emoji set)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  run_train(workdir, "Train.num_steps=4", "Train.log_every=2")
  return workdir


def _worker(run_dir, *extra):
  return [sys.executable, "-m", "eval.worker", f"workdir={run_dir}", *WORKER, *extra]


def _rows(run_dir):
  path = os.path.join(run_dir, "eval", "results.jsonl")
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def _key(r):
  return (r["step"], r["metric"], r["guidance"])


@pytest.mark.slow
def test_worker_killed_and_restarted_writes_each_result_exactly_once(trained, tmp_path):
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  shutil.copytree(trained, clean)
  shutil.copytree(trained, killed)

  p = subprocess.run(_worker(clean, "save_samples=npz"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  want = {_key(r): r for r in _rows(clean)}
  import numpy as np
  from PIL import Image
  saved = np.load(clean / "eval" / "samples" / "step4_w1.npz")["images"]
  assert saved.shape == (16, 16, 16, 3) and saved.dtype == np.uint8
  grid = Image.open(clean / "eval" / "samples_4.png")
  assert grid.size[0] >= 4 * 16 and grid.mode == "RGB"
  assert set(want) == {(4, m, w) for m in ("fid_train", "fid_eval") for w in (1.0, 2.0)}
  assert all(r["num_samples"] == 16 and r["extractor"].startswith("fid-helper") for r in want.values())

  # Kill once the first guidance scale's rows are written, or its second scale has started sampling.
  p = subprocess.Popen(_worker(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  cache = killed / "eval" / "cache"
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    started_w2 = any(d.name.startswith("step4_w2") and any(d.iterdir()) for d in cache.glob("*")) if cache.exists() else False
    if _rows(killed) or started_w2:
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  p.wait()
  assert p.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
  p = subprocess.run(_worker(killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  got = _rows(killed)
  assert len(got) == len({_key(r) for r in got}) == 4  # none missing, none twice
  for r in got:  # sampling is deterministic, so the restarted worker reports the same numbers
    assert r["value"] == pytest.approx(want[_key(r)]["value"], rel=1e-6)

  # A third run finds everything done and appends nothing.
  p = subprocess.run(_worker(killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and len(_rows(killed)) == 4


def test_worker_errors_are_one_line(trained, tmp_path):
  from core.errors import UserError
  from eval import worker
  with pytest.raises(UserError, match="checkpoint step 999 does not exist .* available: \\[2, 4\\]"):
    worker.main([f"workdir={trained}", "once=true", "step=999"])
  with pytest.raises(UserError, match="not a run directory"):
    worker.main([f"workdir={tmp_path}", "once=true"])
  with pytest.raises(UserError, match="does not exist|not found|no such"):
    worker.main([f"workdir={trained}", "once=true", f"ref_train={tmp_path / 'missing.npz'}", *WORKER[:-1]])
