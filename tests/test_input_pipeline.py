"""Tests of core.data.pipeline: batches, determinism, epochs, flips, resume, per-host sharding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.data import pipeline, prepare, records, sources
from core.errors import UserError

N = 24      # records in the train split
RES = 8


def record_image(i: int) -> np.ndarray:
  """Image of record i: red channel = i (its identity), green = 20 * column (shows flips)."""
  img = np.zeros((RES, RES, 3), np.uint8)
  img[..., 0] = i
  img[..., 1] = 20 * np.arange(RES)[None, :]
  img[..., 2] = 7
  return img


def png(arr: np.ndarray) -> bytes:
  with io.BytesIO() as b:
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A train split of N records (label = i % 3, two shards) and an eval split of 5, through prepare."""
  items = {"train": [sources.Item(key=f"{i}.png", label=i % 3, data=png(record_image(i)))
                     for i in range(N)],
           "eval": [sources.Item(key=f"e{i}.png", label=1, data=png(record_image(100 + i)))
                    for i in range(5)]}
  source = sources.Source(items=items, class_names=["a", "b", "c"], description="test")
  out = str(tmp_path_factory.mktemp("ds"))
  prepare.write_dataset(source, RES, out, shards=2, progress=False)
  return out


def ids(batch) -> list[int]:
  return [int(x) for x in batch["image"][:, 0, 0, 0]]


def is_flipped(batch) -> list[bool]:
  return [bool(img[0, 0, 1] != 0) for img in batch["image"]]


def take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def loader(data_dir, **kw):  # pylint: disable=redefined-outer-name
  kw = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kw}
  return pipeline.make_train_loader(data_dir, **kw)


def test_batches_and_meta(data_dir):  # pylint: disable=redefined-outer-name
  meta = records.read_meta(data_dir)
  assert meta["resolution"] == RES and meta["counts"] == {"train": N, "eval": 5}
  with loader(data_dir) as it:
    b = next(it)
  assert b["image"].shape == (4, RES, RES, 3) and b["image"].dtype == np.uint8
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  for i, lab in zip(ids(b), b["label"]):
    assert lab == i % 3
  images, labels = pipeline.load_split(data_dir, "train")
  assert sorted(images[:, 0, 0, 0].tolist()) == list(range(N))  # whole split, each record once
  np.testing.assert_array_equal(labels, images[:, 0, 0, 0] % 3)
  np.testing.assert_array_equal(images[0], record_image(int(images[0, 0, 0, 0])))


