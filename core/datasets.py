"""The built-in default data set: Google's emoji images from the npm package emoji-datasource-google.

A real-image, class-labelled set small enough for CPU demos and tests, with no account or manual
download: ``npm pack emoji-datasource-google@16.0.0`` gives a tarball whose
``package/img/google/64/*.png`` are 3,786 colour 64x64 RGBA emoji (composited on white) and whose
``package/emoji.json`` gives each emoji's ``category``; skin-tone variants (``skin_variations``)
take their parent's category. Labels are indices of the sorted category names (10 classes).
About 10% of the images, chosen by a hash of the file name, form the 'eval' split.

As a captioned (text-to-image) set (``captions=True``; ``python -m core.data prepare src=emoji
captions=true``) every image keeps all its captions (:func:`emoji_captions`): its lowercased Unicode
name ("grinning face"; a skin-tone variant adds ", medium-dark skin tone") and each of its short
names that says something else ("grinning"; underscores and hyphens become spaces). emoji.json has
no keyword lists; names are what a user would type. Without T5-XXL offline, the demo's text encoder
is :func:`emoji_text_encoder`: a small random T5 (d_model 64, 2 layers; word-level vocabulary = the
words of every emoji caption), built from seed 0 once under ``<data root>/text_encoders``. Random
word embeddings still give every caption a distinct embedding sequence, which is all a diffusion
model needs to learn caption-dependent samples; only generalisation to unseen wordings is lost.

:func:`default_data_dir` returns ``<data root>/emoji-<res>``, preparing it on first use with the
same code as ``python -m core.data prepare src=emoji res=<res> out=...`` (ADM resize 64 -> res).
The data root is ``$SIMPLE_DIFFUSION_DATA`` or ``<repo root>/data``; the tarball is cached in
``<data root>/cache``. Preparation holds a file lock and writes to a temporary directory that is
renamed into place, so concurrent callers never see (or make) a half-written data set.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator, Sequence

from core import data
from core import text_encoder
from core.errors import UserError

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
# SHA-1 of the npm tarball, as npm reports it ("shasum"); pins the exact images.
TARBALL_SHA1 = "a80ac3e8106cbd4d8648ce758aa099e8827b6157"
IMAGE_DIR = "package/img/google/64/"
NUM_IMAGES = 3786
EVAL_FRACTION = 0.1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root() -> str:
  """``$SIMPLE_DIFFUSION_DATA`` if set, else ``<repo root>/data``."""
  return os.path.abspath(os.environ.get("SIMPLE_DIFFUSION_DATA") or os.path.join(REPO_ROOT, "data"))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive inter-process lock held on the file ``path`` (created if missing)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _sha1(path: str) -> str:
  from core.storage import file_digest  # pylint: disable=import-outside-toplevel
  return file_digest(path, "sha1").hex()


def emoji_tarball(root: str | None = None) -> str:
  """Path of the cached npm tarball, fetched with ``npm pack`` on first use (checked by SHA-1)."""
  cache = os.path.join(root or data_root(), "cache")
  path = os.path.join(cache, f"{PACKAGE}-{VERSION}.tgz")
  if os.path.exists(path):
    return path
  with _locked(os.path.join(cache, f".{PACKAGE}.lock")):
    if os.path.exists(path):
      return path
    npm = shutil.which("npm")
    if npm is None:
      raise UserError("the default emoji data set is fetched with npm, which is not installed; "
                      "install Node.js with npm (e.g. apt-get install nodejs npm, or nodejs.org) or "
                      "pass src=<image folder> / data_dir=<prepared data set>")
    tmp = tempfile.mkdtemp(prefix=".npm-pack-", dir=cache)
    try:
      r = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp,
                         capture_output=True, text=True, timeout=1800, check=False)
      got = os.path.join(tmp, f"{PACKAGE}-{VERSION}.tgz")
      if r.returncode != 0 or not os.path.exists(got):
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[:300]
        raise UserError(f"npm pack {PACKAGE}@{VERSION} failed ({tail}); check network access to the "
                        f"npm registry, or put the tarball at {path}, or pass src=<image folder>")
      sha = _sha1(got)
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


def _read_tarball(tarball: str) -> tuple[dict[str, bytes], list]:
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
    raise UserError(f"cannot read {tarball!r} ({e}); delete it so that it is fetched again") from None
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
                 splits: Sequence[str] = data.SPLITS, captions: bool = False) -> data.Source:
  """Reads the tarball into a :class:`core.data.Source` (labels = sorted categories; with
  ``captions`` every item also holds its :func:`emoji_captions`)."""
  tarball = tarball or emoji_tarball()
  if not os.path.isfile(tarball):
    raise UserError(f"src={tarball!r} does not exist; pass src=emoji to fetch it with npm")
  frac = EVAL_FRACTION if eval_fraction is None else eval_fraction
  if not 0.0 <= frac < 1.0:
    raise UserError(f"eval_fraction={frac} must be in [0, 1)")
  pngs, meta_json = _read_tarball(tarball)
  caps = emoji_captions(meta_json) if captions else {}
  category: dict[str, str] = {}
  for e in meta_json:
    category[e["image"]] = e["category"]
    for v in (e.get("skin_variations") or {}).values():
      category[v["image"]] = e["category"]
  class_names = sorted({category[n] for n in pngs if n in category})
  index = {c: i for i, c in enumerate(class_names)}
  items: dict[str, list[data.Item]] = {s: [] for s in splits}
  skipped = {s: 0 for s in splits}
  examples: dict[str, list[str]] = {s: [] for s in splits}
  for name in sorted(pngs):
    s = data.split_of(name, frac)
    if s not in items:
      continue
    if name not in category:
      skipped[s] += 1
      examples[s].append(f"{name}: not in emoji.json")
      continue
    items[s].append(data.Item(key=name, label=index[category[name]], data=pngs[name],
                              captions=caps.get(name, ())))
  return data.Source(items=items, class_names=class_names,
                     description=f"npm:{PACKAGE}@{VERSION} (eval_fraction={frac}" +
                     (", captions: names)" if captions else ")"),
                     skipped=skipped, skipped_examples=examples)


def default_data_dir(res: int, root: str | None = None, *, progress: bool = False,
                     captions: bool = False) -> str:
  """``<data root>/emoji-<res>`` (or, with ``captions``, ``emoji-captions-<res>``: the captioned
  text-to-image set with the demo's :func:`emoji_text_encoder` embeddings and its evaluation
  captions), prepared from the emoji tarball on first use (concurrency-safe)."""
  root = root or data_root()
  name = f"emoji-captions-{res}" if captions else f"emoji-{res}"
  out = os.path.join(root, name)
  if os.path.exists(os.path.join(out, "meta.json")):
    return out
  tarball = emoji_tarball(root)
  encoder = None
  if captions:
    encoder = text_encoder.TextEncoder(emoji_text_encoder(root), EMOJI_MAX_LEN, device="cpu")
  with _locked(os.path.join(root, f".{name}.lock")):
    if os.path.exists(os.path.join(out, "meta.json")):  # another process finished meanwhile
      return out
    if os.path.exists(out):  # left over by a crash before meta.json existed: never a valid set
      shutil.rmtree(out)
    tmp = data.make_temp_dir(root, f".{name}.tmp-")
    try:
      source = emoji_source(tarball, captions=captions)
      eval_count = sum(len(i.captions) for i in source.items.get("eval", []))
      meta = data.write_dataset(source, res, tmp, workers=1, progress=progress,
                                source_name=f"npm:{PACKAGE}@{VERSION}" + (" captions" if captions
                                                                          else ""),
                                encoder=encoder, eval_captions=eval_count)
      os.rename(tmp, out)  # atomic on one file system
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  print(data.summary_line(meta) + f" -> {out} in {meta['prepare_seconds']:.1f} s", file=sys.stderr)
  return out


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
  with _locked(os.path.join(root, "text_encoders", f".{name}.lock")):
    if os.path.isfile(os.path.join(out, "config.json")):
      return out
    _, meta_json = _read_tarball(tarball)
    vocab = text_encoder.words(c for cs in emoji_captions(meta_json).values() for c in cs)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(out))
    try:
      text_encoder.build_random_t5(tmp, vocab, **cfg)
      os.rename(tmp, out)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  return out
