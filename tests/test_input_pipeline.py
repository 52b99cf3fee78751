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
