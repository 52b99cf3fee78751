"""Tests of core.data (prepare: ADM resize, sources, skip counting, record format; the emoji set)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from core.data import __main__ as data_cli
from core.data import emoji, pipeline, prepare, preprocess, records, sources
from core.errors import UserError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
  """A deterministic RGB test image with structure at every scale (gradients plus noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  arr = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1),
                  127 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)], -1)
  arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(arr)


def solid(color, size=(20, 14)) -> Image.Image:
  return Image.new("RGB", size, tuple(color))


# ---------------------------------------------------------------------------------------------
# Record format.


def test_record_roundtrip():
  img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  r = records.decode_record(records.encode_record(img, 7, key="a/b.png"))
  np.testing.assert_array_equal(r["image"], img)
  assert r["label"] == 7 and r["label"].dtype == np.int32 and r["key"] == "a/b.png"
  assert "text_emb" not in r
  emb = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float16)
  r = records.decode_record(records.encode_record(img, 0, text_emb=emb))
  np.testing.assert_array_equal(r["text_emb"], emb)
  assert r["text_emb"].dtype == np.float16
  with pytest.raises(ValueError):
    records.decode_record(b"PK\x03\x04" + b"\0" * 20)


# ---------------------------------------------------------------------------------------------
# ADM preprocessing.


def direct_adm(img: Image.Image, res: int, sizes: list[tuple[int, int]], bicubic_size, crop_xy):
  """The ADM steps spelled out with PIL for known sizes: BOX halvings, one BICUBIC, a crop."""
  for s in sizes:
    img = img.resize(s, Image.BOX)
  img = img.resize(bicubic_size, Image.BICUBIC)
  x, y = crop_xy
  return np.asarray(img.crop((x, y, x + res, y + res)))


@pytest.mark.parametrize("w,h,res,halvings,bicubic,crop", [
    # 1000x700 -> 128: 700 >= 256 -> 500x350; 350 >= 256 -> 250x175; 175 < 256: bicubic to
    # round(250*128/175)=183 x 128; crop x=(183-128)//2=27.
    (1000, 700, 128, [(500, 350), (250, 175)], (183, 128), (27, 0)),
    # Portrait, odd sizes: 301x517 -> 64: 301 >= 128 -> 150x258; 150 >= 128 -> 75x129;
    # bicubic to 64 x round(129*64/75)=110; crop y=(110-64)//2=23.
    (301, 517, 64, [(150, 258), (75, 129)], (64, 110), (0, 23)),
    # Upsampling (as 64x64 emoji -> 128): no halving, bicubic 40x50 -> 64x80, crop y=8.
    (40, 50, 64, [], (64, 80), (0, 8)),
])
def test_adm_resize_matches_direct_pil(w, h, res, halvings, bicubic, crop):
  img = smooth_image(w, h)
  got = preprocess.center_crop_resize(img, res)
  assert got.shape == (res, res, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, direct_adm(img, res, halvings, bicubic, crop))


def test_transparency_composited_on_white():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:4, :, :] = (255, 0, 0, 255)   # opaque red top half
  rgba[4:, :, :] = (0, 0, 255, 0)     # fully transparent bottom half
  rgb = np.asarray(preprocess.to_rgb(Image.fromarray(rgba, "RGBA")))
  assert (rgb[:4] == (255, 0, 0)).all() and (rgb[4:] == 255).all()
  half = Image.fromarray(np.full((2, 2, 4), (0, 0, 0, 128), np.uint8), "RGBA")
  v = np.asarray(preprocess.to_rgb(half))
  assert np.all(np.abs(v.astype(int) - 127) <= 1)  # black at alpha 1/2 over white


# ---------------------------------------------------------------------------------------------
# prepare on folders.

COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "ant": (30, 30, 200)}


