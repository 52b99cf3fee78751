"""Every row of the paper's tables as a concrete job: gin files plus bindings at paper scale.

One :class:`Entry` per row that the paper trains (Tables 2-8, the 1024 result of appendix C, and the
interpolated schedule of section 3.1); Table 9 rows are guidance scales evaluated on the Table 7
U-ViT checkpoints, not new runs. Rows whose configurations are identical (Table 6's baselines are
Table 2's shift-32 and Table 5's DWT-2 rows, Table 3's "dropout from 16" and Table 4's "12+13" are
Table 2's 128 shift-64 row, Table 7's U-Net rows come from Tables 2 and 6) are recognised by their
resolved gin configuration and become one :class:`Job`, trained once and reported everywhere.

Choices where the paper is silent (named in README, pinned by tests/test_registry.py):
- U-ViT schedule: shifted to 64 (the paper's general recommendation, section 5.1).
- Text-to-image: the interpolated schedule from noise_d 32 to 256 at both 256 and 512 (section 3.1
  recommends it when guidance is used; its only example, "for a resolution of 512 ... starting at
  shift 32 and interpolating to shift 256", is also our 'interpolated' row); evaluated with
  noise_param 1.0 and 30K samples (appendix A), FID against the COCO validation set (appendix C:
  the data set's eval split, metric 'fid_eval'), over Figure 8's guidance scales.
- The U-ViT 512 trains without the multiscale loss: B.2's settings "for 512" name none, and
  Table 6 tests it on U-Nets only (section 3.2 recommends it above 256).
- Sampling steps: 256 (not in the paper; FID depends on it with noise_param 0.2), an Entry field.
- The 1024 U-Net uses the shift-64 schedule like the other U-Nets.
- Table 3's "no dropout (at 700K iters)": the checkpoint at 700K of a run on the other rows'
  1.5M-step schedule (at every scale the same fraction of the scale's run), kept whatever
  keep_checkpoints says and evaluated by step (Entry.eval_fraction, experiments/jobs.py).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from typing import Iterable, Sequence

import gin

from core import config as config_lib
from core.errors import UserError

GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
PAPER_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.csv")


# Not in the paper (appendix A gives the sampler, not its step count); FID depends on it.
SAMPLER_STEPS = 256
# Figure 8: guidance scales of the text-to-image model (CLIP vs FID@30K on COCO at 256).
FIGURE8_GUIDANCE = (1.0, 1.25, 1.4, 1.5, 2.0, 3.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of one table, as the paper prints it."""
  table: str
  group: str
  row: str
  arch: str                        # 'unet' or 'uvit'
  resolution: int
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...] = ()
  metrics: tuple[str, ...] = ("fid_train", "fid_eval")
  guidance: float = 1.0            # Table 9 rows: the guidance scale evaluated
  num_samples: int = 50_000        # 30K for COCO (Table 8)
  noise_param: float = 0.2         # 1.0 for COCO (appendix A)
  throughput: bool = False         # Tables 4 and 5 report relative steps/s
  note: str = ""
  guidance_sweep: tuple[float, ...] = ()   # further guidance scales evaluated (Figure 8)
  sampler_steps: int = SAMPLER_STEPS       # DDPM steps when sampling for FID / IS
  # The row is the checkpoint at this fraction of its run's steps (Table 3 "no dropout": 700K of a
  # run with the other rows' 1.5M-step schedule); kept and evaluated at every scale (jobs.py).
  eval_fraction: float = 1.0


@dataclasses.dataclass
class Job:
  """One training run (and its evaluations) serving one or more table rows."""
  name: str
  arch: str
  resolution: int
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  entries: list[Entry]
  # Per-run bindings after the scale's (experiments.run batch_size=, grad_accum=, steps=; the run
  # is then named after them: experiments/jobs.py with_overrides).
  overrides: tuple[str, ...] = ()

  @property
  def guidances(self) -> list[float]:
    return sorted({e.guidance for e in self.entries} | {w for e in self.entries
                                                        for w in e.guidance_sweep})

  @property
  def sampler_steps(self) -> int:
    return max(e.sampler_steps for e in self.entries)

  @property
  def eval_fraction(self) -> float:
    return self.entries[0].eval_fraction

  @property
  def num_samples(self) -> int:
    return max(e.num_samples for e in self.entries)

  @property
  def noise_param(self) -> float:
    return self.entries[0].noise_param

  @property
  def metrics(self) -> list[str]:
    return sorted({m for e in self.entries for m in e.metrics})

  def rows_json(self, eval_step: int | None = None, num_steps: int | None = None
                ) -> list[dict]:
    """The rows served; a snapshot row also names its step (``eval_step`` of ``num_steps``)."""
    snap = {"eval_step": eval_step, "num_steps": num_steps} if eval_step is not None else {}
    return [{"table": e.table, "group": e.group, "row": e.row, **snap} for e in self.entries]


