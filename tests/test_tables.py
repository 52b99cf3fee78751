"""tables.render: the paper's tables with our results, from synthetic run directories (no mocks).

Pins the choices documented in tables/measured.py and tables/layout.py: latest step per row, last
line wins for re-evaluations, guidance 1.0 except Table 9, dashes for missing numbers, a dagger for
sample counts other than the paper's, throughput relative to the latest reference entry.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import pytest

from core.io import storage
from core.errors import UserError, run_main
from experiments import jobs, registry
from tables import layout, markdown, measured, ordering, paper, render, runs
from tests.fault_helpers import assert_one_error_line, read_only, run_cli, snapshot

PAPER = paper.load_paper()
EXTRACTOR = "clean-fid inception_v3 (torchscript)"


# ------------------------------------------------------------------------------------------------
# Synthetic run directories in the documented layout.


def result(step, metric, value, *, num_samples=50_000, std=None, guidance=1.0, time=None):
  return {"step": step, "metric": metric, "value": value, "std": std, "num_samples": num_samples,
          "extractor": EXTRACTOR, "reference": "imagenet_train" if metric == "fid_train" else
          "imagenet_val", "guidance": guidance, "seed": 0, "sampler_steps": 256,
          "time": time if time is not None else 1.7e9 + step}


def write_run(workdir, name, rows, results, *, scale="demo", metrics=None, **job_fields):
  """<workdir>/<name>/{job.json, eval/results.jsonl, metrics.jsonl}; rows: (table, group, row)
  or (table, group, row, {more fields of the row}); job_fields: more fields of job.json."""
  d = os.path.join(workdir, name)
  os.makedirs(os.path.join(d, "eval"), exist_ok=True)
  job = {"run_name": name, "scale": scale, "gin_files": ["gin/demo.gin"], "bindings": [],
         "rows": [dict({"table": r[0], "group": r[1], "row": r[2]}, **(r[3] if len(r) > 3 else {}))
                  for r in rows], **job_fields}
  with open(os.path.join(d, "job.json"), "w") as f:
    json.dump(job, f)
  with open(os.path.join(d, "eval", "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in results)
  if metrics is not None:
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in metrics)
  return d


def write_throughput(workdir, entries):
  with open(os.path.join(workdir, "throughput.jsonl"), "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in entries)


SHIFT32 = ("2", "128x128", "cosine (shifted to 32)")
ORIGINAL = ("2", "128x128", "cosine (original at 128)")
UNET128 = ("7", "128x128", "simple diffusion (U-Net)")


def table2_workdir(workdir):
  """Run A serves Table 2 'shifted to 32' and Table 7's U-Net 128 (the same model), with two steps,
  a re-evaluation at the latest step, fewer samples at that step and a guided result. Run B serves
  'original at 128' with only FID train. A literature row in a job.json must stay unmeasured."""
  write_run(workdir, "unet128_shift32", [SHIFT32, UNET128, ("7", "128x128", "ADM")], [
      result(1000, "fid_train", 9.0), result(1000, "fid_eval", 10.0),
      result(1000, "is", 40.0, std=1.0),
      result(2000, "fid_train", 5.5, num_samples=10_000),
      result(2000, "fid_eval", 6.5, num_samples=10_000),
      result(2000, "is", 50.0, std=1.5, num_samples=10_000),
      result(2000, "fid_train", 5.25, num_samples=10_000),  # re-evaluation: the last line wins
      result(3000, "fid_train", 1.0, guidance=1.5),          # guided: not a Table 2 number
  ])
  write_run(workdir, "unet128_cosine", [ORIGINAL], [result(500, "fid_train", 7.0)], scale="small")
  return workdir


def data_rows(lay: layout.Layout) -> dict[tuple[str, str, str], dict[str, layout.Cell]]:
  return {r.key: {c.key: cell for c, cell in zip(lay.columns, r.cells)}
          for r in lay.rows if r.kind == "data"}


def build(workdir, table):
  frame = measured.measure(runs.load(workdir), PAPER)
  return layout.build(table, frame, workdir=workdir)


# ------------------------------------------------------------------------------------------------
# Reading back the LaTeX: tabular structure and the paper's values.


def _strip_rules(body: str) -> str:
  body = re.sub(r"\\(toprule|midrule|bottomrule)", "", body)
  return re.sub(r"\\cmidrule(\([lr]*\))?\{\d+-\d+\}", "", body)


def split_cells(row: str) -> list[str]:
  return [c.strip() for c in re.split(r"(?<!\\)&", row)]


def span(cell: str) -> int:
  m = re.match(r"\\multicolumn\{(\d+)\}", cell)
  return int(m.group(1)) if m else 1


def parse_tabulars(tex: str) -> list[tuple[str, list[list[str]]]]:
  """[(column spec, rows of cells)] of every tabular; asserts balanced braces and that each row
  fills exactly the columns of the spec (multicolumn spans counted)."""
  unescaped = re.sub(r"\\[{}]", "", tex)
  depth = 0
  for ch in unescaped:
    depth += {"{": 1, "}": -1}.get(ch, 0)
    assert depth >= 0, "a closing brace without an opening one"
  assert depth == 0, "unbalanced braces"
  out = []
  for spec, body in re.findall(r"\\begin\{tabular\}\{([lrc|]+)\}(.*?)\\end\{tabular\}", tex, re.S):
    ncols = len(spec.replace("|", ""))
    rows = []
    for raw in re.split(r"\\\\", _strip_rules(body)):
      if not raw.strip():
        continue
      cells = split_cells(raw)
      assert sum(span(c) for c in cells) == ncols, (raw, ncols)
      rows.append(cells)
    out.append((spec, rows))
  assert out, "no tabular found"
  return out


def latex_paper_values(tex: str) -> dict[tuple[str, str], dict[str, str]]:
  """{(group, label): {column name: paper cell}} of one table's tabular."""
  (_, rows), = parse_tabulars(tex)
  top, sub = rows[0], rows[1]
  names = []
  for c in top:
    m = re.match(r"\\multicolumn\{(\d+)\}\{c\}\{(.*)\}$", c)
    names += [m.group(2)] * int(m.group(1)) if m else [c]
  names = [f"{n}:{s}" if s else n for n, s in zip(names, sub)]
  values, group = {}, None
  for cells in rows[2:]:
    if len(cells) == 1:
      group = re.match(r"\\multicolumn\{\d+\}\{l\}\{\\textit\{(.*)\}\}$", cells[0]).group(1)
      continue
    label = cells[0].replace(r"$^\dagger$", "")
    label = label.replace(r"\&", "&").replace(r"\%", "%").replace(r"\_", "_")
    values[(group, label)] = {n: c for n, c in zip(names, cells) if n.endswith(":paper")}
  return values


