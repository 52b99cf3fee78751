"""Reads the recorded results of every run directory under a workdir into pandas frames.

Layout (see the team conventions): ``<workdir>/<run>/job.json`` names the (table, group, row)
entries a run serves, ``<workdir>/<run>/eval/results.jsonl`` holds one evaluation result per line,
``<workdir>/<run>/metrics.jsonl`` the training log and ``<workdir>/throughput.jsonl`` the
throughput measurements. A directory without job.json is not a run and is skipped. All file
access goes through :mod:`tables.files`.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import pandas as pd

from core.errors import UserError
from tables import files

RESULT_COLUMNS = ("step", "metric", "value", "std", "num_samples", "extractor", "resize_mode",
                  "reference", "guidance", "seed", "sampler_steps", "time")
THROUGHPUT_COLUMNS = ("table", "group", "row", "steps_per_sec", "img_per_sec", "device",
                      "batch_size", "time")


@dataclasses.dataclass
class Runs:
  """What a workdir holds: the runs, the rows each serves and their evaluation results."""
  workdir: str | None
  runs: pd.DataFrame     # run, path, scale
  serves: pd.DataFrame   # run, table, group, row
  results: pd.DataFrame  # run, line, RESULT_COLUMNS
  throughput: pd.DataFrame  # line, THROUGHPUT_COLUMNS


def read_jsonl(path: str) -> pd.DataFrame:
  """One row per JSON line, with a ``line`` column (file order). An unfinished last line (a
  writer still appending) is skipped; a broken line elsewhere is a UserError."""
  if not files.exists(path):
    return pd.DataFrame({"line": pd.Series([], dtype=int)})
  lines = files.read_bytes(path).splitlines()
  records = []
  for i, raw in enumerate(lines):
    if not raw.strip():
      continue
    try:
      rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      if i == len(lines) - 1:
        print(f"warning: skipping unfinished last line of {path}", file=sys.stderr)
        continue
      what = (f"not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r})"
              if isinstance(e, UnicodeDecodeError) else f"not JSON ({e.msg})")
      raise UserError(f"{path} line {i + 1} is {what}; fix or remove that line") from None
    if not isinstance(rec, dict):
      raise UserError(f"{path} line {i + 1} is not a JSON object; fix or remove that line")
    rec["line"] = i
    records.append(rec)
  if not records:
    return pd.DataFrame({"line": pd.Series([], dtype=int)})
  return pd.DataFrame.from_records(records)


def _with_columns(df: pd.DataFrame, columns) -> pd.DataFrame:
  for c in columns:
    if c not in df.columns:
      df[c] = None
  return df


def _read_job(path: str) -> dict:
  try:
    job = json.loads(files.read_bytes(path).decode("utf-8"))
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {e.start}); rewrite it or remove the run"
                    ) from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg}); rewrite it or remove the run") from None
  if not isinstance(job, dict) or not isinstance(job.get("rows", []), list):
    raise UserError(f"{path} must be an object with a 'rows' list of {{table, group, row}}")
  for r in job.get("rows", []):
    if not isinstance(r, dict) or not {"table", "group", "row"} <= set(r):
      raise UserError(f"{path}: every entry of 'rows' needs table, group and row; got {r!r}")
  return job


def run_dirs(workdir: str) -> list[str]:
  """Paths of the run directories: the workdir's subdirectories holding job.json (and the
  workdir itself if it is a run)."""
  candidates = [workdir] + [files.join(workdir, n) for n in files.listdir(workdir)]
  return [p for p in candidates if files.exists(files.join(p, "job.json"))]


def load(workdir: str | None) -> Runs:
  """Reads every run under ``workdir``; ``None`` gives empty frames (paper values only)."""
  runs, serves, results = [], [], []
  if workdir is not None:
    for path in run_dirs(workdir):
      job = _read_job(files.join(path, "job.json"))
      name = str(job.get("run_name") or path.rstrip("/").rsplit("/", 1)[-1])
      runs.append({"run": name, "path": path, "scale": job.get("scale")})
      for r in job.get("rows", []):
        serves.append({"run": name, "table": str(r["table"]), "group": str(r["group"]),
                       "row": str(r["row"])})
      res = read_jsonl(files.join(path, "eval", "results.jsonl"))
      if len(res):
        res.insert(0, "run", name)
        results.append(res)
  results_df = (pd.concat(results, ignore_index=True) if results
                else pd.DataFrame({"run": [], "line": []}))
  results_df = _with_columns(results_df, RESULT_COLUMNS)
  throughput = (read_jsonl(files.join(workdir, "throughput.jsonl")) if workdir
                else pd.DataFrame({"line": []}))
  throughput = _with_columns(throughput, THROUGHPUT_COLUMNS)
  throughput["table"] = throughput["table"].map(lambda t: None if t is None else str(t))
  return Runs(
      workdir=workdir,
      runs=_with_columns(pd.DataFrame.from_records(runs), ("run", "path", "scale")),
      serves=_with_columns(pd.DataFrame.from_records(serves), ("run", "table", "group", "row")),
      results=results_df,
      throughput=throughput,
  )


def load_metrics(run_path: str) -> pd.DataFrame:
  """The training log ``metrics.jsonl`` of one run (step, loss, ...), in file order."""
  return _with_columns(read_jsonl(files.join(run_path, "metrics.jsonl")), ("step", "loss"))
