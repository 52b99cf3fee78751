"""Chooses, for every row of the paper's tables, the measured numbers it shows.

A row's numbers come from the runs whose job.json lists it: at the latest evaluated step (the run
reaching it first; a row recorded with an ``eval_step``, Table 3's "no dropout" at 700K of 1.5M,
at that step only), guidance 1.0 (Table 9: the row's), the last line per metric winning, with
their std, sample counts and resize mode. Runs that changed the row's training (job.json's
``modified``) serve it only where no unchanged run has results, and say so. Table 8's FID@30K is
``fid_eval`` (appendix C), the best over Figure 8's guidance scales, with that scale and its CLIP
score. Steps/s is relative to the table's reference row. Pinned by tests/test_tables.py.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tables import paper as paper_lib
from tables import runs as runs_lib
from tables.runs import Runs

METRICS = ("fid_train", "fid_eval", "kid_train", "kid_eval", "is")
MEASURED_COLUMNS = ("run", "scale", "step", "our_fid_train", "our_fid_train_std", "our_fid_eval",
                    "our_fid_eval_std", "our_kid_train", "our_kid_train_std", "our_kid_eval",
                    "our_kid_eval_std", "our_is_mean", "our_is_std", "num_samples",
                    "samples_mismatch", "extractor", "resize_mode",
                    "our_steps_per_sec", "our_steps_per_sec_rel", "device", "device_mismatch",
                    "our_guidance", "our_clip_score", "run_steps",
                    "modified") + runs_lib.DATA_COLUMNS


def time_seconds(t) -> float:
  """A result's ``time`` as seconds since the epoch (number or ISO string); NaN if absent."""
  if t is None or (isinstance(t, float) and math.isnan(t)):
    return float("nan")
  if isinstance(t, (int, float, np.integer, np.floating)):
    return float(t)
  try:
    return pd.Timestamp(str(t)).timestamp()
  except (ValueError, TypeError):
    return float("nan")


def _latest_by_time(df: pd.DataFrame) -> pd.DataFrame:
  """Sorts oldest first: by time (missing times first), then by file order."""
  key = df["time"].map(time_seconds).fillna(-np.inf)
  return df.assign(_t=key).sort_values(["_t", "line"], kind="stable")


def _guidance_matches(g: pd.Series, target: float) -> pd.Series:
  g = pd.to_numeric(g, errors="coerce").fillna(1.0)
  return (g - target).abs() < 1e-6


def _row_results(runs: Runs, table: str, group: str, row: str) -> pd.DataFrame:
  serving = runs.serves[(runs.serves["table"] == table) & (runs.serves["group"] == group)
                        & (runs.serves["row"] == row)]
  res = runs.results[runs.results["run"].isin(serving["run"].unique())
                     & runs.results["metric"].isin(METRICS)]
  for r in serving.dropna(subset=["eval_step"]).itertuples(index=False):  # a snapshot row
    res = res[(res["run"] != r.run) | (pd.to_numeric(res["step"]) == int(r.eval_step))]
  if table != "8":  # Table 8: every guidance scale (its best FID is shown)
    res = res[_guidance_matches(res["guidance"], paper_lib.guidance_of(table, row))]
  res = res.dropna(subset=["step", "value"])
  unchanged = res[~res["run"].map(lambda r: bool(_modified(runs, r)))]
  return unchanged if len(unchanged) else res


def _modified(runs: Runs, run: str) -> dict | None:
  """job.json's ``modified`` of ``run``: None for a run with the row's own training."""
  m = runs.runs.loc[runs.runs["run"] == run, "modified"]
  return None if m.empty or not isinstance(m.iloc[0], dict) else m.iloc[0]


def _pick(res: pd.DataFrame) -> pd.DataFrame:
  """The chosen run's latest step, last line per metric."""
  res = _pick_step(res)
  return res.sort_values("line", kind="stable").groupby("metric").tail(1).set_index("metric")


def _measure_row(runs: Runs, table: str, group: str, row: str) -> dict:
  out = dict.fromkeys(MEASURED_COLUMNS)
  res = _row_results(runs, table, group, row)
  if table == "8":  # single FID@30K column
    res = res[~res["metric"].isin(("is", "kid_train", "kid_eval"))]
  if res.empty:
    return out
  best = None
  if table == "8":
    res, best = _best_guidance(runs, res)
  chosen = _pick(res)
  info = paper_lib.TABLES[table]
  used = []
  for metric in info.fid_train_metrics:
    if metric in chosen.index:
      out["our_fid_train"] = float(chosen.loc[metric, "value"])
      out["our_fid_train_std"] = _std(chosen, metric)
      used.append(metric)
      break
  if table != "8":
    for metric in ("fid_eval", "kid_train", "kid_eval"):
      if metric in chosen.index:
        out[f"our_{metric}"] = float(chosen.loc[metric, "value"])
        out[f"our_{metric}_std"] = _std(chosen, metric)
        used.append(metric)
    if "is" in chosen.index:
      out["our_is_mean"] = float(chosen.loc["is", "value"])
      std = pd.to_numeric(pd.Series([chosen.loc["is", "std"]]), errors="coerce").iloc[0]
      out["our_is_std"] = None if pd.isna(std) else float(std)
      used.append("is")
  if not used:
    return out
  used_rows = chosen.loc[used]
  counts = pd.to_numeric(used_rows["num_samples"], errors="coerce")
  out["num_samples"] = tuple(sorted({int(c) for c in counts.dropna()}))
  out["samples_mismatch"] = bool(counts.isna().any() or (counts != info.paper_samples).any())
  extractors = [str(e) for e in used_rows["extractor"].dropna().unique()]
  out["extractor"] = "; ".join(sorted(extractors)) or None
  if "resize_mode" in used_rows:
    modes = [str(m) for m in used_rows["resize_mode"].dropna().unique()]
    out["resize_mode"] = "; ".join(sorted(modes)) or None
  run = str(used_rows["run"].iloc[0])
  out["run"] = run
  scale = runs.runs.loc[runs.runs["run"] == run, "scale"]
  out["scale"] = None if scale.empty or pd.isna(scale.iloc[0]) else str(scale.iloc[0])
  out["step"] = int(chosen["step"].iloc[0])
  ran = runs.runs[runs.runs["run"] == run]
  for c in runs_lib.DATA_COLUMNS:
    out[c] = None if ran.empty or pd.isna(ran[c].iloc[0]) else ran[c].iloc[0]
  snap = runs.serves[(runs.serves["run"] == run) & (runs.serves["table"] == table)
                     & (runs.serves["group"] == group) & (runs.serves["row"] == row)]
  snap = snap.dropna(subset=["eval_step", "num_steps"])
  out["run_steps"] = int(snap["num_steps"].iloc[0]) if len(snap) else None
  out["modified"] = _modified(runs, run)
  if best is not None:
    out["our_guidance"], out["our_clip_score"] = best
  return out


