"""GitHub-flavoured markdown (pipe tables) for a :class:`tables.layout.Layout`."""
from __future__ import annotations

from tables import paper
from tables.layout import DAGGER, MODIFIED, Cell, Layout

DASH = "–"
_MARKS = {DAGGER: "†", "ddagger": "‡", MODIFIED: "§"}


def _escape(text: str) -> str:
  return text.replace("|", "\\|").replace("*", "\\*")


def cell(c: Cell) -> str:
  """Markdown text of one cell."""
  if c.text is None:
    return DASH
  s = _escape(c.text)
  if c.emphasis:
    s = f"**{s}**"
  if c.std is not None:
    s += f" ± {c.std}"
  if c.note:
    s += f" ({_escape(c.note)})"
  if c.percent:
    s += "%"
  if c.mark:
    s += _MARKS[c.mark]
  return s


def render(layout: Layout) -> str:
  """A '### Table N' heading, the pipe table and its footnotes."""
  headers = [f"{c.top} ({c.sub})" if c.sub else c.top for c in layout.columns]
  align = [("---:" if c.numeric else ":---") for c in layout.columns]
  lines = [f"### {paper.source(layout.table)}: {layout.caption}", "",
           "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
  n = len(layout.columns)
  for row in layout.rows:
    cells = [cell(c) for c in row.cells] + [""] * (n - len(row.cells))
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  for mark, text in layout.footnotes:
    lines.append(f"{_MARKS[mark]} {text}" if mark else text)
    lines.append("")
  return "\n".join(lines)