def numbers(cell: str) -> list[float]:
  return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]


def assert_latex_paper_values_equal_csv(table: str, tex: str) -> None:
  info = paper.TABLES[table]
  got = latex_paper_values(tex)
  rows = PAPER[PAPER["table"] == table]
  assert len(got) == len(rows)
  for r in rows.itertuples():
    cells = got[(r.group, r.row)]
    expect = {f"{info.fid_train_header}:paper": [r.fid_train_f], "FID eval:paper": [r.fid_eval_f],
              "IS:paper": [r.is_mean_f, r.is_std_f],
              "steps/s:paper": [r.steps_per_sec_rel_f * 100]}
    for name, cell in cells.items():
      want = [v for v in expect[name] if not math.isnan(v)]
      if not want:
        assert cell == "--", (r.row, name, cell)
      else:
        assert numbers(cell) == pytest.approx(want), (r.row, name, cell)


# ------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("workdir", [None, "empty"])
def test_without_results_every_table_shows_paper_values_and_dashes(workdir, tmp_path):
  workdir = str(tmp_path) if workdir == "empty" else None
  frame = measured.measure(runs.load(workdir), PAPER)
  for table in paper.TABLES:
    lay = layout.build(table, frame)
    rows = data_rows(lay)
    expected = PAPER[PAPER["table"] == table]
    assert list(rows) == list(zip(expected["table"], expected["group"], expected["row"]))
    for r in expected.itertuples():
      cells = rows[(r.table, r.group, r.row)]
      for key, cell in cells.items():
        if key.endswith(":ours") or key in ("step", "samples", "extractor", "scale"):
          assert cell.text is None, (table, r.row, key)
      assert (cells["fid_train:paper"].text or "") == r.fid_train
    lines = [l for l in markdown.render(lay).splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    ours = [i for i, h in enumerate(header)
            if h.endswith("(ours)") or h in ("step", "samples", "extractor", "scale")]
    for line in lines[2:]:
      if line.startswith("| **"):
        continue  # group heading
      cells = [c.strip() for c in line.strip("|").split("|")]
      assert all(cells[i] == markdown.DASH for i in ours), line
      assert not any(re.fullmatch(r"0(\.0+)?%?", c) for c in cells), line


def test_table2_shows_latest_step_in_the_right_rows_and_marks_sample_counts(tmp_path):
  workdir = table2_workdir(str(tmp_path))
  rows = data_rows(build(workdir, "2"))
  a = rows[SHIFT32]
  assert (a["fid_train:ours"].text, a["fid_eval:ours"].text) == ("5.25", "6.50")
  assert a["step"].text == "2000" and a["samples"].text == "10K"
  assert a["label"].mark == layout.DAGGER
  assert a["extractor"].text == EXTRACTOR and a["scale"].text == "demo"
  assert a["is:ours"].text == "50.0" and a["is:ours"].std == "1.50"  # measured IS gets a column
  assert a["is:paper"].text is None
  b = rows[ORIGINAL]
  assert b["fid_train:ours"].text == "7.00" and b["fid_eval:ours"].text is None  # dash, not 0
  assert b["label"].mark is None and b["step"].text == "500" and b["scale"].text == "small"
  for key, cells in rows.items():
    if key not in (SHIFT32, ORIGINAL):
      assert cells["fid_train:ours"].text is None and cells["step"].text is None

  md = render.render(["2"], workdir, "markdown")["table_2.md"]
  line = next(l for l in md.splitlines() if l.startswith("| cosine (shifted to 32)"))
  assert line.startswith("| cosine (shifted to 32)† | 2.26 | 5.25 | 2.88 | 6.50 |")
  line = next(l for l in md.splitlines() if l.startswith("| cosine (shifted to 64)"))
  dash = markdown.DASH
  assert line.startswith(f"| cosine (shifted to 64) | 2.41 | {dash} | 3.03 | {dash} |")
  assert "† evaluated with a different number of samples" in md
  tex = render.render(["2"], workdir, "latex")["table_2.tex"]
  assert (r"cosine (shifted to 32)$^\dagger$ & 2.26 & 5.25 & 2.88 & 6.50 & -- & 50.0 $\pm$ 1.50"
          in tex)


def test_one_run_serves_several_tables_and_literature_rows_stay_unmeasured(tmp_path):
  workdir = table2_workdir(str(tmp_path))
  rows = data_rows(build(workdir, "7"))
  u = rows[UNET128]
  got = (u["fid_train:ours"].text, u["fid_eval:ours"].text, u["is:ours"].text, u["is:ours"].std)
  assert got == ("5.25", "6.50", "50.0", "1.50")
  assert rows[("7", "128x128", "ADM")]["fid_train:ours"].text is None  # listed, but literature
  assert rows[("7", "128x128", "ADM")]["fid_train:paper"].text == "5.91"


def test_table9_takes_each_guidance_from_the_group_run(tmp_path):
  g = "256x256"
  served = [("9", g, f"guidance {x}") for x in ("1.00", "1.05", "2.00")]
  write_run(str(tmp_path), "uvit256", served, [
      result(100, "fid_train", 3.0, guidance=1.0), result(100, "fid_eval", 4.0, guidance=1.0),
      result(100, "fid_train", 2.5, guidance=1.05), result(200, "fid_train", 2.4, guidance=1.05),
      result(200, "is", 240.0, std=4.0, guidance=1.05),
      result(100, "fid_train", 9.0, guidance=2.0), result(100, "is", 400.0, std=5.0, guidance=2.0),
  ])
  rows = data_rows(build(str(tmp_path), "9"))
  r1, r105, r2 = (rows[("9", g, f"guidance {x}")] for x in ("1.00", "1.05", "2.00"))
  text = lambda r, *keys: tuple(r[k].text for k in keys)
  assert text(r1, "fid_train:ours", "fid_eval:ours", "step") == ("3.00", "4.00", "100")
  assert text(r105, "fid_train:ours", "is:ours", "step") == ("2.40", "240.0", "200")
  assert (r2["fid_train:ours"].text, r2["is:ours"].text) == ("9.00", "400.0")
  assert rows[("9", g, "guidance 1.10")]["fid_train:ours"].text is None
  assert rows[("9", "128x128", "guidance 1.00")]["fid_train:ours"].text is None


def test_relative_throughput_uses_latest_entries_and_reference_row(tmp_path):
  group = "128x128"
  ref, big = ("4", group, "4+5 blocks at 16x16"), ("4", group, "8+9 blocks at 16x16")
  small = ("4", group, "2+3 blocks at 16x16")
  tp = lambda key, sps, t, device="cpu": {"table": key[0], "group": key[1], "row": key[2],
                                          "steps_per_sec": sps, "img_per_sec": sps * 8,
                                          "device": device, "batch_size": 8, "time": t}
  write_throughput(str(tmp_path), [tp(ref, 4.0, "2024-01-02T00:00:00"), tp(big, 3.0, 10.0),
                                   tp(ref, 2.0, "2024-01-01T00:00:00"),  # older, later in file
                                   tp(small, 5.0, 1.0, device="gpu")])
  rows = data_rows(build(str(tmp_path), "4"))
  assert rows[ref]["steps:ours"].text == "100" and rows[ref]["steps:ours"].percent
  assert rows[big]["steps:ours"].text == "75" and rows[big]["steps:ours"].mark is None
  assert rows[small]["steps:ours"].text == "125"
  assert rows[small]["steps:ours"].mark == layout.DDAGGER  # measured on another device
  assert rows[("4", group, "12+13 blocks at 16x16")]["steps:ours"].text is None
  assert rows[big]["steps:paper"].text == "76"
  md = render.render(["4"], str(tmp_path), "markdown")["table_4.md"]
  assert "| 8+9 blocks at 16x16 | 2.46 | – | 3.00 | – | 76% | 75% |" in md
  assert "‡ throughput measured on a different device" in md


def test_latex_structure_and_paper_values_equal_the_csv(tmp_path):
  workdir = table2_workdir(str(tmp_path))
  for wd in (None, workdir):
    outs = render.render(list(paper.TABLES), wd, "latex")
    for table in paper.TABLES:
      tex = outs[f"table_{table}.tex"]
      assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
      assert_latex_paper_values_equal_csv(table, tex)
    parse_tabulars(outs["tables.tex"])


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX engine (pdflatex)")
def test_latex_compiles_standalone(tmp_path):
  workdir = table2_workdir(str(tmp_path / "runs"))
  out = tmp_path / "out"
  render.main([f"workdir={workdir}", f"out={out}", "format=latex", "standalone=true"])
  for name in ["tables.tex"] + [f"table_{t}.tex" for t in paper.TABLES]:
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", name],
                          cwd=out, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (out / name.replace(".tex", ".pdf")).stat().st_size > 1000


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX engine (pdflatex)")
def test_latex_keeps_the_papers_table_numbers(tmp_path):
  """LaTeX itself (the labels it writes to the .aux file) numbers each float as the paper does,
  for all tables in one document and for one table alone (not 1, 2, 3 by its running count)."""
  out = tmp_path / "out"
  render.main([f"out={out}", "format=latex", "standalone=true"])
  want = {"2": "2", "3": "3", "4": "4", "5": "5", "6": "6", "7": "7", "8": "8", "9": "9",
          "1024": "C"}
  for name, expected in [("tables", want), ("table_5", {"5": "5"}), ("table_1024", {"1024": "C"})]:
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", name + ".tex"],
                          cwd=out, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
    aux = (out / f"{name}.aux").read_text()
    got = dict(re.findall(r"\\newlabel\{tab:simple-diffusion-(\w+)\}\{\{([^}]*)\}", aux))
    assert got == expected, (name, got)


def test_markdown_is_a_pipe_table_with_one_cell_per_column(tmp_path):
  workdir = table2_workdir(str(tmp_path))
  outs = render.render(list(paper.TABLES), workdir, "markdown")
  for table in paper.TABLES:
    md = outs[f"table_{table}.md"]
    lines = [l for l in md.splitlines() if l.startswith("|")]
    ncols = lines[0].count("|") - 1
    assert re.fullmatch(r"\|(:?-{3,}:?\|)+", lines[1]) and lines[1].count("|") - 1 == ncols
    for l in lines[2:]:
      assert len(re.split(r"(?<!\\)\|", l)) - 2 == ncols, (table, l)
    assert len(lines) - 2 == len(PAPER[PAPER["table"] == table]) + PAPER.loc[
        PAPER["table"] == table, "group"].nunique()


def test_cli_writes_files_and_rejects_unknown_table(tmp_path, capsys):
  workdir = table2_workdir(str(tmp_path / "runs"))
  out = tmp_path / "out"
  assert render.main([f"workdir={workdir}", f"out={out}", "table=all"]) == 0
  names = sorted(os.listdir(out))
  assert names == sorted([f"table_{t}.{e}" for t in paper.TABLES for e in ("md", "tex")]
                         + ["tables.md", "tables.tex"])
  assert "5.25" in (out / "table_2.md").read_text()
  write_run(workdir, "typo", [("2", "128x128", "cosine (shifted to 16)")], [])
  render.main([f"workdir={workdir}", "out=-", "table=2"])
  assert "'cosine (shifted to 16)'), which is not a row" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    run_main(render.main, ["table=11"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error:") and all(t in err for t in paper.TABLES)
  with pytest.raises(UserError, match="workdir"):
    render.main([f"workdir={tmp_path / 'missing'}"])
  with pytest.raises(SystemExit):
    render.main(["--help"])
  helptext = capsys.readouterr().out
  assert all(f"{o.name}=" in helptext for o in render.OPTIONS)


def test_unfinished_last_line_is_skipped_and_broken_lines_are_errors(tmp_path):
  d = write_run(str(tmp_path), "r", [SHIFT32], [result(10, "fid_train", 4.0)])
  with open(os.path.join(d, "eval", "results.jsonl"), "a") as f:
    f.write('{"step": 20, "metric": "fid_tr')  # a writer still appending
  assert data_rows(build(str(tmp_path), "2"))[SHIFT32]["fid_train:ours"].text == "4.00"
  with open(os.path.join(d, "eval", "results.jsonl"), "a") as f:
    f.write('\n{"step": 30}\n')
  with pytest.raises(UserError, match="results.jsonl line 2"):
    runs.load(str(tmp_path))


def test_a_non_utf8_last_line_is_unfinished_and_elsewhere_an_error(tmp_path):
  d = write_run(str(tmp_path), "r", [SHIFT32], [result(10, "fid_train", 4.0)])
  start = '{"step": 20, "metric": "fid_train", "note": "'
  with open(os.path.join(d, "eval", "results.jsonl"), "ab") as f:
    f.write((start + "é").encode()[:-1])  # a writer cut off in the middle of a character
  assert data_rows(build(str(tmp_path), "2"))[SHIFT32]["fid_train:ours"].text == "4.00"
  with open(os.path.join(d, "eval", "results.jsonl"), "ab") as f:
    f.write(b'\n{"step": 30}\n')
  with pytest.raises(UserError, match=rf"line 2 is not UTF-8 text \(byte {len(start)}"):
    runs.load(str(tmp_path))


def _bad_results(workdir):
  with open(os.path.join(workdir, "unet128_shift32", "eval", "results.jsonl"), "r+b") as f:
    lines = f.read().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"fid_eval", b"fid_\xff\xfeval")
    f.seek(0)
    f.write(b"".join(lines))


def _bad_job(workdir):
  with open(os.path.join(workdir, "unet128_shift32", "job.json"), "ab") as f:
    f.write(b" \xc3")


@pytest.mark.parametrize("case,damage,needles", [
    ("results.jsonl not UTF-8", _bad_results,
     ["unet128_shift32/eval/results.jsonl line 2 is not UTF-8", "fix or remove that line"]),
    ("job.json not UTF-8", _bad_job, ["job.json is not UTF-8", "remove the run"]),
    ("read-only out", None, ["cannot write the tables to out=", "out=-"]),
])
def test_render_faults_are_one_line_and_keep_earlier_tables(tmp_path, case, damage, needles):
  """As a user runs it: the command fails with one error line and exit status 2, and the tables
  an earlier render wrote stay as they were."""
  workdir = table2_workdir(str(tmp_path / "runs"))
  out = tmp_path / "out"
  assert render.main([f"workdir={workdir}", f"out={out}", "table=2"]) == 0
  before = snapshot(out)
  assert sorted(before) == ["table_2.md", "table_2.tex"]
  if damage is not None:
    damage(workdir)
  args = ["tables.render", f"workdir={workdir}", f"out={out}", "table=2"]
  if case == "read-only out":
    with read_only(out) as wrap:
      proc = run_cli(*args, wrap=wrap)
  else:
    proc = run_cli(*args)
  assert_one_error_line(proc, *needles)
  assert snapshot(out) == before


def test_gcs_workdir_renders_like_local(tmp_path, gcs_bucket):
  local = table2_workdir(str(tmp_path))
  storage.copy_from_local(local, gcs_bucket)
  assert render.render(["2"], gcs_bucket, "markdown")["table_2.md"].replace(gcs_bucket, "W") == \
      render.render(["2"], local, "markdown")["table_2.md"].replace(local, "W")


def test_table8_fid30k_prefers_the_coco_validation_fid(tmp_path):
  uvit = ("8", "256x256 COCO zero-shot", "simple diffusion (U-ViT 2B)")
  uvit512 = ("8", "512x512 COCO zero-shot", "simple diffusion (U-ViT 2B)")
  write_run(str(tmp_path), "t2i256", [uvit], [
      result(700, "fid_train", 99.0, num_samples=30_000),
      result(700, "fid_eval", 12.5, num_samples=30_000),
      result(700, "is", 20.0, std=1.0, num_samples=30_000)])
  write_run(str(tmp_path), "t2i512", [uvit512], [result(5, "fid_train", 14.0, num_samples=30_000)])
  lay = build(str(tmp_path), "8")
  assert [c.key for c in lay.columns][:3] == ["label", "fid_train:paper", "fid_train:ours"]
  assert not any(c.key.startswith(("is:", "fid_eval:")) for c in lay.columns)
  rows = data_rows(lay)
  assert rows[uvit]["fid_train:ours"].text == "12.50" and rows[uvit]["label"].mark is None
  assert rows[uvit]["samples"].text == "30K"
  assert rows[uvit512]["fid_train:ours"].text == "14.00"  # only fid_train recorded: fallback


def test_kid_and_spreads_render_beside_each_number_with_n_and_resize(tmp_path):
  """Demo-scale rows: FID with its bootstrap std, KID (x10^3) with its std over subsets, the
  sample count and the resize mode; the paper has no KID, so its KID cells are dashes."""
  workdir = str(tmp_path)
  rows = [result(150, "fid_train", 101.234, num_samples=500, std=2.345),
          result(150, "fid_eval", 120.5, num_samples=500, std=3.0),
          result(150, "kid_train", 0.0812, num_samples=500, std=0.0031),
          result(150, "kid_eval", 0.0907, num_samples=500, std=0.0045)]
  for r in rows:
    r["resize_mode"] = "legacy_tensorflow"
  write_run(workdir, "demo_shift32", [SHIFT32], rows)
  cells = data_rows(build(workdir, "2"))[SHIFT32]
  assert (cells["fid_train:ours"].text, cells["fid_train:ours"].std) == ("101.23", "2.35")
  assert (cells["kid_train:ours"].text, cells["kid_train:ours"].std) == ("81.20", "3.10")
  assert (cells["kid_eval:ours"].text, cells["kid_eval:ours"].std) == ("90.70", "4.50")
  assert cells["kid_train:paper"].text is None and cells["samples"].text == "500"
  assert cells["extractor"].text == f"{EXTRACTOR}, legacy_tensorflow"
  md = render.render(["2"], workdir, "markdown")["table_2.md"]
  assert "KID train (×1000) (ours)" in md and "101.23 ± 2.35" in md and "81.20 ± 3.10" in md
  assert "FID over bootstrap resamples" in md
  tex = render.render(["2"], workdir, "latex")["table_2.tex"]
  assert r"101.23 $\pm$ 2.35" in tex and r"81.20 $\pm$ 3.10" in tex
  parse_tabulars(tex)  # every row still fills the columns


UVIT256 = ("8", "256x256 COCO zero-shot", "simple diffusion (U-ViT 2B)")


@pytest.mark.parametrize("data,note", [
    ({"split_origins": {"train": "coco2014", "eval": "coco2014"}, "trained_on_coco": True,
      "zero_shot": False}, "COCO-trained, not zero-shot"),
    ({"split_origins": {"train": "caption-folder", "eval": "coco2014"}, "trained_on_coco": False,
      "zero_shot": True}, None),
    ({"split_origins": {"train": "emoji", "eval": "emoji"}, "trained_on_coco": False,
      "zero_shot": False}, "trained and evaluated on emoji, not zero-shot COCO"),
    (None, "zero-shot not recorded"),
])
def test_table8_says_beside_the_number_when_it_is_not_zero_shot(tmp_path, data, note):
  """Table 8 sits under "COCO zero-shot" beside zero-shot literature: a model trained on COCO's
  own train split (or on anything but other data) is said to be so, in every format."""
  extra = {"data": data} if data is not None else {}
  write_run(str(tmp_path), "t2i256", [UVIT256],
            [result(700, "fid_eval", 12.5, num_samples=30_000)], **extra)
  cell = data_rows(build(str(tmp_path), "8"))[UVIT256]["fid_train:ours"]
  assert cell.text == "12.50" and cell.note == note
  outs = render.render(["8"], str(tmp_path), "both")
  line = next(l for l in outs["table_8.md"].splitlines() if l.startswith("| simple diffusion"))
  assert ("12.50 (" + note + ")" in line) if note else ("12.50 |" in line and "zero-shot" not in
                                                        line)
  if note:
    assert f"12.50 {{\\footnotesize ({note})}}" in outs["table_8.tex"]


NO_DROPOUT = ("3", "128x128", "no dropout")


def test_table3_no_dropout_shows_its_snapshot_step_not_the_runs_last(tmp_path):
  """The row is the checkpoint at 700K of a 1.5M run (933 of 2,000 at demo scale): later steps of
  the same run, evaluated too, are not its number; the step column and a footnote name it."""
  write_run(str(tmp_path), "nodrop", [NO_DROPOUT + ({"eval_step": 933, "num_steps": 2000},)], [
      result(933, "fid_train", 30.0, num_samples=500), result(933, "fid_eval", 31.0, num_samples=500),
      result(2000, "fid_train", 20.0, num_samples=500), result(2000, "fid_eval", 21.0, num_samples=500)])
  lay = build(str(tmp_path), "3")
  row = data_rows(lay)[NO_DROPOUT]
  assert row["fid_train:ours"].text == "30.00" and row["step"].text == "933"
  assert any("no dropout: the checkpoint at step 933 of the other rows' 2,000-step schedule" in t
             for _, t in lay.footnotes)
  # Without a recorded snapshot step the latest step is the row's (every other row).
  write_run(str(tmp_path), "nodrop", [NO_DROPOUT], [result(933, "fid_train", 30.0),
                                                    result(2000, "fid_train", 20.0)])
  assert data_rows(build(str(tmp_path), "3"))[NO_DROPOUT]["step"].text == "2000"


def _ordering_workdir(root, scale, size):
  rows = ["cosine (original at 128)", "cosine (shifted to 32)"]
  for i, (row, fid) in enumerate(zip(rows, [40.0, 60.0])):  # the paper's ordering does not hold
    write_run(str(root), f"run{i}", [("2", "128x128", row)], [result(20, "fid_train", fid, std=1.0,
                                                                      num_samples=500)],
              scale=scale, train_args=[f"Train.image_size={size}"])
  return str(root)


def test_ordering_verdict_below_paper_scale_says_it_is_no_evidence_against_the_paper(
    tmp_path, capsys):
  """`make demo` ends with tables.ordering: a "did NOT hold" at 16x16 must not read as evidence
  against a claim about resolutions above the 32-64 px the cosine schedule was designed for."""
  demo = _ordering_workdir(tmp_path / "demo", "demo", 16)
  assert ordering.main(["table=2", f"workdir={demo}"]) == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  assert "did NOT hold at this scale" in line
  assert line.endswith("This is no evidence for or against the paper: its claim is that the "
                       "cosine schedule, designed for 32x32 to 64x64 images, adds too little noise "
                       "at higher resolutions, and these runs are below paper scale (16x16 "
                       "pixels, noise_d scaled alike so each shift keeps its ratio), where by the "
                       "paper's own rule (shift by 2 log(64/d)) a smaller image wants less noise, "
                       "not more.")
  paper_scale = _ordering_workdir(tmp_path / "paper", "paper", 128)
  assert ordering.main(["table=2", f"workdir={paper_scale}"]) == 0
  assert "no evidence" not in capsys.readouterr().out


def test_a_row_trained_otherwise_is_marked_until_the_rows_own_run_has_results(tmp_path):
  """experiments.run grad_accum=8 steps=100000 at paper scale: the run has its own name, its
  job.json (written by experiments.jobs) says what changed, and the table marks our numbers with
  a section sign and a footnote saying how. Once the row's own run has results, they are shown,
  unmarked."""
  job = registry.jobs(registry.select("2", ["128x128/cosine (shifted to 32)"]))[0]
  changed = jobs.with_overrides(job, "paper", grad_accum=8, steps=100_000)
  assert changed.name == f"{job.name}-accum8-steps100000"
  workdir = str(tmp_path / "runs")
  run_dir = os.path.join(workdir, changed.name)
  jobs.write_job_json(changed, "paper", run_dir, jobs.job_args(changed, "paper", run_dir, None))
  with open(os.path.join(run_dir, "job.json")) as f:
    assert json.load(f)["modified"] == {"batch_size": [512, 512], "grad_accum": [1, 8],
                                        "num_steps": [1_500_000, 100_000]}
  os.makedirs(os.path.join(run_dir, "eval"))
  with open(os.path.join(run_dir, "eval", "results.jsonl"), "w") as f:
    f.write(json.dumps(result(100_000, "fid_train", 5.0)) + "\n")
  cells = data_rows(build(workdir, "2"))[SHIFT32]
  assert (cells["fid_train:ours"].text, cells["fid_train:ours"].mark) == ("5.00", layout.MODIFIED)
  assert cells["fid_train:paper"].mark is None
  note = ("§ trained otherwise than the row (experiments.run batch_size=, grad_accum=, steps=): "
          "cosine (shifted to 32): batch 512 as 8 × 64 accumulated, 100K steps (row: 1.5M).")
  outs = render.render(["2"], workdir)
  assert "| 5.00§ |" in outs["table_2.md"] and note in outs["table_2.md"]
  assert r"5.00$^\S$" in outs["table_2.tex"]
  parse_tabulars(outs["table_2.tex"])
  if shutil.which("pdflatex"):
    out = tmp_path / "tex"
    render.main([f"workdir={workdir}", f"out={out}", "table=2", "format=latex", "standalone=true"])
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table_2.tex"],
                          cwd=out, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
  # The row's own run (trained as the registry says) takes over, unmarked.
  write_run(workdir, job.name, [SHIFT32], [result(1_500_000, "fid_train", 3.0)], scale="paper")
  cells = data_rows(build(workdir, "2"))[SHIFT32]
  assert (cells["fid_train:ours"].text, cells["fid_train:ours"].mark) == ("3.00", None)
  assert "§" not in render.render(["2"], workdir, "markdown")["table_2.md"]


def test_modification_text_says_what_changed():
  text = layout.modification_text
  assert text({"batch_size": [512, 64], "grad_accum": [1, 1], "num_steps": [10, 10]}) == (
      "batch 64 (row: 512)")
  assert text({"batch_size": [2048, 256], "grad_accum": [1, 4], "num_steps": [500_000, 500_000]}
              ) == "batch 256 (row: 2048) as 4 × 64 accumulated"
  assert text({"batch_size": [32, 32], "grad_accum": [1, 1], "num_steps": [2000, 500]}) == (
      "500 steps (row: 2K)")
