"""Records hold encoded images (issue 26 item 4): decoded, they are exactly the ADM pixels that
training and the FID reference see; each host caches only the shard files it reads.

The truth is the ADM preprocessing spelled out here with PIL and numpy on the source files (real
photographs from ``skimage.data`` and the emoji set), not the project's own code path.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
import numpy as np
import pytest
from PIL import Image

from benchmarks import data_decode
from core.data import __main__ as data_cli
from core.data import emoji, pipeline, prepare, records
from core.errors import UserError
from eval import reference
from experiments import plan, tpu
from tests.fault_helpers import ROOT, run_in_process

RES = 256
PHOTOS = data_decode.PHOTOS  # skimage.data's colour photographs (files shipped inside the package)


def photo_bytes() -> dict[str, bytes]:
  """Each photograph as shipped, plus an ImageNet-like JPEG of it (longer side 500, quality 90),
  as benchmarks/data_decode.py measures them."""
  made = data_decode.sources()
  out = dict(made["as shipped"])
  out.update({os.path.splitext(n)[0] + "-500.jpg": b for n, b in made["imagenet-like jpeg"].items()})
  return out


def adm_truth(data: bytes, res: int) -> np.ndarray:
  """ADM's center crop, spelled out: RGB (alpha over white), BOX halvings while both sides are
  >= 2 res, one BICUBIC to the smaller side = res, the central res x res window (numpy)."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    if img.mode in ("RGBA", "LA", "P"):
      rgba = img.convert("RGBA")
      img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
    img = img.convert("RGB")
  while min(img.size) >= 2 * res:
    img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
  w, h = img.size
  s = res / min(w, h)
  img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
  a = np.asarray(img)
  top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
  return a[top:top + res, left:left + res]


def records_in_file_order(data_dir: str, split: str) -> list[dict]:
  meta = records.read_meta(data_dir)
  out = []
  for name in meta["shards"][split]:
    reader = ArrayRecordReader(os.path.join(data_dir, name))
    out += [records.decode_record(r) for r in reader.read_all()]
    reader.close()
  return out


def assert_everything_sees_the_truth(data_dir: str, truth: dict[str, np.ndarray]) -> None:
  """Records, the training pipeline's batches (decoded in a grain worker process) and the FID
  reference's reading path all give the truth's pixels."""
  recs = records_in_file_order(data_dir, "train")
  keys = [r["key"] for r in recs]
  assert sorted(keys) == sorted(truth)
  for r in recs:
    np.testing.assert_array_equal(r["image"], truth[r["key"]], err_msg=r["key"])
  with pipeline.make_train_loader(data_dir, global_batch_size=len(keys), seed=0, shuffle=False,
                                  random_flip=False, num_workers=1, process_index=0,
                                  process_count=1, num_epochs=1) as it:
    (batch,) = list(it)
  np.testing.assert_array_equal(batch["image"], np.stack([truth[k] for k in keys]))
  fid = np.concatenate(list(reference.read_split_batches(data_dir, "train", batch_size=5)))
  np.testing.assert_array_equal(fid, np.stack([truth[k] for k in keys]))


def test_photographs_at_256_decode_to_the_adm_pixels(tmp_path, capsys):
  src = tmp_path / "photos"
  src.mkdir()
  files = photo_bytes()
  for name, data in files.items():
    (src / name).write_bytes(data)
  out = str(tmp_path / "out")
  meta = prepare.prepare(str(src), RES, out, eval_fraction=0.0, shards=2, progress=False)
  assert meta["format"] == records.FORMAT and meta["counts"]["train"] == len(files)
  # Both encodings occur: the small JPEGs are kept as they are, the large files become PNGs.
  assert meta["codecs"]["train"]["src"] >= 1 and meta["codecs"]["train"]["png"] >= 1
  assert_everything_sees_the_truth(out, {k: adm_truth(v, RES) for k, v in files.items()})
  # The size per image is reported, and it is the shards' bytes over the images.
  per_image = sum(os.path.getsize(os.path.join(out, n)) for n in meta["shards"]["train"])
  per_image /= len(files)
  assert per_image < 0.75 * RES * RES * 3  # less than raw pixels
  proc = run_in_process(capsys, data_cli.main, "info", f"data_dir={out}", "hosts=2")
  assert proc.returncode == 0, proc.stderr
  assert f"train: {per_image / 1e3:,.1f} kB per image" in proc.stdout
  assert "bytes per host (2 hosts, train split)" in proc.stdout


