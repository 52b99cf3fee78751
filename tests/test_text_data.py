"""Tests of the text-to-image data path: core.data.text_encoder, core.data.coco, captioned records
and batches, the evaluation captions (core.data.captions), non-square preparation with the portrait flag,
emoji captions. A tiny random T5 (tests/t2i_fixtures.py) runs the real transformers loading code."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from core.data import __main__ as data_cli
from core.data import captions, coco, emoji, pipeline, prepare, text_encoder
from core.data import records as records_lib
from core.errors import UserError, run_main
from eval import reference
from experiments import jobs, registry, run
from tests import t2i_fixtures as F

TARBALL = f"{emoji.PACKAGE}-{emoji.VERSION}.tgz"


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  return F.tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture(scope="module")
def encoder(t5):
  return text_encoder.TextEncoder(t5, max_len=12, batch_size=3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, t5):
  """The fake COCO prepared at 16x24 (landscape), float16 embeddings, 10 evaluation captions."""
  root = tmp_path_factory.mktemp("coco")
  src = F.fake_coco(str(root / "coco"))
  out = str(root / "out")
  meta = prepare.prepare(src, "16x24", out, text_encoder=t5, max_len=12, eval_captions=10,
                      caption_seed=3, progress=False)
  return src, out, meta


def records(out, meta, split):
  return {r["key"]: r for r in records_lib.split_records(out, meta["shards"][split])}


# ---------------------------------------------------------------------------------------------
# Text encoder.


def test_encoder_matches_transformers_forward(t5, encoder):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  texts = ["A red cat on a mat.", "a tower", "the tall tower is a tall tower at night on a mat"]
  emb, mask = encoder.encode(texts)
  assert emb.dtype == np.float32 and mask.dtype == bool
  assert emb.shape == (3, 12, F.DIM) and encoder.dim == F.DIM
  # Independent truth: the tokenizer's own ids and the model's forward pass, one caption at a time.
  tok = transformers.AutoTokenizer.from_pretrained(t5)
  model = transformers.T5EncoderModel.from_pretrained(t5).eval()
  for i, t in enumerate(texts):
    ids = tok(t)["input_ids"][:12]
    ids[-1] = 1 if len(tok(t)["input_ids"]) > 12 else ids[-1]  # truncation keeps </s>
    assert ids[-1] == 1  # </s>
    with torch.no_grad():
      want = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
    n = len(ids)
    np.testing.assert_array_equal(mask[i], np.arange(12) < n)
    np.testing.assert_allclose(emb[i, :n], want, rtol=1e-5, atol=1e-5)
    assert not emb[i, n:].any()  # padding is zero
  assert mask[2].all()  # the long caption was truncated to max_len
  # Batching does not change the result; distinct captions get distinct embeddings.
  one = text_encoder.TextEncoder(t5, max_len=12, batch_size=1).encode(texts)[0]
  np.testing.assert_allclose(one, emb, atol=1e-5)
  assert np.abs(emb[0] - emb[1]).max() > 1e-2


def test_encoder_loads_the_hubs_sentencepiece_layout(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  path = F.tiny_t5_sentencepiece(str(tmp_path / "sp"))
  assert not os.path.exists(os.path.join(path, "tokenizer.json"))
  enc = text_encoder.TextEncoder(path, max_len=10)
  texts = ["a red cat on a mat", "the tower"]
  _, mask = enc.encode(texts)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "spiece.model"))
  for t, m in zip(texts, mask):
    want = sp.encode(t) + [1]  # SentencePiece's own pieces, then </s>
    assert enc.tokenizer(t)["input_ids"] == want
    np.testing.assert_array_equal(m, np.arange(10) < len(want))


def test_random_t5_is_deterministic_in_its_seed(tmp_path, encoder):
  texts = ["a car", "a green apple"]
  same = text_encoder.TextEncoder(F.tiny_t5(str(tmp_path / "a")), max_len=12).encode(texts)[0]
  np.testing.assert_array_equal(same, encoder.encode(texts)[0])
  other = text_encoder.TextEncoder(F.tiny_t5(str(tmp_path / "b"), seed=1), max_len=12)
  other = other.encode(texts)[0]
  assert np.abs(other - same).max() > 1e-2


def test_encoder_not_loadable_offline_is_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
  with pytest.raises(UserError, match=r"cannot load text encoder 'no-such-org/no-such-t5'.*"
                     r"huggingface-cli download.*HF_HUB_OFFLINE") as e:
    text_encoder.TextEncoder("no-such-org/no-such-t5")
  assert "\n" not in str(e.value)
  # Without network (the Hub's name does not resolve) the same, at once (no minute of retries).
  monkeypatch.delenv("HF_HUB_OFFLINE")
  monkeypatch.setattr(text_encoder, "_hub_resolves", lambda endpoint: False)
  with pytest.raises(UserError, match=r"'no-such-org/no-such-t5' \(no network, and not in the "
                     r"local Hugging Face cache\).*huggingface-cli download"):
    text_encoder.TextEncoder("no-such-org/no-such-t5")
  with pytest.raises(UserError, match="not a directory"):
    text_encoder.TextEncoder(str(tmp_path / "missing" / "t5"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="cannot load text encoder"):
    text_encoder.TextEncoder(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# Record format.


def test_captioned_record_roundtrip_stores_only_used_tokens():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
  mask = np.zeros((3, 10), bool)
  mask[0, :4], mask[1, :2], mask[2, :6] = True, True, True
  emb = np.where(mask[..., None], rng.normal(size=(3, 10, 5)), 0).astype(np.float16)
  caps = ["a cat", "ein Hund", "un café"]
  rec = records_lib.encode_record(img, 0, key="k", text_emb=emb, text_mask=mask, captions=caps,
                           portrait=True)
  header, off = records_lib.decode_header(rec)
  # token rows 6..9 are not stored (the image is a PNG of nbytes)
  assert len(rec) - off == header["nbytes"] + 3 * 6 * 5 * 2 + 3 * 6
  r = records_lib.decode_record(rec)
  np.testing.assert_array_equal(r["image"], img)
  np.testing.assert_array_equal(r["text_emb"], emb)
  np.testing.assert_array_equal(r["text_mask"], mask)
  assert r["text_emb"].dtype == np.float16 and r["text_mask"].dtype == bool
  assert r["captions"] == caps and r["portrait"] == 1
  short = records_lib.decode_record(rec, pad=False)
  assert short["text_emb"].shape == (3, 6, 5) and short["text_max_len"] == 10
  # The pipeline's per-example caption: padded back to [T, D].
  one = pipeline.caption(short, 1)
  np.testing.assert_array_equal(one["text_emb"], emb[1])
  np.testing.assert_array_equal(one["text_mask"], mask[1])


# ---------------------------------------------------------------------------------------------
# COCO.


def test_coco_records_hold_all_captions_and_their_embeddings(prepared, encoder):
  src, out, meta = prepared
  assert meta["image_size"] == [16, 24] and meta["resolution"] == [16, 24]
  assert meta["counts"] == {"train": 3, "eval": 3} and meta["text"]["dim"] == F.DIM
  for split, rows in (("train", F.CAPTIONS["train"]), ("eval", F.CAPTIONS["val"])):
    recs = records(out, meta, split)
    folder = "train2017" if split == "train" else "val2017"
    for image_id, (w, h), caps in rows:
      r = recs[f"{folder}/{image_id:012d}.jpg"]
      assert r["captions"] == [" ".join(c.split()) for c in caps]
      emb, mask = encoder.encode(r["captions"])
      np.testing.assert_array_equal(r["text_mask"], mask)
      np.testing.assert_array_equal(r["text_emb"], emb.astype(np.float16))
      assert r["image"].shape == (16, 24, 3)
      assert r["portrait"] == int(w < h)


def test_portrait_images_are_rotated_counter_clockwise(prepared):
  src, out, meta = prepared
  r = records(out, meta, "train")["train2017/000000000002.jpg"]  # 40x56 portrait
  assert r["portrait"] == 1
  img = r["image"].astype(float)
  # The fixture image's red grows with x and green with y: after a counter-clockwise quarter turn
  # the original x runs bottom -> top and the original y left -> right.
  assert img[0, :, 0].mean() > img[-1, :, 0].mean() + 40
  assert img[:, -1, 1].mean() > img[:, 0, 1].mean() + 40
  # Rotating back gives the unrotated image resized (BICUBIC, 40x56 -> 17x24: the smallest cover
  # of 16x24) and cropped to its 16 right-hand columns: the rotated image's top rows.
  with Image.open(os.path.join(src, "train2017", "000000000002.jpg")) as im:
    direct = np.asarray(im.convert("RGB").resize((17, 24), Image.BICUBIC))[:, 1:]
  back = np.rot90(r["image"], k=-1)
  assert back.shape == direct.shape and np.abs(back.astype(int) - direct).mean() < 1.5
  land = records(out, meta, "train")["train2017/000000000001.jpg"]
  assert land["portrait"] == 0 and land["image"][:, -1, 0].mean() > land["image"][:, 0, 0].mean()


def test_eval_captions_are_seeded_and_reused(prepared, tmp_path, t5):
  src, out, meta = prepared
  ec = captions.load_eval_captions(out)
  assert len(ec.captions) == 10 and ec.meta["seed"] == 3 and ec.meta["repeats"]
  # 6 validation captions, 10 draws: every caption appears before any appears twice.
  assert len(set(ec.captions[:6])) == 6
  recs = records(out, meta, "eval")
  for k, c, e, m in zip(ec.keys, ec.captions, ec.text_emb, ec.text_mask):
    i = recs[k]["captions"].index(c)
    np.testing.assert_array_equal(e, recs[k]["text_emb"][i])
    np.testing.assert_array_equal(m, recs[k]["text_mask"][i])
  # Same seed -> the same list; another seed -> another order.
  again = prepare.prepare(src, "16x24", str(tmp_path / "again"), text_encoder=t5, max_len=12,
                       eval_captions=10, caption_seed=3, splits=["eval"], progress=False)
  assert again["eval_captions"]["count"] == 10
  same = captions.load_eval_captions(str(tmp_path / "again"))
  assert same.captions == ec.captions and same.keys == ec.keys
  np.testing.assert_array_equal(np.asarray(same.text_emb), np.asarray(ec.text_emb))
  idx = captions.draw(6, 4, 4)
  assert len(set(idx.tolist())) == 4 and not np.array_equal(idx, captions.draw(6, 4, 3))


def test_batches_draw_one_caption_per_example_per_step(prepared):
  src, out, meta = prepared
  recs = records(out, meta, "train")
  with pipeline.make_train_loader(out, global_batch_size=3, seed=0, process_index=0,
                                        process_count=1, random_flip=False) as it:
    batches = [next(it) for _ in range(12)]
  b = batches[0]
  assert b["text_emb"].shape == (3, 12, F.DIM) and b["text_mask"].shape == (3, 12)
  assert b["text_mask"].dtype == bool and b["portrait"].dtype == np.int32
  seen = {}
  for b in batches:
    for img, emb, mask, portrait in zip(b["image"], b["text_emb"], b["text_mask"], b["portrait"]):
      (key,) = [k for k, r in recs.items() if np.array_equal(r["image"], img)]
      r = recs[key]
      (i,) = [i for i in range(len(r["captions"])) if np.array_equal(r["text_emb"][i], emb)]
      np.testing.assert_array_equal(mask, r["text_mask"][i])
      assert portrait == r["portrait"]
      seen.setdefault(key, set()).add(i)
  assert seen["train2017/000000000002.jpg"] == {0, 1, 2}  # 12 draws of 3 captions
  # Caption draws resume exactly: the state after 5 batches gives batches 5.. again.
  kw = dict(global_batch_size=3, seed=0, process_index=0, process_count=1, random_flip=False)
  with pipeline.make_train_loader(out, **kw) as it:
    for _ in range(5):
      next(it)
    state = it.get_state()
  with pipeline.make_train_loader(out, **kw) as it:
    it.set_state(state)
    for want in batches[5:8]:
      got = next(it)
      for k in ("text_emb", "text_mask", "portrait", "image"):
        np.testing.assert_array_equal(got[k], want[k])
  # The eval split in file order (reference statistics, evaluation): first caption of each record.
  (ev,) = list(pipeline.iter_split(out, "eval"))
  assert ev["image"].shape == (3, 16, 24, 3) and ev["portrait"].tolist() == [0, 0, 1]
  imgs, _ = pipeline.load_split(out, "eval")
  np.testing.assert_array_equal(imgs, ev["image"])


def test_coco_bad_input_is_one_line_error(tmp_path, t5):
  src = F.fake_coco(str(tmp_path / "coco"))
  out = str(tmp_path / "out")
  os.remove(os.path.join(src, "train2017", "000000000003.jpg"))
  with pytest.raises(UserError, match=r"image train2017/000000000003.jpg .* is missing; download "
                     r"train2017.zip"):
    prepare.prepare(src, 16, out, text_encoder=t5, progress=False)
  with pytest.raises(UserError, match=r"image val2017/000000000011.jpg is 52 wide and 40 high, "
                     r"smaller than the target \(width 64, height 64\); pass upscale=true"):
    prepare.prepare(src, 64, out, text_encoder=t5, splits=["eval"], progress=False)
  meta = prepare.prepare(src, 64, out, text_encoder=t5, splits=["eval"], upscale=True,
                      progress=False, eval_captions=2)
  assert meta["counts"]["eval"] == 3
  os.remove(os.path.join(src, "annotations", "captions_val2017.json"))
  with pytest.raises(UserError, match=r"no COCO captions file \(annotations/captions_val2017.json"
                     r"\); download annotations_trainval2017.zip"):
    prepare.prepare(src, 16, str(tmp_path / "o2"), captions=True, splits=["eval"], progress=False)
  with pytest.raises(UserError, match="caption 7 refers to image 99"):
    bad = os.path.join(src, "annotations", "captions_val2017.json")
    with open(bad, "w") as f:
      json.dump({"images": [], "annotations": [{"id": 7, "image_id": 99, "caption": "x"}]}, f)
    coco.coco_source(src, splits=["eval"])


def test_cli_offline_encoder_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  src = F.fake_coco(str(tmp_path / "coco"))
  with pytest.raises(SystemExit) as e:
    run_main(data_cli.main, ["prepare", f"src={src}", "res=16", f"out={tmp_path / 'out'}",
                         "text_encoder=no-such-org/no-such-t5", "progress=false"])
  assert e.value.code != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: cannot load text encoder")
  assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Emoji as a captioned set.


def test_emoji_captions_from_names_short_names_and_skin_tones():
  meta_json = [
      {"name": "GRINNING FACE", "short_names": ["grinning"], "image": "1f600.png"},
      {"name": "Spain Flag", "short_names": ["es", "flag-es"], "image": "es.png"},
      {"name": "FATHER CHRISTMAS", "short_names": ["santa"], "image": "1f385.png",
       "skin_variations": {"1F3FB": {"image": "1f385-1f3fb.png"},
                           "1F3FB-1F3FF": {"image": "x.png"}}},
      {"name": "HAMMER", "short_names": ["hammer"], "image": "h.png"}]
  caps = emoji.emoji_captions(meta_json)
  assert caps["1f600.png"] == ("grinning face", "grinning")
  assert caps["es.png"] == ("spain flag", "es", "flag es")
  assert caps["1f385-1f3fb.png"] == ("father christmas, light skin tone", "santa, light skin tone")
  assert caps["x.png"][0] == "father christmas, light skin tone, dark skin tone"
  assert caps["h.png"] == ("hammer",)


def test_emoji_prepared_as_a_captioned_set(tmp_path, t5):
  tarball = os.path.join(records_lib.data_root(), "cache", TARBALL)
  if not os.path.isfile(tarball):
    pytest.skip("the emoji tarball is not cached (it needs npm)")
  out = str(tmp_path / "emoji")
  meta = prepare.prepare("emoji", 16, out, captions=True, text_encoder=t5, max_images=12,
                      progress=False)
  assert meta["counts"] == {"train": 12, "eval": 12} and meta["eval_captions"]["count"] >= 12
  recs = list(records_lib.split_records(out, meta["shards"]["train"]))
  want = emoji.emoji_captions(emoji.read_tarball(tarball)[1])
  assert all(r["captions"] == list(want[r["key"]]) for r in recs)
  assert all(r["portrait"] == 0 and r["text_emb"].shape[1] == emoji.EMOJI_MAX_LEN for r in recs)
  assert meta["num_classes"] == 10  # the category labels stay


def test_demo_encoder_covers_every_emoji_caption(tmp_path):
  tarball = os.path.join(records_lib.data_root(), "cache", TARBALL)
  if not os.path.isfile(tarball):
    pytest.skip("the emoji tarball is not cached (it needs npm)")
  (tmp_path / "cache").mkdir()
  os.symlink(tarball, tmp_path / "cache" / os.path.basename(tarball))
  path = emoji.emoji_text_encoder(str(tmp_path))
  assert path == emoji.emoji_text_encoder(str(tmp_path))  # built once
  enc = text_encoder.TextEncoder(path, emoji.EMOJI_MAX_LEN)
  assert enc.dim == emoji.EMOJI_ENCODER["d_model"]
  caps = emoji.emoji_captions(emoji.read_tarball(tarball)[1])
  caps = sorted({c for cs in caps.values() for c in cs})
  ids = enc.tokenizer(caps)["input_ids"]
  assert all(2 not in i for i in ids)  # no <unk>: the vocabulary is the captions' words
  assert max(len(i) for i in ids) <= emoji.EMOJI_MAX_LEN  # no caption is truncated
  emb, mask = enc.encode(caps[:50])
  assert len({e.tobytes() for e in emb.astype(np.float16)}) == 50  # distinct captions and text


def test_reference_statistics_of_the_coco_validation_split(tmp_path, t5):
  src = F.fake_coco(str(tmp_path / "coco"))
  out = str(tmp_path / "out")
  prepare.prepare(src, 16, out, text_encoder=t5, splits=["eval"], eval_captions=4, progress=False)
  with pytest.raises(SystemExit) as e:
    run_main(reference.main, [f"data_dir={out}", "split=eval", "source=fid-helper", "batch_size=8"])
  assert e.value.code == 0
  (name,) = os.listdir(os.path.join(out, "fid_stats"))
  with np.load(os.path.join(out, "fid_stats", name)) as z:
    assert z["mu"].shape == (2048,)
  assert records_lib.read_meta(out)["counts"] == {"eval": 3}  # the whole split


def test_captioned_set_on_gcs_keeps_its_eval_captions(tmp_path, t5, gcs_bucket, monkeypatch):
  monkeypatch.setenv("SIMPLE_DIFFUSION_DATA", str(tmp_path / "root"))
  src = F.fake_coco(str(tmp_path / "coco"))
  out = gcs_bucket + "/coco16"
  prepare.prepare(src, 16, out, text_encoder=t5, splits=["eval"], eval_captions=4, caption_seed=1,
               progress=False)
  local = records_lib.localize(out)
  assert local.startswith(str(tmp_path / "root"))
  remote = captions.load_eval_captions(local)
  prepare.prepare(src, 16, str(tmp_path / "here"), text_encoder=t5, splits=["eval"], eval_captions=4,
               caption_seed=1, progress=False)
  here = captions.load_eval_captions(str(tmp_path / "here"))
  assert remote.captions == here.captions and len(here.captions) == 4
  np.testing.assert_array_equal(np.asarray(remote.text_emb), np.asarray(here.text_emb))


# ---------------------------------------------------------------------------------------------
# Table 8's reference (COCO val2014) and zero-shot training data.


def test_coco_2014_is_preferred_and_2017_is_refused_at_paper_scale(tmp_path, t5):
  """The paper's FID@30K and the literature it compares with use val2014 (40,504 images); val2017
  (5,000) would repeat captions against a 5K reference."""
  root = str(tmp_path / "coco")
  F.fake_coco(root, year=2017)
  F.fake_coco(root, year=2014)
  out = str(tmp_path / "out")
  meta = prepare.prepare(root, 16, out, text_encoder=t5, splits=["eval"], eval_captions=4,
                         progress=False)
  assert meta["source"].startswith("coco2014:") and meta["split_origins"] == {"eval": "coco2014"}
  assert all(r["key"].startswith("val2014/") for r in records(out, meta, "eval").values())
  coco.check_paper_eval_set(out)  # val2014: accepted
  only2017 = str(tmp_path / "coco2017")
  F.fake_coco(only2017, year=2017)
  out17 = str(tmp_path / "coco-256")
  prepare.prepare(only2017, 16, out17, text_encoder=t5, splits=["eval"], eval_captions=4,
                  progress=False)
  with pytest.raises(UserError, match=r"evaluates on COCO val2017: its 5,000 images .* prepare "
                                      r"the eval split from COCO 2014") as e:
    coco.check_paper_eval_set(out17)
  assert "\n" not in str(e.value)
  coco.check_paper_eval_set(str(tmp_path / "not-prepared-yet"))  # left to the trainer
  # experiments.run refuses it for Table 8 at paper scale (only there).
  table8 = [j for j in registry.jobs(registry.select("8")) if j.resolution == 256]
  with pytest.raises(UserError, match="val2017"):
    run.check_data("paper", "local", str(tmp_path / "coco-{res}"), table8)
  run.check_data("demo", "local", str(tmp_path / "coco-{res}"), table8)


def _caption_folder(root, layout: str) -> str:
  """Four captioned images (and one without caption) in a folder, as .txt files or a jsonl."""
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  rows = {"a.jpg": ["a red cat on a mat", "a cat"], "sub/b.png": ["a tall tower"],
          "c.jpg": ["two dogs play"], "d.jpg": ["a green apple", "an apple"], "e.jpg": []}
  for i, (rel, caps) in enumerate(rows.items()):
    F.image((40, 36), 50 + i).save(os.path.join(root, rel))
    if layout == "txt" and caps:
      with open(os.path.join(root, os.path.splitext(rel)[0] + ".txt"), "w") as f:
        f.write("\n".join(caps) + "\n\n")
  if layout == "jsonl":
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
      for rel, caps in rows.items():
        for c in caps:  # one line per caption: lines of the same file add up
          f.write(json.dumps({"file": rel, "caption": c}) + "\n")
  return str(root), {k: v for k, v in rows.items() if v}


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_caption_folder_trains_and_coco_evaluates_zero_shot(tmp_path, t5, layout):
  folder, rows = _caption_folder(tmp_path / "pairs", layout)
  root = F.fake_coco(str(tmp_path / "coco"), year=2014)
  out = str(tmp_path / "out")
  meta = prepare.prepare(folder, 16, out, captions=True if layout == "txt" else None,
                         eval_src=root, text_encoder=t5, eval_captions=5, progress=False)
  assert meta["split_origins"] == {"train": "caption-folder", "eval": "coco2014"}
  assert meta["trained_on_coco"] is False and meta["zero_shot"] is True
  assert meta["counts"] == {"train": 4, "eval": 3} and meta["skipped"]["train"] == 1
  train = records(out, meta, "train")
  assert {k: r["captions"] for k, r in train.items()} == rows
  assert all(k.startswith("val2014/") for k in records(out, meta, "eval"))
  ec = captions.load_eval_captions(out)
  coco_caps = {c for _, _, caps in F.CAPTIONS["val"] for c in caps}
  assert len(ec.captions) == 5 and set(ec.captions) <= coco_caps
  # COCO's own train split is not zero-shot; the record says so, and a run records it in job.json
  # (tables/layout.py then writes "COCO-trained, not zero-shot" beside its FID@30K).
  meta = prepare.prepare(root, 16, str(tmp_path / "coco-out"), text_encoder=t5, eval_captions=2,
                         progress=False)
  assert meta["trained_on_coco"] is True and meta["zero_shot"] is False
  if layout == "txt":
    (job,) = [j for j in registry.jobs(registry.select("8")) if j.resolution == 256]
    for data_dir, trained_on_coco, zero_shot in ((str(tmp_path / "coco-out"), True, False),
                                                 (out, False, True), (None, False, False)):
      run_dir = str(tmp_path / f"run-{trained_on_coco}-{zero_shot}")
      jobs.write_job_json(job, "demo", run_dir, jobs.job_args(job, "demo", run_dir, data_dir))
      with open(os.path.join(run_dir, "job.json")) as f:
        data = json.load(f)["data"]
      assert (data["trained_on_coco"], data["zero_shot"]) == (trained_on_coco, zero_shot)


def test_caption_folder_without_captions_is_one_line(tmp_path):
  folder, _ = _caption_folder(tmp_path / "pairs", "none")
  with pytest.raises(UserError, match=r"no image of src=.* has a caption: put <image>.txt"):
    prepare.prepare(folder, 16, str(tmp_path / "out"), captions=True, progress=False)
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    f.write('{"file": "a.jpg", "caption": "x"}\n{"file": "c.jpg"}\n')
  with pytest.raises(UserError, match=r"captions.jsonl line 2 is not"):
    prepare.prepare(folder, 16, str(tmp_path / "out"), progress=False)