def _shift(res: int, noise_d: int) -> tuple[str, ...]:
  return ("schedule.name = 'cosine_shifted'", f"schedule.image_d = {res}",
          f"schedule.noise_d = {noise_d}")


def _cosine() -> tuple[str, ...]:
  return ("schedule.name = 'cosine'",)


UNET_TRAIN = "train/unet_imagenet.gin"
# The U-ViT's 'linear' logSNR input spans the (shifted) schedule's range (appendix A).
_LINEAR_RANGE = "UViT.logsnr_range = @schedule_range()"
UVIT_TRAIN = "train/uvit_imagenet.gin"


def _unet(res: int, model_gin: str | None = None, *extra: str) -> tuple[tuple[str, ...],
                                                                        tuple[str, ...]]:
  files = (model_gin or f"models/unet_imagenet{res}.gin", UNET_TRAIN)
  base = [f"Train.image_size = {res}"]
  if res == 128:  # B.1: adam_beta2=0.999 and 1.5M steps for ImageNet 128
    base += ["Train.adam_b2 = 0.999", "Train.num_steps = 1500000"]
  return files, tuple(base) + tuple(extra)


def _entries() -> list[Entry]:
  out: list[Entry] = []
  add = out.append

  # Table 2: noise schedule (U-Net, ImageNet 128 and 256). Default dropout from 16, shift 64 at 128.
  for res, rows in ((128, [("cosine (original at 128)", None), ("cosine (shifted to 64)", 64),
                           ("cosine (shifted to 32)", 32)]),
                    (256, [("cosine (original at 256)", None), ("cosine (shifted to 128)", 128),
                           ("cosine (shifted to 64)", 64), ("cosine (shifted to 32)", 32)])):
    for label, nd in rows:
      files, b = _unet(res, None, *(_cosine() if nd is None else _shift(res, nd)))
      add(Entry("2", f"{res}x{res}", label, "unet", res, files, b))

  # Table 3: dropout start (U-Net 128, shift 64).
  for label, value in (("dropout from 128", "128"), ("dropout from 64", "64"),
                       ("dropout from 32", "32"),
                       ("dropout from 16", "16"), ("no dropout", "None")):
    extra = _shift(128, 64) + (f"UNet.dropout_from_resolution = {value}",)
    # "no dropout (at 700K iters)": a snapshot of a run on the other rows' 1.5M-step schedule.
    fraction = 700_000 / 1_500_000 if value == "None" else 1.0
    files, b = _unet(128, None, *extra)
    add(Entry("3", "128x128", label, "unet", 128, files, b, eval_fraction=fraction))

  # Table 4: blocks at the 16x16 level (U-Net 128, shift 64): num_res_blocks [3, 4, 4, a, 4].
  for a in (2, 4, 8, 12):
    files, b = _unet(128, None, *_shift(128, 64), f"UNet.num_res_blocks = [3, 4, 4, {a}, 4]")
    add(Entry("4", "128x128", f"{a}+{a + 1} blocks at 16x16", "unet", 128, files, b,
              throughput=True))

  # Table 5: downsampling strategies at 512 (B.1 keeps the total number of blocks).
  for label, model_gin, patching in (("None", "models/unet_imagenet512_nodown.gin", "none"),
                                     ("DWT-1", "models/unet_imagenet512_down2x.gin", "dwt_1"),
                                     ("DWT-2", "models/unet_imagenet512_down4x.gin", "dwt_2"),
                                     ("Conv (2x2)", "models/unet_imagenet512_down2x.gin", "conv_2"),
                                     ("Conv (4x4)", "models/unet_imagenet512_down4x.gin",
                                      "conv_4")):
    files, b = _unet(512, model_gin, *_shift(512, 64), f"UNet.patching_type = '{patching}'")
    add(Entry("5", "512x512", label, "unet", 512, files, b, throughput=True))

  # Table 6: multiscale loss (256 with shift 32, 512 with shift 64 and DWT-2).
  ms = ("diffusion_loss.multiscale = True", "diffusion_loss.multiscale_base = 32")
  for res, nd, model_gin, patch in ((256, 32, None, ()),
                                    (512, 64, "models/unet_imagenet512_down4x.gin",
                                     ("UNet.patching_type = 'dwt_2'",))):
    for label, extra in ((f"{res} (shift {nd})", ()), ("+ multiscale loss (32)", ms)):
      files, b = _unet(res, model_gin, *_shift(res, nd), *patch, *extra)
      add(Entry("6", f"{res}x{res}", label, "unet", res, files, b,
                metrics=("fid_train", "fid_eval", "is")))

  # Table 7: ours vs the literature (literature rows are reference values only).
  t7 = {128: ("models/unet_imagenet128.gin", _shift(128, 32), ()),
        256: ("models/unet_imagenet256.gin", _shift(256, 32), ()),
        512: ("models/unet_imagenet512_down4x.gin", _shift(512, 64),
              ("UNet.patching_type = 'dwt_2'",) + ms)}
  for res, (model_gin, sched, extra) in t7.items():
    files, b = _unet(res, model_gin, *sched, *extra)
    add(Entry("7", f"{res}x{res}", "simple diffusion (U-Net)", "unet", res, files, b,
              metrics=("fid_train", "fid_eval", "is")))
    for w in (1.0, 1.05, 1.1, 1.2, 1.4, 1.8, 2.0, 3.0):
      uvit_files = (f"models/uvit_imagenet{res}.gin", UVIT_TRAIN)
      uvit_b = (f"Train.image_size = {res}",) + _shift(res, 64) + (_LINEAR_RANGE,)
      if w == 1.0:
        add(Entry("7", f"{res}x{res}", "simple diffusion (U-ViT 2B)", "uvit", res, uvit_files,
                  uvit_b,
                  metrics=("fid_train", "fid_eval", "is")))
      add(Entry("9", f"{res}x{res}", f"guidance {w:.2f}", "uvit", res, uvit_files, uvit_b,
                metrics=("fid_train", "fid_eval", "is"), guidance=w))

  # Table 8: text to image on COCO (zero-shot FID@30K against the COCO validation set, which is
  # the data set's eval split: metric fid_eval; noise_param 1.0; Figure 8's guidance sweep).
  # Interpolated schedule 32 -> 256 at both resolutions (section 3.1's example is 512: 32 -> 256).
  for res, group in ((256, "256x256 COCO zero-shot"), (512, "512x512 COCO zero-shot")):
    b = (f"Train.image_size = {res}", "Train.num_steps = 700000",
         "schedule.name = 'cosine_interpolated'",
         f"schedule.image_d = {res}", "schedule.noise_d_low = 32", "schedule.noise_d_high = 256")
    b += (_LINEAR_RANGE,)
    # uvit_t2i.gin is the 256 model; at 512 two DWT levels keep the same feature maps.
    if res == 512:
      b += ("model.image_size = 512", "UViT.patching_type = 'dwt_2'")
    add(Entry("8", group, "simple diffusion (U-ViT 2B)", "uvit", res,
              ("models/uvit_t2i.gin", UVIT_TRAIN), b,
              metrics=("fid_eval", "clip_score"), num_samples=30_000, noise_param=1.0,
              guidance_sweep=FIGURE8_GUIDANCE,
              note="needs a data set with text embeddings (core.data prepare ... text embeddings) "
                   "whose eval split is the COCO validation set"))

  # Section 5: the non-square 384x640 text-to-image model (no table: samples in the paper). Its
  # portrait images are rotated at preparation and flagged; the flag conditions the model. Our
  # reading: the 256 model's U-ViT behind DWT-2 patching as at 512 (feature maps 96x160 at the
  # first level, the transformer at 12x20 = 240 tokens, the 512 model's 256), self-attention
  # instead of convs at the third level (24x40, where the square models have 32x32), interpolated
  # schedule 32 -> 256 at image_d 512 (the 512 row's; the geometric mean of 384 and 640 is 496).
  b = ("Train.image_size = (384, 640)", "Train.num_steps = 700000", "model.image_size = (384, 640)",
       "UViT.patching_type = 'dwt_2'", "UViT.attn_resolutions = [24]",
       "UViT.portrait_conditioning = True",
       "schedule.name = 'cosine_interpolated'", "schedule.image_d = 512",
       "schedule.noise_d_low = 32",
       "schedule.noise_d_high = 256", _LINEAR_RANGE)
  add(Entry("t2i-384x640", "384x640", "simple diffusion (U-ViT 2B, 384x640)", "uvit", 384,
            ("models/uvit_t2i.gin", UVIT_TRAIN), b, metrics=("fid_eval", "clip_score"),
            num_samples=30_000, noise_param=1.0,
            note="non-square (section 5): needs a COCO-like data set prepared at 384x640 with "
                 "the portrait flag"))

  # Appendix C: 1024x1024 U-Net with 4x4 patching, with and without the multiscale loss.
  for label, extra in (("U-Net 4x4 patching", ()), ("U-Net 4x4 patching + multiscale loss", ms)):
    files = ("models/unet_1024_patch4.gin", UNET_TRAIN)
    b = ("Train.image_size = 1024",) + _shift(1024, 64) + extra
    add(Entry("1024", "1024x1024", label, "unet", 1024, files, b, metrics=("fid_train",)))

  # Section 3.1: the interpolated schedule (no table in the paper; shift 32 -> 256 at 512).
  files, b = _unet(512, "models/unet_imagenet512_down4x.gin", "UNet.patching_type = 'dwt_2'",
                   "schedule.name = 'cosine_interpolated'", "schedule.image_d = 512",
                   "schedule.noise_d_low = 32",
                   "schedule.noise_d_high = 256")
  add(Entry("interpolated", "512x512", "cosine interpolated (shift 32 to 256)", "unet", 512, files,
            b,
            metrics=("fid_train", "fid_eval", "is")))
  return out