def test_emoji_at_256_decode_to_the_adm_pixels(tmp_path):
  try:
    tarball = emoji.emoji_tarball()
  except UserError as e:
    pytest.skip(f"the emoji tarball is not available: {e}")
  out = str(tmp_path / "emoji")
  meta = prepare.prepare(tarball, RES, out, max_images=24, splits=["train"], progress=False)
  assert meta["counts"]["train"] == 24
  source = emoji.emoji_source(tarball, splits=["train"])
  truth = {it.key: adm_truth(it.data, RES) for it in source.items["train"][:24]}
  assert_everything_sees_the_truth(out, truth)


def test_a_source_record_that_decodes_to_other_pixels_is_refused():
  """A 'src' record whose source does not give the pixels recorded at prepare (another Pillow)
  is a one-line error naming the fix, never silently different data."""
  with io.BytesIO() as b:
    Image.new("RGB", (20, 20), (1, 2, 3)).save(b, "PNG")
    small = b.getvalue()
  noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  rec = records.encode_record(noise, 0, key="k", source=small)  # the source is the smaller one
  assert records.decode_header(rec)[0]["codec"] == "src"
  with pytest.raises(UserError, match="other pixels than when it was prepared.*Pillow"):
    records.decode_record(rec)


def test_format_1_data_sets_with_raw_pixels_are_still_read(tmp_path):
  """A data set written by the previous format (raw uint8 pixels after the header; records built
  here with struct, not the project's encoder) loads as before."""
  images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  out = tmp_path / "old"
  out.mkdir()
  w = ArrayRecordWriter(str(out / "train-00000-of-00001.array_record"), "group_size:1")
  for i, img in enumerate(images):
    h = json.dumps({"shape": [4, 4, 3], "label": i, "key": f"{i}"}).encode()
    w.write(b"SDR1" + struct.pack("<I", len(h)) + h + img.tobytes())
  w.close()
  (out / "meta.json").write_text(json.dumps({
      "format": "simple-diffusion-records/1", "resolution": 4, "num_classes": 5,
      "counts": {"train": 5}, "shards": {"train": ["train-00000-of-00001.array_record"]},
      "shard_counts": {"train": [5]}}))
  got, labels = pipeline.load_split(str(out), "train")
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(labels, np.arange(5))
  assert records.check_shards(str(out), records.read_meta(str(out)), full=True) == 5


# ---------------------------------------------------------------------------------------------
# Each host caches only its own shard files.

N, SHARDS = 24, 4

