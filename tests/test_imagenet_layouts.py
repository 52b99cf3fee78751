"""ImageNet from its official layouts (core/data/imagenet.py) and odd file names in a folder.

One tiny synthetic ImageNet (three classes whose ILSVRC2012 IDs are not in wnid order, a
MATLAB meta.mat written with scipy.io.savemat in the devkit's structure, a non-leaf synset) is
laid out as the downloads (tars read in place, devkit .tar.gz), extracted with the devkit folder,
as Kaggle's, and as ADM's; every layout must give byte-identical records with the standard
labels (indices of the sorted wnids).
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import scipy.io
from array_record.python.array_record_data_source import ArrayRecordDataSource
from PIL import Image

from core.data import __main__ as data_cli
from core.data import imagenet, pipeline, prepare, records
from core.errors import UserError, run_main

# ILSVRC2012 ID -> wnid: ID order (the devkit's) differs from wnid order (the labels').
SYNSETS = {1: "n02119789", 2: "n01440764", 3: "n01443537"}
WNIDS = sorted(SYNSETS.values())
VAL_IDS = [3, 1, 2, 1, 3]  # ground truth of ILSVRC2012_val_00000001..5
TRAIN_PER_CLASS = 2


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (12 + seed % 5, 14, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _train_files() -> dict[str, dict[str, bytes]]:
  return {w: {f"{w}_{100 + i}.JPEG": _jpeg(10 * k + i) for i in range(TRAIN_PER_CLASS)}
          for k, w in enumerate(WNIDS)}


def _val_files() -> dict[str, bytes]:
  return {f"ILSVRC2012_val_{n:08d}.JPEG": _jpeg(100 + n) for n in range(1, len(VAL_IDS) + 1)}


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=mode) as t:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      t.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _meta_mat() -> bytes:
  dt = [(n, "O") for n in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children",
                           "wordnet_height", "num_train_images")]
  rows = [(i, w, f"class {w}", "", 0, 0, TRAIN_PER_CLASS) for i, w in SYNSETS.items()]
  rows.append((len(SYNSETS) + 1, "n00001740", "entity", "", 3, 18, 0))  # not a leaf: no class
  synsets = np.empty((len(rows), 1), dtype=dt)
  for i, r in enumerate(rows):
    synsets[i, 0] = r
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"synsets": synsets})
  return buf.getvalue()


def _devkit_files() -> dict[str, bytes]:
  d = imagenet.DEVKIT
  return {f"{d}/data/meta.mat": _meta_mat(),
          f"{d}/{imagenet.GROUND_TRUTH}": "".join(f"{i}\n" for i in VAL_IDS).encode()}


def layout_downloads(root) -> str:
  """The three ILSVRC2012 downloads, untouched."""
  inner = {f"{w}.tar": _tar_bytes(files) for w, files in _train_files().items()}
  _write(os.path.join(root, imagenet.TRAIN_TAR), _tar_bytes(inner))
  _write(os.path.join(root, imagenet.VAL_TAR), _tar_bytes(_val_files()))
  _write(os.path.join(root, imagenet.DEVKIT + ".tar.gz"), _tar_bytes(_devkit_files(), "w:gz"))
  return str(root)


def _extracted(base, val_names=None) -> None:
  for w, files in _train_files().items():
    for name, data in files.items():
      _write(os.path.join(base, "train", w, name), data)
  for name, data in _val_files().items():
    _write(os.path.join(base, "val", (val_names or {}).get(name, name)), data)


def layout_extracted(root) -> str:
  """train/<wnid>/, a flat val/ and the devkit folder."""
  _extracted(root)
  for name, data in _devkit_files().items():
    _write(os.path.join(root, name), data)
  return str(root)


def layout_kaggle(root) -> str:
  """Kaggle's ILSVRC/Data/CLS-LOC/{train,val} with LOC_val_solution.csv (boxes after the wnid)
  and LOC_synset_mapping.txt (wnids in sorted order)."""
  _extracted(os.path.join(root, imagenet.KAGGLE_DIR))
  rows = ["ImageId,PredictionString"] + [
      f"ILSVRC2012_val_{n:08d},{SYNSETS[i]} 1 2 3 4 {SYNSETS[i]} 5 6 7 8"
      for n, i in reversed(list(enumerate(VAL_IDS, 1)))]
  _write(os.path.join(root, imagenet.KAGGLE_LABELS), ("\n".join(rows) + "\n").encode())
  _write(os.path.join(root, imagenet.KAGGLE_SYNSETS),
         "".join(f"{w} class {w}\n" for w in WNIDS).encode())
  return str(root)


def layout_adm(root) -> str:
  """ADM's naming: each val file named after its class, ``<wnid>_ILSVRC2012_val_<n>.JPEG``."""
  names = {f"ILSVRC2012_val_{n:08d}.JPEG": f"{SYNSETS[i]}_ILSVRC2012_val_{n:08d}.JPEG"
           for n, i in enumerate(VAL_IDS, 1)}
  _extracted(root, names)
  return str(root)


