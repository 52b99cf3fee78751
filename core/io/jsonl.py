"""JSON-lines files (metrics.jsonl, eval/results.jsonl, throughput.jsonl) with one torn-line policy.

A writer killed mid-append leaves bytes after the last newline: that torn tail is ignored by
readers and dropped by :func:`repair`. Any other line that is not a UTF-8 JSON object is a
one-line error naming the file and line (the file is left as it is: nothing is lost).
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from core.errors import UserError
from core.io import storage


def read_with_tail(path: str) -> tuple[list[dict[str, Any]], bool]:
  """(every complete row in file order, whether a torn tail follows them); ([], False) if absent."""
  if not storage.exists(path):
    return [], False
  pieces = storage.read_bytes(path).split(b"\n")
  torn = pieces.pop() != b""  # bytes after the last newline: an unfinished append
  rows = []
  for i, raw in enumerate(pieces, 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise UserError(f"{path} line {i} is not UTF-8 text (byte {e.start} is "
                      f"{raw[e.start:e.start + 1]!r}); fix or remove that line, the other rows "
                      f"are kept") from None
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {i} is not JSON ({e.msg}); fix or remove that line, the "
                      f"other rows are kept") from None
    if not isinstance(row, dict):
      raise UserError(f"{path} line {i} is not a JSON object; fix or remove that line")
    rows.append(row)
  return rows, torn


def read(path: str) -> list[dict[str, Any]]:
  """Every complete row of ``path`` in file order (a torn tail is ignored)."""
  return read_with_tail(path)[0]


def write(path: str, rows: Iterable[dict[str, Any]]) -> None:
  """Replaces ``path`` with ``rows`` (atomically)."""
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append(path: str, rows: Iterable[dict[str, Any]]) -> None:
  """Appends ``rows``, one line each, in one write (a kill leaves all of them or a torn tail)."""
  storage.append_lines(path, [json.dumps(r) for r in rows])


def repair(path: str) -> bool:
  """Drops a torn tail (before appending after a kill); returns whether there was one."""
  rows, torn = read_with_tail(path)
  if torn:
    write(path, rows)
  return torn
