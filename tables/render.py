"""``python -m tables.render``: the paper's tables with our measured numbers beside the paper's.

  python -m tables.render table=all format=both workdir=runs/demo out=out/tables

Writes markdown and/or LaTeX per table (``out=-`` prints them). Each row shows the paper's value
beside ours with the step, sample count, extractor and scale ours come from (tables/measured.py);
a dash is a missing number, a dagger another sample count than the paper's.
"""
from __future__ import annotations

import sys
from typing import Sequence

from core import cli
from core.errors import UserError, run_main
from core.io import storage
from tables import figures, latex, layout, markdown, measured, paper, runs

OPTIONS = [
    cli.Option("table", "all",
               "which table: a table of the paper (Tables 2-9, '1024' = appendix C) or all.",
               choices=["all", *paper.TABLES]),
    cli.Option("format", "both",
               "output format: GitHub markdown (pipe tables), LaTeX (booktabs) or both.",
               choices=["markdown", "latex", "both"]),
    cli.Option("workdir", None, "directory holding the run directories (<workdir>/<run>/job.json, "
               "eval/results.jsonl) and throughput.jsonl; unset: paper values only."),
    cli.Option("out", "out/tables", "output directory (created); '-' prints to stdout instead."),
    cli.Option("standalone", False,
               "LaTeX: wrap into a \\documentclass{article} document with booktabs "
               "that compiles on its own.", parse=cli.parse_bool),
    cli.Option("figures", False, "also draw the figures (tables.figures) into <out>/figures.",
               parse=cli.parse_bool),
]


def select_tables(table: str) -> list[str]:
  if table == "all":
    return list(paper.TABLES)
  if table not in paper.TABLES:
    raise UserError(f"unknown table {table!r}; valid tables: {', '.join(paper.TABLES)} or all")
  return [table]


def warn_unknown_rows(r: runs.Runs, paper_df) -> list[str]:
  """Rows listed in job.json files that are not rows of the paper (likely typos)."""
  known = set(zip(paper_df["table"], paper_df["group"], paper_df["row"]))
  msgs = []
  for s in r.serves.itertuples(index=False):
    if (s.table, s.group, s.row) not in known:
      msgs.append(f"warning: run {s.run} serves ({s.table!r}, {s.group!r}, {s.row!r}), "
                  "which is not a row of experiments/paper_tables.csv; it is not shown")
  return msgs


def layouts(tables: Sequence[str], workdir: str | None) -> list[layout.Layout]:
  """Reads the paper and the workdir's results and lays out the chosen tables."""
  paper_df = paper.load_paper()
  recorded = runs.load(workdir)
  for msg in warn_unknown_rows(recorded, paper_df):
    print(msg, file=sys.stderr)
  frame = measured.measure(recorded, paper_df)
  return [layout.build(t, frame, workdir=workdir) for t in tables]


def render(tables: Sequence[str], workdir: str | None, fmt: str = "both",
           standalone: bool = False) -> dict[str, str]:
  """{file name: text} of the rendered tables."""
  outs: dict[str, str] = {}
  lays = layouts(tables, workdir)
  if fmt in ("markdown", "both"):
    for lay in lays:
      outs[f"table_{lay.table}.md"] = markdown.render(lay)
    if len(lays) > 1:
      outs["tables.md"] = "\n".join(markdown.render(lay) for lay in lays)
  if fmt in ("latex", "both"):
    for lay in lays:
      outs[f"table_{lay.table}.tex"] = latex.render(lay, standalone=standalone)
    if len(lays) > 1:
      body = "\n".join(latex.render(lay) for lay in lays)
      outs["tables.tex"] = latex.wrap(body) if standalone else body
  return outs


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="tables.render", description=__doc__)
  if bindings:
    raise UserError(f"tables.render takes no gin bindings; got {' '.join(bindings)}")
  tables = select_tables(opts["table"])
  workdir = opts["workdir"]
  if workdir and not storage.isdir(workdir):
    raise UserError(f"workdir={workdir} is not a directory; pass the directory holding the run "
                    "directories, or leave workdir unset for the paper's values only")
  outs = render(tables, workdir, opts["format"], opts["standalone"])
  if opts["out"] == "-":
    combined = [v for k, v in outs.items() if k.startswith("tables.")]
    for text in combined or outs.values():
      print(text)
    return 0
  try:
    storage.makedirs(opts["out"])
    for name, text in outs.items():  # each file atomically: old or new, never half-written
      path = storage.join(opts["out"], name)
      storage.write_text(path, text)
      print(path)
    if opts["figures"]:
      for path in figures.draw_all(workdir, storage.join(opts["out"], "figures"), tables):
        print(path)
  except OSError as e:  # read-only or full disk, a file where the directory should be
    where = f": {e.filename}" if isinstance(e.filename, str) else ""
    raise UserError(f"cannot write the tables to out={opts['out']} ({e.strerror or e}{where}); "
                    f"choose a writable out= or print them with out=-") from None
  return 0


if __name__ == "__main__":
  run_main(main)
