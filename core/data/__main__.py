"""``python -m core.data prepare ...`` / ``python -m core.data info data_dir=...``."""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from core import cli
from core.data import records
from core.data import text_encoder as text_lib
from core.data.prepare import prepare, summary_line
from core.data.preprocess import parse_res
from core.errors import UserError, run_main

PREPARE_OPTIONS = [
    cli.Option("src", None, "image source: a folder of class folders (label = index of the sorted "
               "folder name), a flat image folder (unconditional), ImageNet as downloaded "
               "(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and the devkit, read in place), "
               "extracted (train/<wnid>/, val/ flat or in class folders), or Kaggle's layout; a "
               "COCO root (train2014/, val2014/, annotations/captions_*2014.json, or 2017: a "
               "captioned set), or 'emoji' for the built-in emoji-datasource-google set (needs "
               "npm). Layouts and the disk each needs: docs/data_sources.md. Required."),
    cli.Option("eval_src", None, "take the eval split from this source instead (all of src= is "
               "then train), e.g. src=<caption folder> eval_src=<COCO root>: a model trained on "
               "other data, evaluated zero-shot on COCO's validation set as in Table 8. meta.json "
               "records both (split_origins, trained_on_coco, zero_shot)."),
    cli.Option("res", None, "output size: 64 (square) or HxW (e.g. 384x640); images are ADM "
               "center-cropped and resized to it (for HxW, images of the other orientation are "
               "rotated first and flagged 'portrait'). Required.", parse_res),
    cli.Option("out", None, "output directory (local path or gs://bucket/prefix); gets "
               "<split>-NNNNN-of-NNNNN.array_record shards, meta.json and label_map.json. "
               "Required."),
    cli.Option("eval_fraction", None, "for a folder source without train/ and val/: fraction of "
               "images (chosen by a hash of their relative path) put in the 'eval' split. Default "
               "0.1.",
               float),
    cli.Option("shards", 0, "number of train shards (eval gets a proportional number); 0 = about "
               "one per 512 MiB of pixels.", int),
    cli.Option("splits", "train,eval", "comma-separated splits to write (train, eval).",
               lambda s: [x.strip() for x in s.split(",") if x.strip()]),
    cli.Option("val_labels", None, "labels of ImageNet's flat val images when src= does not "
               "hold them: the devkit (ILSVRC2012_devkit_t12.tar.gz or its folder), or a file of "
               "'<image file> <wnid>' lines (whitespace or comma separated, e.g. Kaggle's "
               "LOC_val_solution.csv). Found in src= without it: the devkit, "
               "LOC_val_solution.csv, or val file names that begin with '<wnid>_' (ADM)."),
    cli.Option("text_emb", None, "optional .npz of text embeddings keyed by image file stem, "
               "stored in each record as 'text_emb' (images without one are skipped)."),
    cli.Option("captions", None, "text-to-image: keep every caption of each image with its text "
               "embedding. On by default for a COCO root (train2014/, val2014/, annotations/"
               "captions_*2014.json; or 2017) and a folder with captions.jsonl; src=emoji captions=true captions the emoji with "
               "their names.", cli.parse_bool),
    cli.Option("text_encoder", None, "with captions: a Hugging Face T5 name or save_pretrained "
               f"folder (default {text_lib.DEFAULT_ENCODER}; for src=emoji a small random T5 "
               "built once under the data root)."),
    cli.Option("max_len", 0, f"with captions: tokens per caption (0 = {text_lib.DEFAULT_MAX_LEN}, "
               "emoji 24).", int),
    cli.Option("eval_captions", 0, "with captions: captions drawn from the eval split for "
               "FID/CLIP evaluation (0 = 30000 for COCO, every eval caption for emoji).", int),
    cli.Option("caption_seed", 0, "seed of the evaluation caption draw.", int),
    cli.Option("upscale", None, "enlarge images smaller than res (BICUBIC); default true, false "
               "for COCO (a smaller image is then an error).", cli.parse_bool),
    cli.Option("workers", max(1, min(16, os.cpu_count() or 1)), "processes decoding images.", int),
    cli.Option("max_images", 0,
               "keep at most this many images per split (0 = all); for smoke tests.",
               int),
    cli.Option("overwrite", False, "replace a data set already prepared at out=.", cli.parse_bool),
    cli.Option("progress", True, "show progress (a bar on a terminal, else periodic log lines).",
               cli.parse_bool),
]

# info's verify=auto reads every record (checking ArrayRecord's chunk checksums) up to this size.
VERIFY_AUTO_BYTES = 2 * 2**30
INFO_OPTIONS = [
    cli.Option("data_dir", None, "a prepared data set directory (or gs://...)."),
    cli.Option("verify", "auto", "shard check: quick opens every shard and compares its record "
               "count with meta.json; full also reads every record (ArrayRecord's checksums catch "
               "flipped bytes); auto = full up to 2 GiB of shards, else quick (a gs:// data set "
               "is streamed one shard at a time for the check; auto skips it above 2 GiB); none "
               "skips it.",
               choices=["auto", "quick", "full", "none"]),
    cli.Option("hosts", 1, "hosts that train on it (a TPU slice's VMs, SLURM nodes): prints the "
               "bytes of train shards each host caches from a gs:// data set.", int),
]