def raw_records(out: str) -> dict[str, list[bytes]]:
  meta = records.read_meta(out)
  out_records = {}
  for split, names in meta["shards"].items():
    ds = ArrayRecordDataSource([os.path.join(out, n) for n in names])
    out_records[split] = [ds[i] for i in range(len(ds))]
  return out_records


LAYOUTS = {"downloads": layout_downloads, "extracted": layout_extracted, "kaggle": layout_kaggle,
           "adm": layout_adm}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  out = {}
  for name, make in LAYOUTS.items():
    src = make(root / name)
    out[name] = (src, str(root / f"out-{name}"))
    prepare.prepare(src, 8, out[name][1], progress=False, workers=1)
  return out


def test_every_layout_gives_the_same_records_and_standard_labels(prepared):
  reference = raw_records(prepared["downloads"][1])
  for name, (_, out) in prepared.items():
    meta = records.read_meta(out)
    assert meta["class_names"] == WNIDS, name
    assert meta["counts"] == {"train": 3 * TRAIN_PER_CLASS, "eval": len(VAL_IDS)}, name
    assert sum(meta["skipped"].values()) == 0, name
    assert raw_records(out) == reference, name
  keys = [records.decode_record(r)["key"] for r in reference["eval"]]
  assert keys == [f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(VAL_IDS) + 1)]
  _, labels = pipeline.load_split(prepared["downloads"][1], "eval")
  assert labels.tolist() == [WNIDS.index(SYNSETS[i]) for i in VAL_IDS] == [1, 2, 0, 2, 1]
  train = [records.decode_record(r) for r in reference["train"]]
  assert [r["label"] for r in train] == [WNIDS.index(r["key"].split("/")[1]) for r in train]
  # The tars are read in place: the download's source names the tars, not an extraction.
  assert "ILSVRC2012_img_train.tar" in records.read_meta(prepared["downloads"][1])["source"]


def test_val_labels_accepts_the_devkit_and_a_missing_class_is_refused(tmp_path):
  src = layout_extracted(tmp_path / "x")
  devkit_tgz = tmp_path / "devkit.tar.gz"
  devkit_tgz.write_bytes(_tar_bytes(_devkit_files(), "w:gz"))
  os.rename(os.path.join(src, imagenet.DEVKIT), tmp_path / "elsewhere")
  with pytest.raises(UserError, match="val_labels="):
    prepare.prepare(src, 8, str(tmp_path / "o0"), progress=False)
  for given in (devkit_tgz, tmp_path / "elsewhere"):
    meta = prepare.prepare(src, 8, str(tmp_path / f"o-{given.name}"), progress=False,
                           val_labels=str(given), splits=["eval"])
    _, labels = pipeline.load_split(str(tmp_path / f"o-{given.name}"), "eval")
    assert labels.tolist() == [1, 2, 0, 2, 1] and "devkit" in meta["source"]
  # A train/ missing a class of the devkit would shift every label: refused in one line.
  os.rename(os.path.join(src, "train", WNIDS[0]), tmp_path / "moved")
  with pytest.raises(UserError, match=r"missing from train: n01440764.*standard 0..999"):
    prepare.prepare(src, 8, str(tmp_path / "o1"), progress=False, val_labels=str(devkit_tgz))


def test_a_non_utf8_file_name_is_prepared_with_an_escaped_key(tmp_path, capsys):
  src = tmp_path / "src"
  (src / "café").mkdir(parents=True)  # a class folder with a UTF-8 name
  good = os.fsencode(src / "café")
  for name in (b"a.png", b"\xe9t\xe9.png"):  # the second is Latin-1, not UTF-8
    Image.new("RGB", (9, 9), (200, 10, 10)).save(os.path.join(good, name).decode(
        "utf-8", "surrogateescape"))
  with pytest.raises(SystemExit) as e:
    run_main(data_cli.main, ["prepare", f"src={src}", "res=8", f"out={tmp_path / 'out'}",
                             "eval_fraction=0", "progress=false", "workers=1"])
  assert e.value.code == 0, capsys.readouterr().err
  meta = records.read_meta(str(tmp_path / "out"))
  assert meta["counts"]["train"] == 2 and meta["class_names"] == ["café"]
  keys = sorted(r["key"] for r in records.split_records(str(tmp_path / "out"),
                                                      meta["shards"]["train"]))
  assert keys == ["café/\\xe9t\\xe9.png", "café/a.png"]
