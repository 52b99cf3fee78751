"""Resuming a run whose workdir is ``gs://`` (on gcp-storage-emulator), and the three ways the
stock emulator differs from GCS that used to make it fail (fixed in tests/gcs_emulator.py).

Each ``test_stock_emulator_*`` test runs the same requests against the stock emulator (where they
show the fault) and against the patched one every other test uses (where they behave as on GCS):
the faults are the emulator's, not tensorstore's, orbax's or our configuration's.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest
import tensorstore as ts

from core import checkpoint as ckpt_lib
from core.io import storage
from tests.gcs_emulator import GcsEmulator
from tests.test_train import ROOT, _env, losses, run_train, train_cmd

STOCK_BUCKET = "sd-stock-bucket"  # its own bucket: tensorstore caches open drivers per bucket


@pytest.fixture(scope="module")
def stock_emulator():
  emu = GcsEmulator(bucket=STOCK_BUCKET, stock=True)
  emu.start()
  yield emu
  emu.close()


@pytest.fixture(params=["stock", "patched"])
def emulator(request, stock_emulator, gcs_emulator, monkeypatch):
  """(emulator, is_stock) with the environment pointing tensorstore at it."""
  emu = stock_emulator if request.param == "stock" else gcs_emulator
  for k, v in emu.env.items():
    monkeypatch.setenv(k, v)
  return emu, request.param == "stock"


def _kvstore(emu, path, ocdbt=False):
  """A fresh tensorstore gcs kvstore (new context, no cache: like a new process) on ``path``."""
  spec = {"driver": "gcs", "bucket": emu.bucket, "path": path}
  spec = {"driver": "ocdbt", "base": spec} if ocdbt else spec
  return ts.KvStore.open(spec, context=ts.Context()).result(timeout=30)


def test_stock_emulator_download_lacks_the_generation_so_ocdbt_fails(emulator):
  """GCS sends ``x-goog-generation`` with every media download; tensorstore takes a read's
  generation from it. The stock emulator omits it, so reads report generation 0 and OCDBT's next
  manifest commit (conditioned on the generation it read) is refused: a resumed run, or a save of
  more arrays than one commit takes, fails."""
  emu, stock = emulator
  store = _kvstore(emu, f"gen-{os.urandom(4).hex()}/")
  written = store.write("a", b"hello").result(timeout=30).generation
  read = store.read("a").result(timeout=30)
  assert read.value == b"hello"
  assert (read.stamp.generation == written) != stock

  path = f"ocdbt-{os.urandom(4).hex()}/"
  _kvstore(emu, path, ocdbt=True).write("a", b"1").result(timeout=30)  # creates the manifest
  db = _kvstore(emu, path, ocdbt=True)  # reopened: reads the manifest and its generation
  if stock:
    with pytest.raises(ValueError, match="Malformed StorageGeneration"):
      db.write("b", b"2").result(timeout=30)
  else:
    db.write("b", b"2").result(timeout=30)
    assert [db.read(k).result(timeout=30).value for k in ("a", "b")] == [b"1", b"2"]


def test_stock_emulator_ignores_generation_preconditions(emulator):
  """``ifGenerationMatch`` (0: "no live object") must refuse a write when the object changed
  (412 on GCS); the stock emulator writes anyway, so two writers can both "win"."""
  emu, stock = emulator
  store = _kvstore(emu, f"pre-{os.urandom(4).hex()}/")
  missing = store.read("a").result(timeout=30).stamp.generation  # NoValue: ifGenerationMatch=0
  first = store.write("a", b"first").result(timeout=30).generation
  store.write("a", b"second").result(timeout=30)
  store.write("a", b"only if absent", if_equal=missing).result(timeout=30)
  store.write("a", b"only if unchanged", if_equal=first).result(timeout=30)
  value = store.read("a").result(timeout=30).value
  assert value == (b"only if unchanged" if stock else b"second")


def test_stock_emulator_takes_one_connection_at_a_time(emulator):
  """tensorstore keeps up to 32 requests in flight. The stock emulator handles one connection at
  a time with a listen backlog of 5: further connections are not accepted (the kernel drops their
  SYNs and clients resend them after 1, 3, 7... s), which is how restores stalled."""
  emu, stock = emulator
  conns = []
  try:
    for _ in range(32):
      try:
        conns.append(socket.create_connection(("127.0.0.1", emu.port), timeout=0.5))
      except OSError:  # connect timed out: the SYN was dropped
        break
    if stock:
      assert len(conns) < 32, "the stock emulator accepted 32 idle connections"
    else:
      assert len(conns) == 32
      last = conns[-1]
      last.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      last.settimeout(10)
      assert b"OK" in last.recv(4096)  # answered while 31 other connections sit idle
  finally:
    for c in conns:
      c.close()


def test_checkpointer_sees_checkpoints_another_process_wrote_later(gcs_bucket, tmp_path):
  """gcsfs (under orbax on gs://) caches listings for the life of the process: a checkpointer that
  listed a run once, like the eval worker polling a training run, must still see later steps."""
  run = gcs_bucket + "/run"
  writer = ckpt_lib.Checkpointer(run, with_data=False, async_save=False)
  writer.save(2, {"w": jax.numpy.arange(3.0)})
  writer.close()
  watcher = ckpt_lib.Checkpointer(run, with_data=False, async_save=False)
  assert watcher.all_steps() == [2]
  # Another process commits step 4 (through google-cloud-storage, which gcsfs knows nothing of).
  storage.copy_to_local(run + "/checkpoints/2", str(tmp_path / "4"))
  storage.copy_from_local(str(tmp_path / "4"), run + "/checkpoints/4")
  assert watcher.all_steps() == [2, 4]
  np.testing.assert_array_equal(watcher.restore(4, None)["w"], np.arange(3.0))


def _gcs_losses(run: str) -> dict[int, float]:
  rows = [json.loads(l) for l in storage.read_text(run + "/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "a step logged twice"
  return {r["step"]: r["loss"] for r in rows}


def _final_state(run: str, step: int):
  c = ckpt_lib.Checkpointer(run, with_data=False, async_save=False)
  try:
    return c.restore(step, None)  # no target: the arrays as saved
  finally:
    c.close()


@pytest.mark.slow
def test_resume_from_gcs_equals_an_uninterrupted_run(tmp_path, gcs_bucket):
  """workdir=gs://... with orbax's default OCDBT checkpoints: a run stopped after its step-2
  checkpoint and resumed from the bucket logs the same loss at every step, and ends with the same
  parameters, optimizer and EMA state, as an uninterrupted local run. config.gin, metrics.jsonl
  (each step once), TensorBoard events and the grain iterator state are on the bucket."""
  steps = ["Train.num_steps=4"]  # TINY checkpoints every 2 steps
  ref, ref_log = tmp_path / "ref", tmp_path / "ref.log"
  with open(ref_log, "w") as log:  # the reference trains while the gs:// run's first leg does
    uninterrupted = subprocess.Popen(train_cmd(ref, *steps), cwd=ROOT, env=_env(),
                                     stdout=log, stderr=subprocess.STDOUT)
  run = gcs_bucket + "/run"
  try:
    run_train(run, *steps, "stop_at_step=2")  # _env() carries the emulator's variables
    uninterrupted.wait(timeout=600)
  finally:
    if uninterrupted.poll() is None:
      uninterrupted.kill()
  assert uninterrupted.returncode == 0, ref_log.read_text()[-3000:]
  assert ckpt_lib.Checkpointer(run, with_data=False, async_save=False).all_steps() == [2]
  assert sorted(_gcs_losses(run)) == [1, 2]

  resumed = run_train(run, *steps)
  assert f"resumed from step 2 ({run}/checkpoints)" in resumed.stdout, resumed.stdout[-2000:]
  want = losses(ref)
  assert sorted(want) == [1, 2, 3, 4]
  assert _gcs_losses(run) == want  # bit for bit, steps 3 and 4 computed after the restore
  got_state, want_state = _final_state(run, 4), _final_state(str(ref), 4)
  assert set(got_state) == set(want_state) >= {"params", "opt_state", "ema_params"}
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)

  files = storage.list_files(run)
  assert "config.gin" in files and any(f.startswith("train/") for f in files)
  assert "train.lock" not in files  # the lease (taken: tests/test_runlock.py) is released at the end
  assert {"checkpoints/4/commit_success.txt", "checkpoints/4/_CHECKPOINT_METADATA"} & set(files)
  assert any(f.startswith("checkpoints/4/data/process_0-of-1") for f in files)  # grain state