DESCRIPTION = """\
Prepares an image data set for training: every image is converted to RGB (transparency composited
on white), center-cropped and resized as ADM does for ImageNet (halve with a BOX filter while the
smaller side is >= 2*res, BICUBIC so the smaller side is res, central res x res crop) and written
with an int label to ArrayRecord shards (splits 'train' and 'eval'), plus meta.json. Each record
holds the smaller of a PNG of those pixels and the source file itself (cropped again, identically,
when read: docs/data.md). Corrupt or unreadable files are skipped and counted.

commands:
  prepare src=... res=... out=...   prepare a data set (options below)
  info data_dir=... [hosts=N]       print a prepared data set's summary and bytes per image and
                                    per host, check its shards

example: python -m core.data prepare src=/data/imagenet res=256 out=/data/imagenet256 workers=16
text-to-image: python -m core.data prepare src=/data/coco res=256 out=/data/coco256 \
                 text_encoder=google/t5-v1_1-xxl upscale=true
               (all captions kept with their T5 embeddings; eval_captions/: 30K FID captions)"""


def host_line(meta, hosts: int, data_dir: str) -> str:
  """What each of ``hosts`` hosts caches of the train split (the split training reads)."""
  split = "train" if meta["shards"].get("train") else next(iter(meta["shards"]), None)
  per = records.bytes_per_host(meta, split, hosts, data_dir=data_dir) if split else None
  if per is None:
    return "bytes per host: unknown (a format-1 data set on gs:// does not record shard sizes)"
  return (f"bytes per host ({hosts} host{'s' if hosts > 1 else ''}, {split} split): at most "
          f"{max(per) / 2**30:,.2f} GiB ({max(per):,} bytes) cached from gs:// (a local or "
          f"gcsfuse-mounted data set: none)")


def main(argv: Sequence[str]) -> int:
  """``python -m core.data prepare ...`` / ``python -m core.data info data_dir=...``."""
  argv = list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(cli.format_help("core.data prepare", DESCRIPTION, PREPARE_OPTIONS))
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd == "info":
    values, _ = cli.parse(rest, INFO_OPTIONS, prog="core.data info",
                          description="Prints a prepared data set's summary and checks its shards.")
    if not values["data_dir"]:
      raise UserError("info needs data_dir=<prepared data set directory>")
    data_dir = values["data_dir"]
    if values["hosts"] < 1:
      raise UserError(f"hosts={values['hosts']} must be at least 1")
    meta = records.read_meta(data_dir)
    local = records.localize(data_dir)
    names = [n for v in meta["shards"].values() for n in v]
    sizes = {s: records.shard_bytes(meta, s, local) for s in meta["shards"]}
    nbytes = sum(sum(v) for v in sizes.values() if v)
    verify = values["verify"]
    remote = local != data_dir
    full = verify == "full" or (verify == "auto" and nbytes <= VERIFY_AUTO_BYTES)
    n = None
    if verify != "none" and not (remote and verify == "auto" and nbytes > VERIFY_AUTO_BYTES):
      n = 0
      for split, shard_names in meta["shards"].items():
        for name in shard_names:
          with records.shard_file(data_dir, name) as path:
            n += records.check_shards(os.path.dirname(path), meta, [split], full=full,
                                      names=[name])
    print(summary_line(meta))
    print(json.dumps({k: meta.get(k) for k in ("format", "resolution", "num_classes", "counts",
                                                "skipped", "codecs", "source")}, indent=1))
    print(f"shards: {len(names)} files, {nbytes / 2**20:.1f} MiB" + (
        "" if n is None else f", {n} records " + (
            "read back with their checksums" if full else
            "opened and counted (verify=full reads every record's checksum)")) + (
        "; not checked (verify=quick or full streams every shard)" if n is None else ""))
    for split in meta["shards"]:
      if sizes[split] and meta["counts"].get(split):
        print(f"{split}: {sum(sizes[split]) / meta['counts'][split] / 1e3:,.1f} kB per image")
    print(host_line(meta, values["hosts"], local))
    return 0
  if cmd != "prepare":
    raise UserError(f"unknown command {cmd!r}; use: python -m core.data prepare src=... res=... "
                    f"out=...")
  values, bindings = cli.parse(rest, PREPARE_OPTIONS, prog="core.data prepare",
                               description=DESCRIPTION)
  if bindings:
    raise UserError(f"prepare takes no gin bindings (got {bindings[0]!r}); see --help")
  for name in ("src", "res", "out"):
    if values[name] is None:
      raise UserError(f"{name}= is required, e.g. python -m core.data prepare src=emoji res=64 "
                      f"out=data/emoji-64")
  splits = values["splits"]
  if isinstance(splits, str):  # the default
    splits = [x.strip() for x in splits.split(",") if x.strip()]
  meta = prepare(values["src"], values["res"], values["out"], eval_fraction=values["eval_fraction"],
                 shards=values["shards"], splits=splits, val_labels=values["val_labels"],
                 text_emb=values["text_emb"], workers=values["workers"],
                 max_images=values["max_images"], overwrite=values["overwrite"],
                 progress=values["progress"], captions=values["captions"],
                 text_encoder=values["text_encoder"], max_len=values["max_len"],
                 upscale=values["upscale"], eval_captions=values["eval_captions"],
                 caption_seed=values["caption_seed"], eval_src=values["eval_src"])
  for split, ex in meta["skipped_examples"].items():
    for e in ex[:3]:
      print(f"skipped ({split}) e.g. {e}", file=sys.stderr)
  print(summary_line(meta) + f" -> {values['out']} in {meta['prepare_seconds']:.1f} s")
  return 0


if __name__ == "__main__":
  run_main(main)
