"""Reads the recorded results of every run directory under a workdir into pandas frames.

Layout (see the team conventions): ``<workdir>/<run>/job.json`` names the (table, group, row)
entries a run serves (a row evaluated at a snapshot also its ``eval_step`` of ``num_steps``) and
where its data come from (``data``: split origins, trained on COCO, zero-shot), ``<workdir>/<run>/eval/results.jsonl`` holds one evaluation result per line,
``<workdir>/<run>/metrics.jsonl`` the training log and ``<workdir>/throughput.jsonl`` the
throughput measurements. A directory without job.json is not a run and is skipped. A job.json's
``modified`` ({setting: [the row's value, the run's]}) says that the run changed the row's
training (experiments.run batch_size=, grad_accum=, steps=).
"""
from __future__ import annotations

import dataclasses
import json

import pandas as pd

from core.errors import UserError
from core.io import jsonl, rundir, storage


RESULT_COLUMNS = ("step", "metric", "value", "std", "num_samples", "extractor", "resize_mode",
                  "reference", "guidance", "seed", "sampler_steps", "time")
# From job.json's "data" (core.data.coco.data_record); None where not recorded.
DATA_COLUMNS = ("trained_on_coco", "zero_shot", "train_origin", "eval_origin")
SERVE_COLUMNS = ("run", "table", "group", "row", "eval_step", "num_steps")
THROUGHPUT_COLUMNS = ("table", "group", "row", "steps_per_sec", "img_per_sec", "device",
                      "batch_size", "time")


@dataclasses.dataclass
class Runs:
  """What a workdir holds: the runs, the rows each serves and their evaluation results."""
  workdir: str | None
  runs: pd.DataFrame     # run, path, scale, image_size (as trained, e.g. '16'), modified
                         # (job.json's, None if none), DATA_COLUMNS
  serves: pd.DataFrame   # run, table, group, row, eval_step, num_steps
  results: pd.DataFrame  # run, line, RESULT_COLUMNS
  throughput: pd.DataFrame  # line, THROUGHPUT_COLUMNS


def read_jsonl(path: str) -> pd.DataFrame:
  """One row per complete JSON line, with a ``line`` column (file order); see core.io.jsonl."""
  rows = [dict(r, line=i) for i, r in enumerate(jsonl.read(path))]
  return pd.DataFrame.from_records(rows) if rows else pd.DataFrame({"line": pd.Series([],
                                                                                      dtype=int)})


def _with_columns(df: pd.DataFrame, columns) -> pd.DataFrame:
  for c in columns:
    if c not in df.columns:
      df[c] = None
  return df


def _read_job(path: str) -> dict:
  try:
    job = json.loads(storage.read_bytes(path).decode("utf-8"))
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
  modified = job.get("modified") or {}
  if not isinstance(modified, dict) or not all(
      isinstance(v, list) and len(v) == 2 for v in modified.values()):
    raise UserError(f"{path}: 'modified' must map each changed setting to [the row's value, the "
                    f"run's]; got {modified!r}")
  return job


def run_dirs(workdir: str) -> list[str]:
  """Paths of the run directories: the workdir's subdirectories holding job.json (and the
  workdir itself if it is a run)."""
  candidates = [workdir] + [storage.join(workdir, n) for n in storage.listdir(workdir,
                                                                              missing_ok=True)]
  return [p for p in candidates if storage.exists(rundir.job_path(p))]


def load(workdir: str | None) -> Runs:
  """Reads every run under ``workdir``; ``None`` gives empty frames (paper values only)."""
  runs, serves, results = [], [], []
  if workdir is not None:
    for path in run_dirs(workdir):
      job = _read_job(rundir.job_path(path))
      name = str(job.get("run_name") or path.rstrip("/").rsplit("/", 1)[-1])
      data = job.get("data") if isinstance(job.get("data"), dict) else {}
      origins = data.get("split_origins") or {}
      size = next((a.split("=", 1)[1] for a in job.get("train_args") or []
                   if str(a).startswith("Train.image_size=")), None)
      runs.append({"run": name, "path": path, "scale": job.get("scale"), "image_size": size,
                   "modified": job.get("modified") or None,
                   "trained_on_coco": data.get("trained_on_coco"),
                   "zero_shot": data.get("zero_shot"), "train_origin": origins.get("train"),
                   "eval_origin": origins.get("eval")})
      for r in job.get("rows", []):
        serves.append({"run": name, "table": str(r["table"]), "group": str(r["group"]),
                       "row": str(r["row"]), "eval_step": r.get("eval_step"),
                       "num_steps": r.get("num_steps")})
      res = read_jsonl(rundir.results_path(path))
      if len(res):
        res.insert(0, "run", name)
        results.append(res)
  results_df = (pd.concat(results, ignore_index=True) if results
                else pd.DataFrame({"run": [], "line": []}))
  results_df = _with_columns(results_df, RESULT_COLUMNS)
  throughput = (read_jsonl(rundir.throughput_path(workdir)) if workdir
                else pd.DataFrame({"line": []}))
  throughput = _with_columns(throughput, THROUGHPUT_COLUMNS)
  throughput["table"] = throughput["table"].map(lambda t: None if t is None else str(t))
  return Runs(
      workdir=workdir,
      runs=_with_columns(pd.DataFrame.from_records(runs),
                         ("run", "path", "scale", "image_size", "modified") + DATA_COLUMNS),
      serves=_with_columns(pd.DataFrame.from_records(serves), SERVE_COLUMNS),
      results=results_df,
      throughput=throughput,
  )


def load_metrics(run_path: str) -> pd.DataFrame:
  """The training log ``metrics.jsonl`` of one run (step, loss, ...), in file order."""
  return _with_columns(read_jsonl(rundir.metrics_path(run_path)), ("step", "loss"))