def guidance_values(g: pd.Series) -> pd.Series:
  return pd.to_numeric(g, errors="coerce").fillna(1.0)


def _best_guidance(runs: Runs, res: pd.DataFrame) -> tuple[pd.DataFrame, tuple]:
  """Table 8: the results at the guidance scale with the lowest FID@30K (``fid_eval``, else
  ``fid_train``) of the chosen run's latest step, and (that scale, its CLIP score or None)."""
  step_rows = _pick_step(res)
  fid = next((m for m in ("fid_eval", "fid_train") if (step_rows["metric"] == m).any()), None)
  if fid is None:
    return res, None
  f = step_rows[step_rows["metric"] == fid].sort_values("line", kind="stable")
  f = f.assign(_g=guidance_values(f["guidance"])).groupby("_g").tail(1)
  w = float(f.loc[pd.to_numeric(f["value"]).idxmin(), "_g"])
  at_w = step_rows[(guidance_values(step_rows["guidance"]) - w).abs() < 1e-6]
  clip = runs.results[(runs.results["run"] == step_rows["run"].iloc[0])
                      & (runs.results["metric"] == "clip_score")
                      & (runs.results["step"] == step_rows["step"].iloc[0])]
  clip = clip[(guidance_values(clip["guidance"]) - w).abs() < 1e-6].sort_values("line")
  return at_w, (w, float(clip["value"].iloc[-1]) if len(clip) else None)


def _pick_step(res: pd.DataFrame) -> pd.DataFrame:
  """Every result of the chosen run's latest step (the run rule of :func:`_pick`)."""
  run_order = {r: i for i, r in enumerate(dict.fromkeys(res["run"]))}
  per_run = res.assign(_t=res["time"].map(time_seconds).fillna(-np.inf)).groupby("run").agg(
      step=("step", "max"), t=("_t", "max"))
  per_run["order"] = [run_order[r] for r in per_run.index]
  best = per_run.sort_values(["step", "t", "order"]).index[-1]
  res = res[res["run"] == best]
  return res[res["step"] == res["step"].max()]


def _std(chosen: pd.DataFrame, metric: str) -> float | None:
  if "std" not in chosen:
    return None
  std = pd.to_numeric(pd.Series([chosen.loc[metric, "std"]]), errors="coerce").iloc[0]
  return None if pd.isna(std) else float(std)


def _latest_throughput(runs: Runs) -> dict[tuple[str, str, str], pd.Series]:
  tp = runs.throughput.dropna(subset=["table", "group", "row", "steps_per_sec"])
  if tp.empty:
    return {}
  tp = _latest_by_time(tp).groupby(["table", "group", "row"]).tail(1)
  return {(str(r.table), str(r.group), str(r.row)): r for r in tp.itertuples(index=False)}


def _reference_row(paper: pd.DataFrame, table: str, group: str) -> tuple[str, str, str] | None:
  refs = paper[(paper["table"] == table) & np.isclose(paper["steps_per_sec_rel_f"].fillna(0), 1.0)]
  same_group = refs[refs["group"] == group]
  refs = same_group if len(same_group) else refs
  if refs.empty:
    return None
  r = refs.iloc[0]
  return (r["table"], r["group"], r["row"])


def measure(runs: Runs, paper: pd.DataFrame) -> pd.DataFrame:
  """The paper's frame extended with our measured columns (``MEASURED_COLUMNS``, ours prefixed
  ``our_``), in the paper's order."""
  throughput = _latest_throughput(runs)
  records = []
  for p in paper.itertuples(index=False):
    m = (dict.fromkeys(MEASURED_COLUMNS) if paper_lib.is_literature(p.note)
         else _measure_row(runs, p.table, p.group, p.row))
    ref = _reference_row(paper, p.table, p.group)
    tp = throughput.get((p.table, p.group, p.row))
    if ref is not None and tp is not None:
      m["our_steps_per_sec"] = float(tp.steps_per_sec)
      m["device"] = None if pd.isna(tp.device) else str(tp.device)
      ref_tp = throughput.get(ref)
      if ref_tp is not None and float(ref_tp.steps_per_sec) > 0:
        m["our_steps_per_sec_rel"] = float(tp.steps_per_sec) / float(ref_tp.steps_per_sec)
        m["device_mismatch"] = str(tp.device) != str(ref_tp.device)
    records.append(m)
  measured = pd.DataFrame.from_records(records, columns=list(MEASURED_COLUMNS))
  return pd.concat([paper.reset_index(drop=True), measured], axis=1)
