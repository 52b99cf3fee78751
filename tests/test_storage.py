"""core.io.storage on local paths and on a real GCS emulator (gcp-storage-emulator, no mocks)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from core.io import storage
from core.errors import UserError

FAST_RETRY = dict(initial_delay=0.01, max_delay=0.02, deadline=0.05, timeout=5.0)


def make_run_dir(root):
  """A small run directory laid out as in the team conventions."""
  files = {
      "config.gin": "UViT.num_transformer_blocks = 2\n",
      "job.json": '{"run_name": "r"}\n',
      "metrics.jsonl": '{"step": 1, "loss": 0.5}\n',
      "checkpoints/100/state/data.bin": os.urandom(3000),
      "checkpoints/100/_CHECKPOINT_METADATA": "{}",
      "tb/events.out.tfevents.1.host": os.urandom(100),
      "eval/results.jsonl": '{"step": 100, "metric": "fid_train", "value": 12.5}\n',
  }
  for rel, data in files.items():
    p = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
  return files


def test_paths():
  assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x")
  assert storage.join("gs://b/run/", "checkpoints", "10") == "gs://b/run/checkpoints/10"
  assert storage.join("gs://b", "a/b", "c") == "gs://b/a/b/c"
  assert storage.join("/tmp/run", "tb") == os.path.join("/tmp/run", "tb")
  assert storage.split("gs://b/a/b/") == ("b", "a/b")
  assert storage.basename("gs://b/run/10/") == "10"
  with pytest.raises(UserError, match="no bucket"):
    storage.split("gs:///x")


def test_local_roundtrip(tmp_path):
  d = str(tmp_path / "run")
  storage.write_bytes(storage.join(d, "a", "b.bin"), b"\x00\x01")
  assert storage.read_bytes(storage.join(d, "a", "b.bin")) == b"\x00\x01"
  storage.write_text(storage.join(d, "t.txt"), "h\u00e9llo")
  storage.write_text(storage.join(d, "t.txt"), "again")  # overwrite, atomically
  assert storage.read_text(storage.join(d, "t.txt")) == "again"
  assert sorted(os.listdir(d)) == ["a", "t.txt"]  # no temp file left behind
  storage.append_lines(storage.join(d, "l.jsonl"), ["1", "2\n"])
  storage.append_lines(storage.join(d, "l.jsonl"), ["3"])
  assert storage.read_text(storage.join(d, "l.jsonl")) == "1\n2\n3\n"
  assert storage.listdir(d) == ["a", "l.jsonl", "t.txt"]
  assert storage.list_files(d) == ["a/b.bin", "l.jsonl", "t.txt"]
  assert storage.list_files(d, "*.txt") == ["t.txt"]
  assert storage.exists(d) and storage.isdir(d) and not storage.exists(d + "/nope")
  storage.remove(storage.join(d, "t.txt"))
  storage.remove(storage.join(d, "t.txt"), missing_ok=True)
  storage.rmtree(storage.join(d, "a"))
  assert storage.listdir(d) == ["l.jsonl"]


def test_local_missing_is_one_line_user_error(tmp_path):
  p = str(tmp_path / "missing.txt")
  with pytest.raises(storage.NotFoundError) as e:
    storage.read_text(p)
  assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
  assert p in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError):
    storage.listdir(p)


def test_transient_classification():
  from google.api_core import exceptions as api_exceptions
  import requests
  for e in (api_exceptions.TooManyRequests("x"), api_exceptions.ServiceUnavailable("x"),
            api_exceptions.InternalServerError("x"), api_exceptions.GatewayTimeout("x"),
            requests.ConnectionError("x"), ConnectionResetError()):
    assert storage.is_transient(e), e
  for e in (api_exceptions.NotFound("x"), api_exceptions.Forbidden("x"),
            api_exceptions.BadRequest("x"), ValueError("x")):
    assert not storage.is_transient(e), e


def test_gcs_roundtrip(gcs_bucket):
  root = gcs_bucket
  storage.makedirs(root)  # no-op on GCS
  storage.write_bytes(storage.join(root, "x", "a.bin"), bytes(range(256)))
  assert storage.read_bytes(storage.join(root, "x", "a.bin")) == bytes(range(256))
  storage.write_text(storage.join(root, "config.gin"), "A.b = 1\n\u00e9\n")
  assert storage.read_text(storage.join(root, "config.gin")) == "A.b = 1\n\u00e9\n"
  storage.write_text(storage.join(root, "x", "y", "deep.txt"), "d")
  assert storage.exists(storage.join(root, "config.gin"))
  assert storage.exists(storage.join(root, "x"))  # a "directory"
  assert storage.isdir(storage.join(root, "x")) and not storage.isdir(root + "/config.gin")
  assert not storage.exists(storage.join(root, "nope"))
  assert storage.listdir(root) == ["config.gin", "x"]
  assert storage.listdir(storage.join(root, "x")) == ["a.bin", "y"]
  assert storage.list_files(root) == ["config.gin", "x/a.bin", "x/y/deep.txt"]
  assert storage.list_files(root, "x/*") == ["x/a.bin", "x/y/deep.txt"]
  assert storage.list_files(storage.join(root, "nope")) == []
  storage.remove(storage.join(root, "config.gin"))
  assert not storage.exists(storage.join(root, "config.gin"))
  storage.rmtree(storage.join(root, "x"))
  assert not storage.exists(root)


def test_gcs_append_lines(gcs_bucket):
  p = storage.join(gcs_bucket, "eval", "results.jsonl")
  storage.append_lines(p, ['{"step": 1}'])  # creates
  storage.append_lines(p, ['{"step": 2}', '{"step": 3}\n'])  # composes
  storage.append_lines(p, [])
  storage.append_lines(p, ['{"step": 4}'])
  assert storage.read_text(p) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n'
  assert storage.listdir(storage.join(gcs_bucket, "eval")) == ["results.jsonl"]  # no leftovers


def test_gcs_missing_object_and_bucket(gcs_bucket):
  p = storage.join(gcs_bucket, "missing.txt")
  with pytest.raises(storage.NotFoundError) as e:
    storage.read_bytes(p)
  assert p in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(storage.NotFoundError):
    storage.listdir(storage.join(gcs_bucket, "nodir"))
  with pytest.raises(UserError, match="bucket gs://no-such-bucket-xyz does not exist"):
    storage.read_text("gs://no-such-bucket-xyz/a.txt")
  with pytest.raises(UserError, match="no-such-bucket-xyz"):
    storage.write_text("gs://no-such-bucket-xyz/a.txt", "x")
  assert not storage.exists("gs://no-such-bucket-xyz/a.txt")


def test_gcs_copy_tree(gcs_bucket, tmp_path):
  src = tmp_path / "src"
  files = make_run_dir(str(src))
  storage.copy_from_local(str(src), storage.join(gcs_bucket, "run"))
  assert storage.list_files(storage.join(gcs_bucket, "run")) == sorted(files)
  storage.copy_to_local(storage.join(gcs_bucket, "run"), str(tmp_path / "back"))
  for rel, data in files.items():
    got = (tmp_path / "back" / rel).read_bytes()
    assert got == (data.encode() if isinstance(data, str) else data)
  storage.copy_to_local(storage.join(gcs_bucket, "run", "config.gin"), str(tmp_path / "c.gin"))
  assert (tmp_path / "c.gin").read_text() == files["config.gin"]
  with pytest.raises(storage.NotFoundError):
    storage.copy_to_local(storage.join(gcs_bucket, "nothing"), str(tmp_path / "n"))


def test_syncer_mirrors_run_directory(gcs_bucket, tmp_path):
  local = str(tmp_path / "run")
  remote = storage.join(gcs_bucket, "run")
  files = make_run_dir(local)
  os.makedirs(os.path.join(local, "checkpoints", "200.orbax-checkpoint-tmp-1"))
  with open(os.path.join(local, "checkpoints", "200.orbax-checkpoint-tmp-1", "x"), "w") as f:
    f.write("partial")
  mirror = storage.Syncer(local, remote)
  r = mirror.sync()
  assert sorted(r.uploaded) == sorted(files) and r.ok
  assert storage.list_files(remote) == sorted(files)  # the tmp checkpoint is not uploaded
  r = mirror.sync()
  assert r.uploaded == [] and r.skipped == len(files)
  storage.append_lines(os.path.join(local, "metrics.jsonl"), ['{"step": 2, "loss": 0.4}'])
  r = mirror.sync()
  assert r.uploaded == ["metrics.jsonl"]
  assert storage.read_text(storage.join(remote, "metrics.jsonl")).count("\n") == 2
  # A restarted process (new Syncer) finds matching MD5s remotely and uploads nothing.
  r = storage.Syncer(local, remote).sync()
  assert r.uploaded == [] and r.skipped == len(files)
  # delete=True removes the remote copies of files that disappeared locally.
  syncer = storage.Syncer(local, remote, delete=True)
  syncer.sync()
  storage.rmtree(os.path.join(local, "checkpoints", "100"))
  r = syncer.sync()
  assert sorted(r.deleted) == ["checkpoints/100/_CHECKPOINT_METADATA",
                               "checkpoints/100/state/data.bin"]
  assert not storage.exists(storage.join(remote, "checkpoints"))
  assert storage.exists(storage.join(remote, "config.gin"))


def test_sync_queues_failed_upload_and_retries_it(gcs_bucket, gcs_emulator, tmp_path):
  local = str(tmp_path / "run")
  remote = storage.join(gcs_bucket, "run")
  make_run_dir(local)
  syncer = storage.Syncer(local, remote)
  assert syncer.sync().ok
  new = ["checkpoints/200/data.bin", "checkpoints/200/commit_success.txt"]
  storage.write_text(os.path.join(local, "checkpoints", "200", "commit_success.txt"), "ok")
  storage.write_text(os.path.join(local, "checkpoints", "200", "data.bin"), "step 200")
  gcs_emulator.stop()  # GCS outage: connections are refused
  try:
    with storage.retry_options(**FAST_RETRY):
      r = syncer.sync()
  finally:
    gcs_emulator.start()
  assert r.uploaded == [] and r.failed == new and syncer.pending == new
  assert not storage.exists(storage.join(remote, "checkpoints", "200"))
  with storage.retry_options(**FAST_RETRY):
    r = syncer.sync()
  assert r.uploaded == new and r.ok and syncer.pending == []  # the commit marker goes last
  assert storage.read_text(storage.join(remote, "checkpoints", "200", "data.bin")) == "step 200"


def test_sync_holds_commit_marker_until_checkpoint_files_arrive(tmp_path):
  local, remote = str(tmp_path / "run"), str(tmp_path / "mirror")
  for rel in ("ckpt/5/default/d/x", "ckpt/5/default/commit_success.txt",
              "ckpt/5/commit_success.txt", "ckpt/5/_CHECKPOINT_METADATA", "metrics.jsonl"):
    storage.write_text(os.path.join(local, rel), rel)
  storage.write_text(os.path.join(remote, "ckpt/5/default/d"), "")  # a file where a dir must go
  syncer = storage.Syncer(local, remote)
  r = syncer.sync()
  assert r.uploaded == ["metrics.jsonl"]
  assert r.failed == ["ckpt/5/default/d/x", "ckpt/5/default/commit_success.txt",
                      "ckpt/5/_CHECKPOINT_METADATA", "ckpt/5/commit_success.txt"]
  assert storage.list_files(remote) == ["ckpt/5/default/d", "metrics.jsonl"]
  os.unlink(os.path.join(remote, "ckpt/5/default/d"))
  r = syncer.sync()
  assert r.ok and r.uploaded[0] == "ckpt/5/default/d/x"
  assert r.uploaded[1] == "ckpt/5/default/commit_success.txt"  # deepest marker first
  assert storage.list_files(remote) == storage.list_files(local)


def test_transient_error_retried_with_backoff(gcs_bucket, gcs_emulator):
  p = storage.join(gcs_bucket, "retried.bin")
  gcs_emulator.stop()
  restarter = threading.Timer(0.3, gcs_emulator.start)
  restarter.start()
  t0 = time.monotonic()
  try:
    with storage.retry_options(initial_delay=0.1, multiplier=1.5, max_delay=1.0, deadline=30.0,
                               timeout=5.0):
      storage.write_bytes(p, b"arrived")  # first attempts fail: connection refused
  finally:
    restarter.join()
  assert time.monotonic() - t0 >= 0.3
  assert storage.read_bytes(p) == b"arrived"
  gcs_emulator.stop()
  try:
    with storage.retry_options(**FAST_RETRY):
      with pytest.raises(storage.TransientError, match="giving up after") as e:
        storage.read_bytes(p)
    attempts = int(str(e.value).split("giving up after ")[1].split()[0])
    assert attempts >= 2 and str(e.value).count("\n") == 0  # retried, then one line
  finally:
    gcs_emulator.start()


def test_orbax_checkpoint_directly_on_gcs(gcs_bucket):
  """orbax writes gs:// through etils.epath -> gcsfs (metadata) and tensorstore (arrays)."""
  pytest.importorskip("gcsfs", reason="orbax needs gcsfs for gs:// paths (pip install gcsfs)")
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  tree = {"w": jnp.arange(6.0).reshape(2, 3), "opt": {"count": jnp.array(7, jnp.int32)}}
  ckpt_dir = storage.join(gcs_bucket, "run", "checkpoints")
  with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mgr:
    mgr.save(10, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [10]
  assert "10" in storage.listdir(ckpt_dir)
  with ocp.CheckpointManager(ckpt_dir) as mgr:
    assert mgr.latest_step() == 10
    got = mgr.restore(10, args=ocp.args.StandardRestore(jax.tree.map(np.zeros_like, tree)))
  np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3))
  assert int(got["opt"]["count"]) == 7
