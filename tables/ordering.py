"""``python -m tables.ordering``: did the paper's ordering of a table's rows hold in our runs?

  python -m tables.ordering table=2 workdir=runs/demo

For each group of the table with at least two measured rows, the rows are put in the paper's
order of FID train (lower is better, e.g. Table 2 at 128x128: shifted to 32 < shifted to 64 <
original) and one sentence says whether our FID train (and KID train) of the latest evaluation
(guidance 1) ranks them the same way, with each number's spread, and whether each neighbouring
difference is larger than twice its combined spread. A demo-scale run may well not reproduce
the paper's ordering; the sentence says so rather than hiding it. Table 2's below paper scale
also says why its verdict is no evidence either way (:func:`scale_caveat`): the paper's claim is
about resolutions above the 32-64 px the cosine schedule was designed for, and the demo's images
are 16x16.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import pandas as pd

from core import cli
from core.errors import UserError, run_main
from core.io import storage
from tables import paper, runs

METRICS = ("fid_train", "fid_eval", "kid_train", "kid_eval")


def latest_numbers(recorded: runs.Runs, run: str, step: int | None = None) -> dict[str, dict]:
  """{metric: {value, std, num_samples, step}} of ``run``'s latest evaluated step (or ``step``,
  a snapshot row's) at guidance 1 (the last line wins for repeated evaluations)."""
  res = recorded.results
  res = res[(res["run"] == run) & res["metric"].isin(METRICS)]
  if step is not None:
    res = res[pd.to_numeric(res["step"]) == step]
  res = res[pd.to_numeric(res["guidance"], errors="coerce").fillna(1.0) == 1.0]
  if res.empty:
    return {}
  step = pd.to_numeric(res["step"]).max()
  res = res[pd.to_numeric(res["step"]) == step].sort_values("line")
  out = {}
  for r in res.itertuples(index=False):
    std = None if r.std is None or pd.isna(r.std) else float(r.std)
    out[r.metric] = {"value": float(r.value), "std": std, "num_samples": int(r.num_samples),
                     "step": int(step)}
  return out


def format_number(m: dict) -> str:
  """'123.4 ± 2.1' for FID, KID shown x10^3 ('12.30 ± 0.40 x1e-3' style kept short)."""
  scale, digits = (1e3, 2) if m.get("kid") else (1.0, 1)
  s = f"{m['value'] * scale:.{digits}f}"
  if m.get("std") is not None:
    s += f" ± {m['std'] * scale:.{digits}f}"
  return s


def _served(recorded: runs.Runs, table: str) -> pd.DataFrame:
  """(group, row, run, paper FID train) of the table's measured rows, in the paper's order."""
  p = paper.load_paper()
  p = p[p["table"] == table][["group", "row", "fid_train_f", "order"]]
  s = recorded.serves[recorded.serves["table"] == table][["run", "group", "row", "eval_step"]]
  return s.merge(p, on=["group", "row"]).sort_values("order")


def _verdict(rows: list[tuple[str, dict]]) -> tuple[bool, bool]:
  """(same ranking as the given order, every neighbouring step larger than 2 combined stds)."""
  vals = [m["value"] for _, m in rows]
  held = all(a < b for a, b in zip(vals, vals[1:]))
  resolved = True
  for (_, a), (_, b) in zip(rows, rows[1:]):
    spread = math.hypot(a.get("std") or 0.0, b.get("std") or 0.0)
    resolved &= abs(b["value"] - a["value"]) > 2.0 * spread
  return held, resolved


def sentences(recorded: runs.Runs, table: str) -> list[str]:
  """One sentence per group of ``table`` with >= 2 measured rows (see the module docstring)."""
  out = []
  served = _served(recorded, table)
  for group, g in served.groupby("group", sort=False):
    g = g.dropna(subset=["fid_train_f"]).sort_values("fid_train_f", kind="stable")
    measured = []
    for r in g.itertuples(index=False):
      nums = latest_numbers(recorded, r.run, None if pd.isna(r.eval_step) else int(r.eval_step))
      if "fid_train" in nums:
        measured.append((r.row, nums))
    if len(measured) < 2:
      continue
    n = min(nums["fid_train"]["num_samples"] for _, nums in measured)
    order = " < ".join(row for row, _ in measured)
    fid = [(row, nums["fid_train"]) for row, nums in measured]
    held, resolved = _verdict(fid)
    ours = " < ".join(f"{format_number(m)}" for _, m in fid) if held else ", ".join(
        f"{row}: {format_number(m)}" for row, m in fid)
    text = (f"{paper.source(table)}, {group}: the paper's FID train ordering ({order}) "
            f"{'held' if held else 'did NOT hold'} at this scale (ours, n={n}: {ours}); ")
    text += ("each neighbouring difference is larger than twice its bootstrap spread" if resolved
             else "not every neighbouring difference is larger than twice its bootstrap spread")
    kids = [(row, dict(nums["kid_train"], kid=True)) for row,
            nums in measured if "kid_train" in nums]
    if len(kids) == len(measured):
      k_held, _ = _verdict(kids)
      text += f"; by KID train it {'held' if k_held else 'did not hold'}"
    ran = recorded.runs[recorded.runs["run"].isin(g["run"])]
    caveat = scale_caveat(table, set(ran["scale"].dropna()), set(ran["image_size"].dropna()))
    out.append(text + "." + (f" {caveat}" if caveat else ""))
  return out


def scale_caveat(table: str, scales_seen: set[str], sizes: set[str]) -> str | None:
  """Why Table 2's verdict below paper scale is no evidence for or against the paper (None at
  paper scale): the claim is about images larger than the cosine schedule was designed for."""
  if table != "2" or scales_seen == {"paper"}:
    return None
  size = ""
  if len(sizes) == 1 and next(iter(sizes)).isdigit():
    side = next(iter(sizes))
    size = f" ({side}x{side} pixels, noise_d scaled alike so each shift keeps its ratio)"
  return (f"This is no evidence for or against the paper: its claim is that the cosine schedule, "
          f"designed for 32x32 to 64x64 images, adds too little noise at higher resolutions, and "
          f"these runs are below paper scale{size}, where by the paper's own rule (shift by "
          f"2 log(64/d)) a smaller image wants less noise, not more.")


OPTIONS = [
    cli.Option("table", "2", "the paper table whose row ordering to check.",
               choices=list(paper.TABLES)),
    cli.Option("workdir", None, "directory holding the run directories (as for tables.render)."),
]


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="tables.ordering", description=__doc__)
  if bindings:
    raise UserError(f"tables.ordering takes no gin bindings; got {' '.join(bindings)}")
  workdir = opts["workdir"]
  if not workdir or not storage.isdir(workdir):
    raise UserError(f"workdir={workdir} is not a directory; pass the directory holding the run "
                    "directories (e.g. workdir=runs/demo)")
  found = sentences(runs.load(workdir), opts["table"])
  if not found:
    print(f"{paper.source(opts['table'])}: fewer than two evaluated rows in a group under "
          f"{workdir}; nothing to compare", file=sys.stderr)
  for s in found:
    print(s)
  return 0


if __name__ == "__main__":
  run_main(main)