def make_class_folders(root, n_per_class=6):
  for c, col in COLORS.items():
    os.makedirs(root / c / "sub", exist_ok=True)
    for i in range(n_per_class):
      ext = "png" if i % 2 else "jpg"
      path = root / c / ("sub" if i == 0 else "") / f"{c}{i}.{ext}"
      solid(col, (24 + i, 17 + 2 * i)).save(path, quality=95)
  (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt
  (root / "dog" / "notes.txt").write_text("not an image")                           # non-image
  with io.BytesIO() as b:  # a truncated PNG (header fine, data cut off)
    smooth_image(40, 40).save(b, "PNG")
    (root / "ant" / "truncated.png").write_bytes(b.getvalue()[:200])
  return 3 * n_per_class, 3


def test_prepare_class_folders(tmp_path):
  src = tmp_path / "src"
  n_good, n_bad = make_class_folders(src)
  out = tmp_path / "out"
  meta = prepare.prepare(str(src), 8, str(out), eval_fraction=0.3, progress=False)
  assert meta["num_classes"] == 3 and meta["class_names"] == ["ant", "cat", "dog"]
  assert meta["resolution"] == 8
  assert sum(meta["counts"].values()) == n_good
  assert sum(meta["skipped"].values()) == n_bad
  assert json.load(open(out / "label_map.json")) == {"ant": 0, "cat": 1, "dog": 2}
  assert json.load(open(out / "meta.json")) == meta
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left
  for split in ("train", "eval"):
    assert meta["counts"][split] > 0
    images, labels = pipeline.load_split(str(out), split)
    assert images.shape == (meta["counts"][split], 8, 8, 3)
    for img, lab in zip(images, labels):  # each label's images have its folder's colour
      col = COLORS[meta["class_names"][lab]]
      assert np.abs(img.astype(int) - col).max() <= 6
  # The split is the hash rule applied to the relative path.
  keys = {s: [] for s in records.SPLITS}
  for split in records.SPLITS:
    paths, _ = pipeline.split_paths(str(out), split)
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    src_ds = ArrayRecordDataSource(paths)
    keys[split] = [records.decode_record(src_ds[i])["key"] for i in range(len(src_ds))]
  for split, ks in keys.items():
    assert all(sources.split_of(k, 0.3) == split for k in ks)
  assert "cat/sub/cat0.jpg" in keys["train"] + keys["eval"]


def test_prepare_cli_summary_and_errors(tmp_path, capsys):
  src = tmp_path / "src"
  make_class_folders(src, n_per_class=2)
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    run_main(data_cli.main, ["prepare", f"src={src}", "res=8", f"out={out}", "eval_fraction=0.5",
                         "shards=2", "workers=1"])
  assert e.value.code == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  meta = records.read_meta(str(out))
  assert f"train: {meta['counts']['train']} written, {meta['skipped']['train']} skipped" in line
  assert f"eval: {meta['counts']['eval']} written, {meta['skipped']['eval']} skipped" in line
  # A second prepare into the same out= refuses; overwrite=true replaces.
  for argv, code in [(["prepare", f"src={tmp_path / 'nope'}", "res=8", f"out={tmp_path / 'o2'}"], 2),
                     (["prepare", f"src={src}", "res=8", f"out={out}"], 2),
                     (["prepare", "res=8", f"out={out}"], 2),
                     (["prepare", f"src={src}", "res=8", f"out={out}", "bogus=1"], 2),
                     (["prepare", f"src={src}", "res=8", f"out={out}", "overwrite=true"], 0)]:
    with pytest.raises(SystemExit) as e:
      run_main(data_cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code, err
    if code:
      assert err.startswith("error: ") and "\n" not in err
  with pytest.raises(SystemExit):
    data_cli.main(["prepare", "--help"])
  text = capsys.readouterr().out
  for o in data_cli.PREPARE_OPTIONS:
    assert f"{o.name}=" in text


def test_prepare_flat_folder_is_unconditional(tmp_path):
  src = tmp_path / "flat"
  src.mkdir()
  for i in range(10):
    smooth_image(30, 20, seed=i).save(src / f"{i}.png")
  meta = prepare.prepare(str(src), 16, str(tmp_path / "out"), eval_fraction=0.0, progress=False)
  assert meta["num_classes"] == 0 and meta["counts"] == {"train": 10, "eval": 0}
  _, labels = pipeline.load_split(str(tmp_path / "out"), "train")
  assert (labels == 0).all()


def test_prepare_shards_and_workers(tmp_path):
  src = tmp_path / "flat"
  src.mkdir()
  for i in range(70):  # >= 64 items, so workers=2 really uses a process pool
    smooth_image(20, 20, seed=i).save(src / f"{i:03d}.png")
  m1 = prepare.prepare(str(src), 8, str(tmp_path / "a"), eval_fraction=0.0, shards=3, workers=1,
                    progress=False)
  m2 = prepare.prepare(str(src), 8, str(tmp_path / "b"), eval_fraction=0.0, shards=3, workers=2,
                    progress=False)
  assert m1["shards"]["train"] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
  assert m1["shard_counts"]["train"] == [24, 23, 23]
  assert m2["shards"] == m1["shards"] and m2["shard_counts"] == m1["shard_counts"]
  a, _ = pipeline.load_split(str(tmp_path / "a"), "train")
  b, _ = pipeline.load_split(str(tmp_path / "b"), "train")
  np.testing.assert_array_equal(a, b)
  assert a.shape[0] == 70


def test_prepare_imagenet_layout(tmp_path):
  src = tmp_path / "imagenet"
  wnids = ["n01440764", "n01443537"]
  for k, w in enumerate(wnids):
    (src / "train" / w).mkdir(parents=True)
    for i in range(3):
      solid((100 * k, 50, 50)).save(src / "train" / w / f"{w}_{i}.JPEG")
  (src / "val").mkdir()
  rows = ["ImageId,PredictionString"]
  for i in range(4):
    name = f"ILSVRC2012_val_{i:08d}"
    solid((100 * (i % 2), 50, 50)).save(src / "val" / f"{name}.JPEG")
    rows.append(f"{name},{wnids[i % 2]} 10 20 30 40")
  solid((0, 0, 0)).save(src / "val" / "ILSVRC2012_val_00000099.JPEG")  # no label: skipped
  (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(UserError, match="val_labels"):
    prepare.prepare(str(src), 8, str(tmp_path / "o0"), progress=False)
  with pytest.raises(UserError, match="eval_fraction"):
    prepare.prepare(str(src), 8, str(tmp_path / "o0"), eval_fraction=0.1, progress=False)
  meta = prepare.prepare(str(src), 8, str(tmp_path / "o1"), val_labels=str(tmp_path / "val.csv"),
                      progress=False)
  assert meta["class_names"] == wnids
  assert meta["counts"] == {"train": 6, "eval": 4} and meta["skipped"] == {"train": 0, "eval": 1}
  images, labels = pipeline.load_split(str(tmp_path / "o1"), "eval")
  np.testing.assert_array_equal(labels, [0, 1, 0, 1])
  assert np.abs(images[labels == 1][..., 0].astype(int) - 100).max() <= 3
  # val/ as class folders works without a labels file; train-only preparation.
  for f in (src / "val").iterdir():
    f.unlink()
  for w in wnids:
    (src / "val" / w).mkdir()
    solid((1, 2, 3)).save(src / "val" / w / "x.JPEG")
  meta = prepare.prepare(str(src), 8, str(tmp_path / "o2"), progress=False)
  assert meta["counts"] == {"train": 6, "eval": 2}
  meta = prepare.prepare(str(src), 8, str(tmp_path / "o3"), splits=["train"], progress=False)
  assert list(meta["counts"]) == ["train"]


def test_prepare_text_embeddings(tmp_path):
  src = tmp_path / "flat"
  src.mkdir()
  embs = {}
  for i in range(4):
    smooth_image(10, 10, seed=i).save(src / f"im{i}.png")
    if i < 3:
      embs[f"im{i}"] = np.full((2, 5), i, np.float32)
  np.savez(tmp_path / "emb.npz", **embs)
  meta = prepare.prepare(str(src), 8, str(tmp_path / "out"), eval_fraction=0.0,
                      text_emb=str(tmp_path / "emb.npz"), progress=False)
  assert meta["has_text_emb"] and meta["counts"]["train"] == 3 and meta["skipped"]["train"] == 1
  batch = next(pipeline.iter_split(str(tmp_path / "out"), "train"))
  assert batch["text_emb"].shape == (3, 2, 5)
  np.testing.assert_array_equal(batch["text_emb"][:, 0, 0], [0, 1, 2])


def test_gs_output_through_storage(tmp_path, gcs_bucket, monkeypatch):  # pylint: disable=redefined-outer-name
  src = tmp_path / "src"
  make_class_folders(src, n_per_class=2)
  out = gcs_bucket + "/ds"
  meta = prepare.prepare(str(src), 8, out, eval_fraction=0.5, progress=False)
  monkeypatch.setenv("SIMPLE_DIFFUSION_DATA", str(tmp_path / "root"))  # where gs:// data is cached
  assert records.read_meta(out) == meta
  images, _ = pipeline.load_split(out, "train")
  assert len(images) == meta["counts"]["train"]
  with pytest.raises(UserError, match="already holds"):
    prepare.prepare(str(src), 8, out, progress=False)
  # A whole-split read and info stream the shards: the cache holds only meta.json and
  # label_map.json.
  assert data_cli.main(["info", f"data_dir={out}", "verify=full", "hosts=2"]) == 0
  (copy,) = [str(p) for p in (tmp_path / "root" / "gcs").iterdir() if not p.name.startswith(".")]
  assert sorted(n for n in os.listdir(copy) if not n.startswith(".")) == ["label_map.json",
                                                                          "meta.json"]
  # The training loader caches its shards; a damaged cached copy names itself and the fix
  # (delete it), which then works.
  with pipeline.make_train_loader(out, global_batch_size=1, seed=0, process_index=0,
                                  process_count=1):
    pass
  with open(os.path.join(copy, meta["shards"]["train"][0]), "r+b") as f:
    f.truncate(0)
  with pytest.raises(UserError, match=f"local copy {copy} of {out} is damaged .*; delete {copy}"):
    pipeline.load_split(out, "train")
  shutil.rmtree(copy)
  np.testing.assert_array_equal(pipeline.load_split(out, "train")[0], images)


# ---------------------------------------------------------------------------------------------
# The built-in emoji data set.


def test_missing_npm_is_a_user_error(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
  with pytest.raises(UserError, match="npm"):
    emoji.emoji_tarball(str(tmp_path / "root"))


@pytest.mark.slow
def test_emoji_default_set_prepares(tmp_path):
  tarball = emoji.emoji_tarball()  # real `npm pack` on first use, then cached in <data root>/cache
  t0 = time.time()
  meta = prepare.prepare(tarball, 32, str(tmp_path / "emoji32"), progress=False)
  print(f"emoji prepare at res 32: {time.time() - t0:.1f} s")
  assert sum(meta["counts"].values()) == emoji.NUM_IMAGES == 3786
  assert sum(meta["skipped"].values()) == 0
  assert meta["num_classes"] == 10 and "Smileys & Emotion" in meta["class_names"]
  assert 0.08 < meta["counts"]["eval"] / 3786 < 0.12
  for split in records.SPLITS:
    images, labels = pipeline.load_split(str(tmp_path / "emoji32"), split)
    assert labels.min() >= 0 and labels.max() < 10
    assert len(np.unique(labels)) >= 8
    per_image_std = images.reshape(len(images), -1).std(axis=1)
    assert (per_image_std > 5).mean() > 0.99  # real pictures, not blank
    assert (images == 255).mean() > 0.2       # transparent backgrounds became white


@pytest.mark.slow
def test_default_data_dir_concurrent(tmp_path, monkeypatch):
  tarball = emoji.emoji_tarball()
  root = tmp_path / "root"
  (root / "cache").mkdir(parents=True)
  shutil.copy(tarball, root / "cache" / os.path.basename(tarball))
  code = ("import sys; from core.data import prepare; "
          "print(prepare.default_data_dir(16, progress=False))")
  env = dict(os.environ, SIMPLE_DIFFUSION_DATA=str(root), PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e
  paths = {o.strip().splitlines()[-1] for o, _ in outs}
  assert paths == {str(root / "emoji-16")}
  assert sorted(os.listdir(root)) == [".emoji-16.lock", "cache", "emoji-16"]  # no temp dirs
  meta = records.read_meta(str(root / "emoji-16"))
  assert meta["resolution"] == 16 and sum(meta["counts"].values()) == 3786
  monkeypatch.setenv("SIMPLE_DIFFUSION_DATA", str(root))
  assert prepare.default_data_dir(16) == str(root / "emoji-16")  # prepared: returns at once
