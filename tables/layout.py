"""A format-free layout of one paper table: our numbers beside the paper's, row by row.

Columns: the row label; for each metric the paper reports in that table (or we measured) a
'paper' and an 'ours' column (FID train, FID eval with our bootstrap std, IS as mean +- std,
steps/s relative to the table's reference row = 100%); KID train / eval (x1000, +- std over
subsets) where measured (the paper reports none); then where our numbers come from: training
step, number of samples (every FID's n), Inception extractor and resize, experiment scale. A
missing number is a dash (``Cell(None)``), never a zero. Rows evaluated with another sample count
than the paper (50K ImageNet, 30K COCO) carry a dagger and a footnote; relative throughput
measured on another device than the reference row carries a double dagger. Table 8 is "COCO
zero-shot": our FID@30K says beside it when it is not (:func:`zero_shot_note`). A row evaluated
at a snapshot of its run (Table 3's "no dropout") has a footnote naming the step. Our numbers from
a run that changed the row's training (experiments.run batch_size=, grad_accum=, steps=) carry a
section sign and a footnote saying how. :mod:`tables.markdown` and :mod:`tables.latex` turn a
layout into text.
"""
from __future__ import annotations

import dataclasses
import math

import pandas as pd

from tables import paper as paper_lib

DAGGER, DDAGGER, MODIFIED = "dagger", "ddagger", "section"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell; ``text=None`` is a dash (no value)."""
  text: str | None
  std: str | None = None      # IS: shown as text +- std
  percent: bool = False       # relative steps/s
  mark: str | None = None     # DAGGER / DDAGGER footnote mark
  emphasis: bool = False      # group headings
  note: str | None = None     # words beside the number, e.g. "COCO-trained, not zero-shot"


@dataclasses.dataclass(frozen=True)
class Column:
  key: str
  top: str          # metric name, e.g. 'FID train'
  sub: str = ""     # 'paper' / 'ours' / ''
  numeric: bool = True


@dataclasses.dataclass
class Row:
  kind: str              # 'group' or 'data'
  cells: list[Cell]      # one per column ('group' rows: one cell spanning the table)
  key: tuple[str, str, str] | None = None


@dataclasses.dataclass
class Layout:
  table: str
  caption: str
  columns: list[Column]
  rows: list[Row]
  footnotes: list[tuple[str | None, str]]  # (mark, text)


def _present(v) -> bool:
  """False for None / NaN / empty sequences."""
  if isinstance(v, (tuple, list)):
    return len(v) > 0
  return v is not None and not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v)


def format_count(n: int) -> str:
  """50000 -> '50K', 2500 -> '2.5K', 512 -> '512'."""
  return f"{n / 1000:g}K" if n >= 1000 else str(n)


def format_large(n: int) -> str:
  """1500000 -> '1.5M', 100000 -> '100K', 512 -> '512'."""
  return f"{n / 1e6:g}M" if n >= 1_000_000 else format_count(n)


def modification_text(modified: dict) -> str:
  """How a run changed its row's training, from job.json's ``modified`` ({setting: [the row's,
  the run's]}): 'batch 512 as 8 × 64 accumulated, 100K steps (row: 1.5M)'."""
  (row_b, b), (_, k), (row_s, s) = (modified.get(n, [None, None]) for n in
                                    ("batch_size", "grad_accum", "num_steps"))
  parts = []
  if b is not None and (b != row_b or (k or 1) > 1):
    parts.append(f"batch {b}" + (f" (row: {row_b})" if b != row_b else "")
                 + (f" as {k} × {b // k} accumulated" if (k or 1) > 1 else ""))
  if s is not None and s != row_s:
    parts.append(f"{format_large(s)} steps (row: {format_large(row_s)})")
  return ", ".join(parts) or "other settings"


def _metrics_for(table: str, rows: pd.DataFrame) -> list[tuple[str, str]]:
  """(key, header) of the metric columns: those the paper reports here or that we measured."""
  info = paper_lib.TABLES[table]
  candidates = [("fid_train", info.fid_train_header, "fid_train"),
                ("fid_eval", "FID eval", "fid_eval"),
                ("kid_train", "KID train (×1000)", "kid_train"),
                ("kid_eval", "KID eval (×1000)", "kid_eval"), ("is", "IS", "is_mean"),
                ("steps", "steps/s", "steps_per_sec_rel"),
                # Table 8: the guidance scale of our best FID@30K and the CLIP score there.
                ("guidance", "guidance (best FID)", "guidance"),
                ("clip", "CLIP score", "clip_score")]
  out = []
  for key, header, col in candidates:
    paper_has = col in rows and (rows[col] != "").any()
    if paper_has or rows["our_" + col].map(_present).any():
      out.append((key, header))
  return out


def _paper_cell(key: str, r) -> Cell:
  if key == "fid_train":
    return Cell(r.fid_train or None)
  if key == "fid_eval":
    return Cell(r.fid_eval or None)
  if key.startswith("kid") or key in ("guidance", "clip"):
    return Cell(None)  # the paper reports no KID, and Table 8 no guidance scale or CLIP score
  if key == "is":
    return Cell(r.is_mean or None, std=r.is_std or None)
  if r.steps_per_sec_rel:
    return Cell(f"{float(r.steps_per_sec_rel) * 100:.0f}", percent=True)
  return Cell(None)


def _our_cell(key: str, r) -> Cell:
  if key in ("fid_train", "fid_eval", "kid_train", "kid_eval"):
    v, std = getattr(r, "our_" + key), getattr(r, f"our_{key}_std")
    scale = 1000.0 if key.startswith("kid") else 1.0
    if not _present(v):
      return Cell(None)
    return Cell(f"{v * scale:.2f}", std=f"{std * scale:.2f}" if _present(std) else None)
  if key in ("guidance", "clip"):
    v = r.our_guidance if key == "guidance" else r.our_clip_score
    return Cell(None if not _present(v) else (f"{v:g}" if key == "guidance" else f"{v:.2f}"))
  if key == "is":
    if not _present(r.our_is_mean):
      return Cell(None)
    std = f"{r.our_is_std:.2f}" if _present(r.our_is_std) else None
    return Cell(f"{r.our_is_mean:.1f}", std=std)
  if not _present(r.our_steps_per_sec_rel):
    return Cell(None)
  return Cell(f"{r.our_steps_per_sec_rel * 100:.0f}", percent=True,
              mark=DDAGGER if r.device_mismatch else None)


def zero_shot_note(r) -> str | None:
  """Words beside a Table 8 number unless it is zero-shot on COCO as the paper's (a run's data
  as job.json records it: core.data.coco.data_record)."""
  if _present(r.trained_on_coco) and r.trained_on_coco:
    return "COCO-trained, not zero-shot"
  if not _present(r.zero_shot):
    return "zero-shot not recorded"
  if not r.zero_shot:
    return f"trained and evaluated on {r.train_origin or 'one data set'}, not zero-shot COCO"
  if _present(r.eval_origin) and not str(r.eval_origin).startswith("coco"):
    return f"zero-shot on {r.eval_origin}, not COCO"
  return None


def _extractor_text(r) -> str | None:
  """The extractor and, when recorded, its resize mode ('<extractor>, legacy_tensorflow')."""
  if not _present(r.extractor):
    return None
  resize = getattr(r, "resize_mode", None)
  return f"{r.extractor}, {resize}" if _present(resize) else str(r.extractor)


def build(table: str, measured: pd.DataFrame, *, workdir: str | None = None) -> Layout:
  """Lays out one table from :func:`tables.measured.measure`'s frame (paper order kept)."""
  info = paper_lib.TABLES[table]
  rows_df = measured[measured["table"] == table]
  metrics = _metrics_for(table, rows_df)
  columns = [Column("label", info.row_header, numeric=False)]
  for key, header in metrics:
    columns += [Column(f"{key}:paper", header, "paper"), Column(f"{key}:ours", header, "ours")]
  columns += [Column("step", "step"), Column("samples", "samples"),
              Column("extractor", "extractor", numeric=False),
              Column("scale", "scale", numeric=False)]

  rows: list[Row] = []
  snapshots: list[tuple[str | None, str]] = []
  group = None
  any_samples_mismatch = any_device_mismatch = any_literature = False
  changed: list[str] = []
  for r in rows_df.itertuples(index=False):
    if r.group != group:
      group = r.group
      rows.append(Row("group", [Cell(group, emphasis=True)]))
    literature = paper_lib.is_literature(r.note)
    any_literature |= literature
    mismatch = bool(r.samples_mismatch) if _present(r.samples_mismatch) else False
    any_samples_mismatch |= mismatch
    any_device_mismatch |= bool(r.device_mismatch) if _present(r.device_mismatch) else False
    cells = [Cell(r.row, mark=DAGGER if mismatch else None)]
    modified = r.modified if isinstance(r.modified, dict) else None
    if modified:
      changed.append(f"{r.row}: {modification_text(modified)}")
    for key, _ in metrics:
      ours = _our_cell(key, r)
      if table == "8" and key == "fid_train" and ours.text is not None:
        ours = dataclasses.replace(ours, note=zero_shot_note(r))
      if modified and key != "steps" and ours.text is not None:
        ours = dataclasses.replace(ours, mark=MODIFIED)
      cells += [_paper_cell(key, r), ours]
    if _present(r.run_steps):
      snapshots.append((None, f"{r.row}: the checkpoint at step {int(r.step):,} of the other rows' "
                              f"{int(r.run_steps):,}-step schedule, where its run stops (the "
                              f"paper reports this row at such a snapshot)."))
    samples = "/".join(format_count(n) for n in r.num_samples) if _present(r.num_samples) else None
    cells += [Cell(str(int(r.step)) if _present(r.step) else None),
              Cell(samples),
              Cell(_extractor_text(r)),
              Cell(r.scale if _present(r.scale) else None)]
    rows.append(Row("data", cells, key=(r.table, r.group, r.row)))

  source = f"results in {workdir}" if workdir else "no workdir given"
  notes: list[tuple[str | None, str]] = [(None, (
      f"Paper: the paper's values. Ours: {source}; each row shows the latest evaluated training "
      f"step; a dash means no value. The paper uses {format_count(info.paper_samples)} samples."))]
  if any(k == "steps" for k, _ in metrics):
    ref = rows_df[rows_df["steps_per_sec_rel_f"].sub(1.0).abs() < 1e-9]
    if len(ref):
      notes.append((None, f"steps/s is relative to the reference row '{ref['row'].iloc[0]}' "
                          "(100%)."))
  if any(k.startswith(("fid", "kid")) for k, _ in metrics) and (
      rows_df[[c for c in ("our_fid_train_std", "our_fid_eval_std", "our_kid_train_std",
                           "our_kid_eval_std") if c in rows_df]].map(_present).any().any()):
    notes.append((None, "Ours ± std: FID over bootstrap resamples of the samples; KID (unbiased, "
                        "×1000) over random subsets. Every FID's sample count is in the samples "
                        "column; the extractor column names the resize to 299."))
  notes += snapshots
  if any_literature:
    notes.append((None, "Rows from the literature show the paper's values only."))
  if any_samples_mismatch:
    notes.append((DAGGER, f"evaluated with a different number of samples than the paper's "
                          f"{format_count(info.paper_samples)} (or an unrecorded one); see the "
                          "samples column. FID is biased upward with fewer samples."))
  if any_device_mismatch:
    notes.append((DDAGGER, "throughput measured on a different device than the reference row."))
  if changed:
    notes.append((MODIFIED, "trained otherwise than the row (experiments.run batch_size=, "
                            "grad_accum=, steps=): " + "; ".join(changed) + "."))
  return Layout(table, info.caption, columns, rows, notes)