ENTRIES: list[Entry] = _entries()
TABLES: tuple[str, ...] = tuple(dict.fromkeys(e.table for e in ENTRIES))


def config_key(gin_files: Sequence[str], bindings: Sequence[str]) -> str:
  """The resolved configuration (gin's view of every bound value), to recognise identical runs."""
  with config_lib.scratch():
    config_lib.parse(list(gin_files), list(bindings))
    return gin.config_str()


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


_NAMES: dict[str, str] = {}


def job_name(key: str) -> str:
  """A run name fixed by the configuration: the first paper row (in table order) that uses it."""
  if not _NAMES:
    for e in ENTRIES:
      k = config_key(e.gin_files, e.bindings)
      if k not in _NAMES:
        digest = hashlib.sha1(k.encode()).hexdigest()[:6]
        _NAMES[k] = f"{e.arch}{e.resolution}-t{e.table}-{_slug(e.row)}-{digest}"
  return _NAMES[key]


def jobs(entries: Iterable[Entry] | None = None) -> list[Job]:
  """Groups entries into jobs by resolved configuration, in the order first seen.

  The same configuration always gets the same run name, whichever table asked for it, so a run
  trained for Table 2 is found (not retrained) when Table 6 or 7 is run.
  """
  entries = list(ENTRIES if entries is None else entries)
  by_key: dict[str, Job] = {}
  for e in entries:
    key = config_key(e.gin_files, e.bindings)
    if key not in by_key:
      by_key[key] = Job(job_name(key), e.arch, e.resolution, e.gin_files, e.bindings, [])
    by_key[key].entries.append(e)
  return list(by_key.values())


def paper_rows(table: str) -> list[dict[str, str]]:
  """The rows of ``table`` in the paper's CSV, in the paper's order."""
  with open(PAPER_CSV, newline="") as f:
    return [r for r in csv.DictReader(f) if r["table"] == table]


def select(table: str, rows: Sequence[str] | None = None) -> list[Entry]:
  """Entries of ``table`` (optionally only the named rows), with helpful errors."""
  if table not in TABLES:
    raise UserError(f"unknown table {table!r}; valid tables: {', '.join(TABLES)}")
  chosen = [e for e in ENTRIES if e.table == table]
  if rows:
    labels = {e.row for e in chosen} | {f"{e.group}/{e.row}" for e in chosen}
    for r in rows:
      if r not in labels:
        valid = "; ".join(sorted({f"{e.group}/{e.row}" for e in chosen}))
        raise UserError(f"table {table} has no row {r!r}; valid rows: {valid}")
    chosen = [e for e in chosen if e.row in rows or f"{e.group}/{e.row}" in rows]
  return chosen