HOST = """
import json, os, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from core.data import pipeline, records
data_dir = sys.argv[3]
ids = lambda b: b["image"][:, 0, 0, 0].tolist()
loader = pipeline.ShardedLoader(data_dir, batch_size=4, seed=7, num_shards=2)
first = [ids(next(loader)) for _ in range(4)]
state = loader.get_state()
then = [ids(next(loader)) for _ in range(3)]
loader.close()
again = pipeline.ShardedLoader(data_dir, batch_size=4, seed=7, num_shards=2)
again.set_state(state)
resumed = [ids(next(again)) for _ in range(3)]
again.close()
cache = records.localize(data_dir)
print(json.dumps({"process": jax.process_index(), "batches": first + then, "resumed": resumed,
                  "cache": sorted(n for n in os.listdir(cache) if n.endswith(".array_record"))}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_each_cache_only_their_shards_of_a_gcs_data_set(tmp_path, gcs_bucket,
                                                                  monkeypatch):
  """Two JAX processes (jax.distributed on localhost), each with its own data root (two hosts),
  train on a 4-shard gs:// data set on the GCS emulator: each caches exactly the shard files of
  its record range, they see disjoint records, together the batches of one process reading both
  data shards, and each resumes its stream exactly from a saved state."""
  src = tmp_path / "src"
  src.mkdir()
  for i in range(N):
    Image.fromarray(record_image(i)).save(src / f"{i:02d}.png")
  out = gcs_bucket + "/ds"
  meta = prepare.prepare(str(src), 8, out, eval_fraction=0.0, shards=SHARDS, progress=False)
  assert meta["shard_counts"]["train"] == [6, 6, 6, 6]
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               SIMPLE_DIFFUSION_DATA=str(tmp_path / f"host{i}"))
    procs.append(subprocess.Popen([sys.executable, "-c", HOST, f"127.0.0.1:{port}", str(i), out],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for p in procs:
      o, e = p.communicate(timeout=300)
      assert p.returncode == 0, e[-3000:]
      results.append(json.loads(o.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results.sort(key=lambda r: r["process"])
  names = meta["shards"]["train"]
  for host, r in enumerate(results):
    assert r["cache"] == records.host_shards(meta, "train", host, 2) == names[2 * host:2 * host + 2]
    # prepare writes round robin: shard file f holds images f, f + 4, f + 8, ...
    mine = {i for i in range(N) if i % SHARDS in (2 * host, 2 * host + 1)}
    assert set(sum(r["batches"], [])) == mine  # 7 batches of 2 cover its 12 records
    assert r["resumed"] == r["batches"][4:]
  # One process reading both data shards sees the same global batches.
  monkeypatch.setenv("SIMPLE_DIFFUSION_DATA", str(tmp_path / "single"))
  one = pipeline.ShardedLoader(out, batch_size=4, seed=7, num_shards=2)
  try:
    for k in range(7):
      assert next(one)["image"][:, 0, 0, 0].tolist() == (results[0]["batches"][k] +
                                                          results[1]["batches"][k])
  finally:
    one.close()


def record_image(i: int) -> np.ndarray:
  """8x8 image whose red channel is its id i (prepare at res 8 keeps it as is)."""
  img = np.zeros((8, 8, 3), np.uint8)
  img[..., 0] = i
  img[..., 1] = 20 * np.arange(8)[None, :]
  return img


# ---------------------------------------------------------------------------------------------
# Bytes per host: core.data info and experiments.run mode=plan.


def test_plan_reports_the_bytes_each_host_caches(tmp_path, capsys):
  """On the default 8-host U-Net slice (TPU v4-64: the paper's 32 v2 chips, one generation later):
  a prepared data set's train shards split 2 per host (file sizes on disk are the truth), and the
  ImageNet estimate at 512 fits 50 GB per host."""
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(64):
    Image.fromarray(rng.integers(0, 256, (8, 8 + i % 5, 3), dtype=np.uint8)).save(src / f"{i}.png")
  data = tmp_path / "set512"
  meta = prepare.prepare(str(src), 8, str(data), eval_fraction=0.0, shards=16, progress=False)
  assert meta["shard_counts"]["train"] == [4] * 16
  sizes = [os.path.getsize(data / n) for n in meta["shards"]["train"]]
  opts = {"launcher": "tpu", "tpu_type": None, "data_dir": str(tmp_path / "set{res}")}
  tgt = plan.target(opts, "unet", tpu.DEFAULT_TPU)
  got = plan.data_per_host(opts, 512, tgt)
  assert got["hosts"] == 8 and not got["cached"]  # a local data set is read in place
  assert got["bytes_per_host"] == max(sizes[2 * h] + sizes[2 * h + 1] for h in range(8))
  est = plan.data_per_host(dict(opts, data_dir=None), 512, tgt)
  assert est["cached"] and est["bytes_per_host"] <= 50e9
  assert est["bytes_per_host"] == pytest.approx(
      plan.IMAGENET_BYTES_PER_IMAGE[512] * plan.IMAGENET_TRAIN_IMAGES / 8)
  # SLURM: 2 nodes of 4 GPUs, one process (data shard) per GPU: a node reads 4 data shards.
  slurm = dict(opts, launcher="slurm", nodes=2, gpus_per_node=4, accelerator="H100")
  got = plan.data_per_host(slurm, 512, plan.target(slurm, "unet", tpu.DEFAULT_TPU))
  assert got["hosts"] == 2 and got["bytes_per_host"] == max(sum(sizes[:8]), sum(sizes[8:]))
  proc = run_in_process(capsys, data_cli.main, "info", f"data_dir={data}", "hosts=8")
  assert f"({max(sizes[2 * h] + sizes[2 * h + 1] for h in range(8)):,} bytes)" in proc.stdout