def test_deterministic_epochs_and_flips(data_dir):  # pylint: disable=redefined-outer-name
  with loader(data_dir, seed=5) as a, loader(data_dir, seed=5) as b, loader(data_dir, seed=6) as c:
    ba, bb, bc = take(a, 18), take(b, 18), take(c, 18)
  for x, y in zip(ba, bb):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert [ids(x) for x in ba] != [ids(x) for x in bc]
  # Three epochs of 6 batches: each a permutation of all records, each in a new order.
  epochs = [sum((ids(x) for x in ba[6 * e:6 * e + 6]), []) for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(N))
  assert epochs[0] != epochs[1] != epochs[2]
  # Flips: each image is its record, mirrored or not; about half are mirrored.
  flips = sum((is_flipped(x) for x in ba), [])
  for x in ba:
    for img, i, f in zip(x["image"], ids(x), is_flipped(x)):
      np.testing.assert_array_equal(img, record_image(i)[:, ::-1] if f else record_image(i))
  assert 0.3 < np.mean(flips) < 0.7
  with loader(data_dir, random_flip=False, shuffle=False) as it:
    plain = take(it, 6)
  assert not any(sum((is_flipped(x) for x in plain), []))
  images, _ = pipeline.load_split(data_dir, "train")
  assert sum((ids(x) for x in plain), []) == images[:, 0, 0, 0].tolist()  # file order


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_batches(data_dir, num_workers):  # pylint: disable=redefined-outer-name
  kw = {"seed": 3, "num_workers": num_workers}
  with loader(data_dir, **kw) as it:
    take(it, 7)                      # crosses an epoch boundary (6 batches per epoch)
    state = it.get_state()
    assert isinstance(state, bytes)
    expected = take(it, 8)
  with loader(data_dir, **kw) as it:
    it.set_state(state)
    resumed = take(it, 8)
  for x, y in zip(expected, resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  with loader(data_dir, **dict(kw, seed=4)) as it:  # a state from another pipeline: UserError
    with pytest.raises(UserError, match="does not fit"):
      it.set_state(state)


def test_per_host_sharding(data_dir):  # pylint: disable=redefined-outer-name
  seen = []
  for host in range(2):
    with loader(data_dir, global_batch_size=8, process_index=host, process_count=2, num_epochs=1,
                seed=9) as it:
      batches = list(it)
    assert all(b["image"].shape[0] == 4 for b in batches)  # local batch = global / hosts
    seen.append(sum((ids(b) for b in batches), []))
  assert len(seen[0]) == len(seen[1]) == N // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(N))


def test_user_errors(data_dir, tmp_path):  # pylint: disable=redefined-outer-name
  with pytest.raises(UserError, match="python -m core.data prepare"):
    records.read_meta(str(tmp_path / "missing"))
  with pytest.raises(UserError, match="python -m core.data prepare"):
    loader(str(tmp_path / "missing"))
  with pytest.raises(UserError, match="resolution 8 but the model expects 16"):
    loader(data_dir, resolution=16)
  with pytest.raises(UserError, match="multiple of the number of hosts"):
    loader(data_dir, global_batch_size=5, process_count=2)
  source = sources.Source(items={"train": [sources.Item("x.png", 0, data=png(record_image(1)))]},
                       class_names=[], description="test")
  only_train = str(tmp_path / "only_train")
  prepare.write_dataset(source, RES, only_train, progress=False)
  with pytest.raises(UserError, match="no records in split 'eval'.*python -m core.data prepare"):
    pipeline.load_split(only_train, "eval")


# ---------------------------------------------------------------------------------------------
# Flips keep the top at the top (issue 28 item 1): a portrait stored rotated is flipped up-down.


def test_flip_of_a_rotated_portrait_is_an_up_down_flip_of_the_stored_array():
  """The algebra behind flip_axis: with S = rot90ccw(P) (PIL's ROTATE_90, as preprocess.orient
  stores a portrait), rot90ccw(fliplr(P)) = flipud(S); rot90cw(fliplr(S)) = flipud(P) is the bug."""
  p = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
  s = np.asarray(Image.fromarray(p).transpose(Image.Transpose.ROTATE_90))
  np.testing.assert_array_equal(s, np.rot90(p, 1))
  np.testing.assert_array_equal(np.rot90(np.fliplr(p), 1), np.flipud(s))
  np.testing.assert_array_equal(np.rot90(np.fliplr(s), -1), np.flipud(p))
  assert pipeline.flip_axis({"portrait": np.int32(1)}) == 0
  assert pipeline.flip_axis({"portrait": np.int32(0)}) == pipeline.flip_axis({}) == 1


def marked_image(h: int, w: int) -> np.ndarray:
  """Gray with a red block at the top-left corner: its top and its left are known."""
  img = np.full((h, w, 3), 128, np.uint8)
  img[:h // 4, :w // 4] = (255, 0, 0)
  return img


def marker_corner(img: np.ndarray) -> tuple[str, str]:
  """('top' or 'bottom', 'left' or 'right'): where the red block is."""
  red = img[..., 0].astype(int) - img[..., 1].astype(int)
  y, x = np.unravel_index(np.argmax(red), red.shape)
  return ("top" if y < img.shape[0] / 2 else "bottom", "left" if x < img.shape[1] / 2 else "right")


def test_random_flips_keep_the_top_of_portrait_and_landscape_images(tmp_path):
  """A landscape and a portrait photo with a marker at the top-left, prepared at res=8x16 (the
  portrait stored rotated): in the image's own frame every flip moves the marker left-right only."""
  items = {"train": [sources.Item(key="landscape.png", label=0, data=png(marked_image(32, 64))),
                     sources.Item(key="portrait.png", label=1, data=png(marked_image(64, 32)))]}
  out = str(tmp_path / "ds")
  prepare.write_dataset(sources.Source(items=items, class_names=["l", "p"], description="test"),
                        "8x16", out, progress=False)
  corners = {0: set(), 1: set()}
  with loader(out, global_batch_size=2, seed=1) as it:
    for b in take(it, 24):
      assert b["portrait"].tolist() == [int(l) for l in b["label"]]  # only the portrait rotated
      for img, portrait in zip(b["image"], b["portrait"]):
        own = np.rot90(img, -1) if portrait else img  # undo the 90 degree counter-clockwise turn
        assert own.shape == ((16, 8, 3) if portrait else (8, 16, 3))
        corners[int(portrait)].add(marker_corner(own))
  # Both orientations were seen flipped and not flipped, and the marker always stayed on top.
  assert corners[0] == corners[1] == {("top", "left"), ("top", "right")}, corners
