"""Faults and bad input on the data side (issue 12): each case ends in one ``error:`` line, exit
status 2, and loses nothing already written.

High-bit-depth images are checked against PNG files written here by a minimal independent PNG
encoder (zlib + struct, not PIL) and an independent conversion in numpy (x >> 8); damaged shards
and meta.json files are made by truncating, zeroing and flipping bytes of a real prepared set; the
CLIs run as subprocesses, as a user runs them.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
import numpy as np
import pytest
from PIL import Image

from core.data import __main__ as data_cli
from core.data import pipeline, prepare, preprocess, records
from core.errors import UserError
from tests.fault_helpers import (ROOT, assert_one_error_line, read_only, run_cli, run_in_process,
                                 snapshot)
SHARD = "train-00000-of-00001.array_record"


# ---------------------------------------------------------------------------------------------
# Helpers.


def png_bytes(arr: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
  """A 16-bit PNG (color type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA) written without PIL."""
  h, w = arr.shape[:2]
  raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

  def chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
  if trns is not None:
    out += chunk(b"tRNS", trns)
  return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def over_white(rgb8: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
  """Independent alpha compositing on white (float maths, rounded)."""
  a = alpha8[..., None].astype(np.float64) / 255
  return np.round(rgb8 * a + 255 * (1 - a)).astype(np.int64)


def info(capsys, data_dir, *extra: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
  if subprocess_:
    return run_cli("core.data", "info", f"data_dir={data_dir}", *extra)
  return run_in_process(capsys, data_cli.main, "info", f"data_dir={data_dir}", *extra)


@pytest.fixture(name="prepared", scope="module")
def fixture_prepared(tmp_path_factory):
  """A small prepared data set (12 images, 8x8) that tests copy and damage."""
  root = tmp_path_factory.mktemp("faults-data")
  src = root / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / f"{i}.png")
  prepare.prepare(str(src), 8, str(root / "set"), progress=False, workers=1)
  return root / "set"


@pytest.fixture(name="copy_of")
def fixture_copy_of(prepared, tmp_path):
  dst = tmp_path / "set"
  shutil.copytree(prepared, dst)
  return dst


# ---------------------------------------------------------------------------------------------
# Harmful 6: 16-bit and other image modes convert correctly.

RNG = np.random.default_rng(12)
GRAY16 = RNG.integers(0, 65536, (9, 7)).astype(np.uint16)
RGB16 = RNG.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
LA16 = RNG.integers(0, 65536, (9, 7, 2)).astype(np.uint16)
RGBA16 = RNG.integers(0, 65536, (9, 7, 4)).astype(np.uint16)


def expected_gray16(x):
  return np.repeat((x >> 8)[..., None], 3, -1).astype(np.int64)


@pytest.mark.parametrize("name,png,expected", [
    ("gray16", png_bytes(GRAY16, 0), expected_gray16(GRAY16)),
    ("rgb16", png_bytes(RGB16, 2), (RGB16 >> 8).astype(np.int64)),
    ("gray16+alpha", png_bytes(LA16, 4),
     over_white(expected_gray16(LA16[..., 0]), (LA16[..., 1] >> 8).astype(np.uint8))),
    ("rgba16", png_bytes(RGBA16, 6),
     over_white((RGBA16[..., :3] >> 8).astype(np.int64), (RGBA16[..., 3] >> 8).astype(np.uint8))),
    ("gray16+tRNS", png_bytes(GRAY16, 0, trns=struct.pack(">H", int(GRAY16[2, 3]))),
     np.where((GRAY16 == GRAY16[2, 3])[..., None], 255, expected_gray16(GRAY16))),
])
def test_16bit_png_keeps_the_high_byte(tmp_path, name, png, expected):
  path = tmp_path / f"{name}.png"
  path.write_bytes(png)
  got = preprocess.load_image(str(path), 7)  # res = the smaller side: only the center crop acts
  top = (9 - 7) // 2
  want = expected[top:top + 7]
  assert got.dtype == np.uint8 and got.shape == (7, 7, 3)
  tol = 1 if "alpha" in name or "rgba" in name else 0  # PIL's integer compositing rounding
  assert np.abs(got.astype(np.int64) - want).max() <= tol, name
  assert got.min() < 250  # not the solid white of the bug


@pytest.mark.parametrize("fmt,dtype", [("PNG", np.uint16), ("TIFF", np.uint16), ("TIFF", np.int32)])
def test_pil_written_16bit_gray_files(tmp_path, fmt, dtype):
  x = GRAY16.astype(dtype)
  path = tmp_path / f"g.{fmt.lower()}"
  Image.fromarray(x).save(path, fmt)
  with Image.open(path) as img:
    img.load()
    assert img.mode in ("I;16", "I")
    got = np.asarray(preprocess.to_rgb(img)).astype(np.int64)
  np.testing.assert_array_equal(got, expected_gray16(GRAY16))


def test_images_without_an_8bit_scale_are_skipped_with_the_reason(tmp_path):
  with pytest.raises(ValueError, match="mode F"):
    preprocess.to_rgb(Image.fromarray(np.ones((4, 4), np.float32)))
  with pytest.raises(ValueError, match="outside the 16-bit range"):
    preprocess.to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)))


P_PALETTE = [255, 0, 0, 0, 0, 255] + [0] * (254 * 3)


@pytest.mark.parametrize("name,make,expected", [
    # palette with a transparent index: index 1 (blue) transparent -> white
    ("P+transparency", lambda: _palette(), np.array([[[255, 0, 0], [255, 255, 255]]])),
    # 8-bit gray + alpha: 100 at alpha 255, 0 at alpha 0, 0 at alpha 51 (80% white)
    ("LA", lambda: Image.fromarray(np.array([[[100, 255], [0, 0], [0, 51]]], np.uint8), "LA"),
     over_white(np.array([[[100] * 3, [0] * 3, [0] * 3]]), np.array([[255, 0, 51]], np.uint8))),
    # CMYK: R = (255 - C) (255 - K) / 255 (pixels where the naive and the multiplicative formula
    # agree, plus one where they do not: PIL uses the multiplicative one)
    ("CMYK", lambda: Image.fromarray(np.array([[[100, 0, 0, 0], [0, 0, 0, 100], [0, 50, 0, 30]]],
                                              np.uint8), "CMYK"),
     np.array([[[155, 255, 255], [155, 155, 155], [225, 181, 225]]])),
    ("1-bit", lambda: Image.fromarray(np.array([[False, True, True]])),
     np.array([[[0, 0, 0], [255, 255, 255], [255, 255, 255]]])),
])
def test_other_modes_convert_to_rgb(name, make, expected):
  got = np.asarray(preprocess.to_rgb(make())).astype(np.int64)
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= (1 if name == "LA" else 0), (name, got)


def _palette() -> Image.Image:
  img = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  img.putpalette(P_PALETTE)
  img.info["transparency"] = 1
  with io.BytesIO() as b:  # through a real PNG file (tRNS chunk)
    img.save(b, "PNG", transparency=1)
    b.seek(0)
    out = Image.open(b)
    out.load()
  assert out.mode == "P" and "transparency" in out.info
  return out


def test_prepare_cli_on_16bit_pngs_matches_numpy(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(3)
  images = {f"g{i}": rng.integers(0, 65536, (16, 16)).astype(np.uint16) for i in range(4)}
  for k, x in images.items():
    (src / f"{k}.png").write_bytes(png_bytes(x, 0))
  proc = run_cli("core.data", "prepare", f"src={src}", "res=16", f"out={tmp_path / 'out'}",
                 "eval_fraction=0", "splits=train", "progress=false", "workers=1")
  assert proc.returncode == 0, proc.stderr
  assert "0 skipped" in proc.stdout
  paths, meta = pipeline.split_paths(str(tmp_path / "out"), "train")
  source = pipeline.RecordSource(paths, meta, "train")
  decoded = [records.decode_record(source[i]) for i in range(len(source))]
  assert sorted(r["key"] for r in decoded) == [f"{k}.png" for k in sorted(images)]
  for r in decoded:
    want = expected_gray16(images[r["key"][:-4]])
    np.testing.assert_array_equal(r["image"].astype(np.int64), want, err_msg=r["key"])


# ---------------------------------------------------------------------------------------------
# Damaged shards and meta.json: `info`, the training loader and whole-split reads.


def _truncate(n):
  def f(p):
    with open(p, "r+b") as fh:
      fh.truncate(n if n >= 0 else os.path.getsize(p) // 2)
  return f


def _flip(offset):
  def f(p):
    b = bytearray(open(p, "rb").read())
    b[offset] ^= 0xFF
    open(p, "wb").write(bytes(b))
  return f


def _foreign_records(p):
  """The same number of records, with valid checksums, that are not ours (another tool's file)."""
  n = ArrayRecordReader(p).num_records()
  w = ArrayRecordWriter(p, records.WRITER_OPTIONS)
  for i in range(n):
    w.write(b"a record of another format %d" % i)
  w.close()


DAMAGED = f"{SHARD} .* is damaged"


@pytest.mark.parametrize("case,damage,needles,loader_error,subprocess_", [
    ("zero-byte", _truncate(0), ["damaged", "0 bytes"], DAMAGED, False),
    ("truncated", _truncate(-1), ["damaged", "bytes"], DAMAGED, False),
    ("flipped chunk header", _flip(100), ["damaged", "hash mismatch"], DAMAGED, False),
    ("flipped record data", _flip(700), ["damaged", "hash mismatch"], DAMAGED, True),
    ("deleted", os.remove, ["listed in meta.json is missing"], "is missing", False),
    ("foreign records", _foreign_records, ["damaged", "record 0: not a simple-diffusion"],
     f"is not a {records.FORMAT} record", False),
])
def test_damaged_shard_is_one_line_in_info_and_the_loader(copy_of, capsys, case, damage, needles,
                                                          loader_error, subprocess_):
  damage(str(copy_of / SHARD))
  before = snapshot(copy_of)
  proc = info(capsys, copy_of, subprocess_=subprocess_)
  assert_one_error_line(proc, SHARD, *needles, "overwrite=true")
  assert snapshot(copy_of) == before
  # The eval split is intact; the train split fails with one message wherever it is read.
  assert pipeline.load_split(str(copy_of), "eval")[0].shape[1:] == (8, 8, 3)
  with pytest.raises(UserError, match=loader_error):
    pipeline.load_split(str(copy_of), "train")
  with pytest.raises(UserError, match=loader_error):
    with pipeline.make_train_loader(str(copy_of), global_batch_size=3, seed=0,
                                          process_index=0, process_count=1) as it:
      for _ in range(4):
        next(it)
  del case


def test_info_quick_check_misses_flips_and_full_finds_them(copy_of, capsys):
  ok = info(capsys, copy_of)
  assert ok.returncode == 0 and "12 records read back with their checksums" in ok.stdout
  _flip(700)(str(copy_of / SHARD))
  quick = info(capsys, copy_of, "verify=quick")
  assert quick.returncode == 0 and "opened and counted" in quick.stdout
  assert_one_error_line(info(capsys, copy_of, "verify=full"), "hash mismatch")


@pytest.mark.parametrize("case,content,needle", [
    ("empty", b"", "is empty"),  # (run as a subprocess)
    ("cut short", b'{"format": "simple-diffusion-records/1", "resol', "not valid JSON"),
    ("not UTF-8", b"\xff\xfe\x00{", "not UTF-8"),
    ("not an object", b"[1, 2]", "not a JSON object"),
    ("no resolution", b'{"format": "simple-diffusion-records/1"}', "'resolution'"),
    ("shards without counts", b'{"format": "simple-diffusion-records/1", "resolution": 8, '
     b'"num_classes": 0, "counts": {}, "shards": {"train": ["a"]}, "shard_counts": {}}',
     "'shard_counts'"),
])
def test_damaged_meta_json_is_one_line(copy_of, capsys, case, content, needle):
  (copy_of / "meta.json").write_bytes(content)
  before = snapshot(copy_of)
  assert_one_error_line(info(capsys, copy_of, subprocess_=case == "empty"), "meta.json", needle,
                        "overwrite=true")
  assert snapshot(copy_of) == before
  with pytest.raises(UserError, match=needle):
    pipeline.make_train_loader(str(copy_of), global_batch_size=2, seed=0, process_index=0,
                                     process_count=1)
  del case


def test_overwrite_replaces_a_set_whose_meta_json_is_damaged(copy_of, tmp_path):
  (copy_of / "meta.json").write_bytes(b"")
  (copy_of / "notes.txt").write_text("mine")
  src = tmp_path / "src2"
  src.mkdir()
  for i in range(3):
    Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(src / f"{i}.png")
  prepare.prepare(str(src), 8, str(copy_of), progress=False, overwrite=True, eval_fraction=0.0,
               splits=["train"])
  assert records.read_meta(str(copy_of))["counts"] == {"train": 3}
  assert sorted(os.listdir(copy_of)) == ["label_map.json", "meta.json", "notes.txt", SHARD]


# ---------------------------------------------------------------------------------------------
# prepare: empty or unusable sources, read-only outputs.


def _leftovers(parent) -> list[str]:
  return [n for n in os.listdir(parent) if ".tmp-" in n]


@pytest.mark.parametrize("case,files,needle", [
    ("empty folder", {}, "holds no image files"),
    ("only hidden files", {".DS_Store": b"x"}, "holds no image files"),
    ("no readable image", {"a.txt": b"text", "b.png": b"not a png"}, "none of the 2 files"),
])
def test_prepare_refuses_a_source_without_images(tmp_path, case, files, needle):
  src = tmp_path / "src"
  src.mkdir()
  for n, b in files.items():
    (src / n).write_bytes(b)
  out = tmp_path / "out"
  proc = run_cli("core.data", "prepare", f"src={src}", "res=8", f"out={out}", "progress=false")
  assert_one_error_line(proc, needle)
  assert not out.exists() and not _leftovers(tmp_path)
  del case


def test_prepare_into_a_read_only_parent(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  Image.new("RGB", (8, 8)).save(src / "a.png")
  ro = tmp_path / "ro"
  ro.mkdir()
  (ro / "keep.txt").write_text("already here")
  with read_only(ro) as wrap:
    proc = run_cli("core.data", "prepare", f"src={src}", "res=8", f"out={ro / 'new'}",
                   "progress=false", wrap=wrap)
  assert_one_error_line(proc, "cannot write", "read-only or not writable", "writable out=")
  assert sorted(os.listdir(ro)) == ["keep.txt"]


def test_overwrite_of_a_read_only_data_set_keeps_it(copy_of, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  Image.new("RGB", (8, 8)).save(src / "a.png")
  before = snapshot(copy_of)
  with read_only(copy_of) as wrap:
    proc = run_cli("core.data", "prepare", f"src={src}", "res=8", f"out={copy_of}",
                   "overwrite=true", "progress=false", wrap=wrap)
  assert_one_error_line(proc, "cannot write", str(copy_of))
  assert snapshot(copy_of) == before and not _leftovers(tmp_path)


def test_prepare_on_a_full_disk_leaves_no_temporary_files(tmp_path):
  """out= on a 160 KiB tmpfs (a private mount, as root) that already holds a file: the shards do
  not fit, so prepare fails with one line, and the disk holds just the old file afterwards."""
  if os.geteuid() != 0 or shutil.which("unshare") is None:
    pytest.skip("needs root and unshare -m to mount a small tmpfs")
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(24):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
  disk = tmp_path / "disk"
  disk.mkdir()
  script = ('mount -t tmpfs -o size=160k tmpfs "$0" && echo old > "$0/keep.txt" || exit 99; '
            '"$@"; rc=$?; ls -A "$0" > "$0.after"; cat "$0/keep.txt" >> "$0.after"; exit $rc')
  proc = run_cli("core.data", "prepare", f"src={src}", "res=16", f"out={disk / 'out'}",
                 "progress=false", wrap=["unshare", "-m", "sh", "-c", script, str(disk)])
  if proc.returncode == 99:
    pytest.skip("could not mount a tmpfs")
  assert_one_error_line(proc, "No space left on device", "free space")
  assert (tmp_path / "disk.after").read_text().split() == ["keep.txt", "old"]


@pytest.mark.parametrize("option,content,needle", [
    ("text_emb", b"PK\x03\x04 cut short", "is not a readable .npz"),
    ("text_emb", None, "a single .npy array"),
    ("val_labels", b"ILSVRC2012_val_00000001 n01\xe9\n", "is not UTF-8 text (byte 27)"),
])
def test_bad_side_files_of_prepare_are_one_line(tmp_path, capsys, option, content, needle):
  src = tmp_path / "src"
  for d in ("train/n01", "val"):
    (src / d).mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(src / "train" / "n01" / "a.png")
  Image.new("RGB", (8, 8)).save(src / "val" / "ILSVRC2012_val_00000001.png")
  side = tmp_path / ("side.npy" if content is None else "side")
  if content is None:
    np.save(side, np.zeros(3))
  else:
    side.write_bytes(content)
  args = ["prepare", f"src={src}", "res=8", f"out={tmp_path / 'out'}", "progress=false",
          f"{option}={side}"]
  if option == "text_emb":
    args.append("splits=train")
  assert_one_error_line(run_in_process(capsys, data_cli.main, *args), option, needle)
  assert not (tmp_path / "out").exists()


def test_a_killed_prepare_leaves_no_data_set_and_the_next_one_cleans_up(tmp_path):
  """SIGKILL during prepare (held on a FIFO posing as an image, so the kill lands mid-way): out=
  does not exist; the next prepare deletes the dead process's temporary directory but not those
  of live processes or other hosts, and writes the data set."""
  src = tmp_path / "src"
  src.mkdir()
  for i in range(6):
    Image.new("RGB", (8, 8), (i, i, i)).save(src / f"{i}.png")
  os.mkfifo(src / "zz.png")
  out = tmp_path / "out"
  args = [sys.executable, "-m", "core.data", "prepare", f"src={src}", "res=8", f"out={out}",
          "progress=false", "eval_fraction=0"]
  proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          stderr=subprocess.PIPE)
  deadline = time.time() + 60
  while not _leftovers(tmp_path) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  time.sleep(0.2)
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
  (stale,) = _leftovers(tmp_path)
  assert not out.exists()
  keep = [f".out.tmp-{socket.gethostname()}-{os.getpid()}-live0000",  # a live process's
          ".out.tmp-otherhost-1-abcd1234"]  # another host's (a shared file system)
  for n in keep:
    (tmp_path / n).mkdir()
  os.remove(src / "zz.png")
  done = run_cli(*args[2:])
  assert done.returncode == 0, done.stderr
  assert f"removed {tmp_path / stale}, left by an interrupted prepare" in done.stderr
  assert sorted(_leftovers(tmp_path)) == sorted(keep)
  assert records.read_meta(str(out))["counts"] == {"train": 6, "eval": 0}
