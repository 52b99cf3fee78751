"""LaTeX (booktabs) for a :class:`tables.layout.Layout`; ``standalone`` makes a whole document.

Needs only the booktabs package (plus geometry for the standalone page). Metric names sit in a
first header row spanning their 'paper' and 'ours' columns, with \\cmidrule under each. Every
float keeps the paper's table number (Table 5 is "Table 5", not LaTeX's running count).
"""
from __future__ import annotations

from tables import paper
from tables.layout import DAGGER, MODIFIED, Cell, Layout

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_MARKS = {DAGGER: r"$^\dagger$", "ddagger": r"$^\ddagger$", MODIFIED: r"$^\S$"}
PREAMBLE = ("\\documentclass{article}\n"
            "\\usepackage[landscape,margin=1.5cm]{geometry}\n\\usepackage{booktabs}\n"
            "\\begin{document}\n")


def escape(text: str) -> str:
  """Escapes LaTeX's special characters (and writes a unicode times sign in math mode)."""
  out = "".join(_SPECIAL.get(ch, ch) for ch in text)
  return out.replace("×", r"$\times$")


def cell(c: Cell) -> str:
  if c.text is None:
    return "--"
  s = escape(c.text)
  if c.emphasis:
    s = f"\\textit{{{s}}}"
  if c.std is not None:
    s += f" $\\pm$ {escape(c.std)}"
  if c.note:
    s += f" {{\\footnotesize ({escape(c.note)})}}"
  if c.percent:
    s += r"\%"
  if c.mark:
    s += _MARKS[c.mark]
  return s


def _header(layout: Layout) -> list[str]:
  """Two header rows: metric names spanning (paper, ours), then 'paper'/'ours'."""
  top, sub, rules = [], [], []
  i = 0
  cols = layout.columns
  while i < len(cols):
    c = cols[i]
    if c.sub:
      span = 1
      while i + span < len(cols) and cols[i + span].top == c.top and cols[i + span].sub:
        span += 1
      top.append(f"\\multicolumn{{{span}}}{{c}}{{{escape(c.top)}}}")
      rules.append(f"\\cmidrule(lr){{{i + 1}-{i + span}}}")
      sub += [escape(cols[j].sub) for j in range(i, i + span)]
      i += span
    else:
      top.append(escape(c.top))
      sub.append("")
      i += 1
  return [" & ".join(top) + r" \\", " ".join(rules), " & ".join(sub) + r" \\"]


def tabular(layout: Layout) -> str:
  """The booktabs tabular alone."""
  spec = "".join("r" if c.numeric else "l" for c in layout.columns)
  n = len(layout.columns)
  lines = [f"\\begin{{tabular}}{{{spec}}}", r"\toprule", *_header(layout), r"\midrule"]
  for row in layout.rows:
    if row.kind == "group":
      lines.append(f"\\multicolumn{{{n}}}{{l}}{{{cell(row.cells[0])}}} \\\\")
    else:
      lines.append(" & ".join(cell(c) for c in row.cells) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(lines)


def number(table: str) -> str:
  """The number LaTeX prints for a table: the paper's own (5 for Table 5); 'C' for the 1024
  result, which the paper gives in the text of appendix C."""
  return "C" if table == "1024" else table


def render(layout: Layout, *, standalone: bool = False) -> str:
  """A table float (caption, label, tabular, footnotes); with ``standalone`` a full document.

  The float sets ``\\thetable`` (locally) to the paper's table number, so its caption reads
  "Table 5: ..." and ``\\ref`` to its label gives 5, whichever tables are rendered and in what
  order, instead of LaTeX's running count 1, 2, 3.
  """
  notes = "\n".join(f"{_MARKS[m] + ' ' if m else ''}{escape(t)}\\par" for m, t in layout.footnotes)
  where = f" (paper: {paper.source(layout.table)})" if layout.table == "1024" else ""
  body = "\n".join([
      r"\begin{table}[ht]", f"\\renewcommand{{\\thetable}}{{{number(layout.table)}}}",
      r"\centering", r"\small",
      f"\\caption{{{escape(layout.caption)}{where}}}",
      f"\\label{{tab:simple-diffusion-{layout.table}}}",
      tabular(layout), "", r"\smallskip", r"{\footnotesize\raggedright", notes, "}",
      r"\end{table}", ""])
  return wrap(body) if standalone else body


def wrap(body: str) -> str:
  """Wraps table floats into a document that compiles on its own."""
  return PREAMBLE + body + "\n\\end{document}\n"
