"""core.progress: the plain-line format used when stderr is not a terminal."""
from __future__ import annotations

import io

from core import progress


class Clock:
  """A settable time source, so that rates and ETAs are exact."""

  def __init__(self):
    self.t = 0.0

  def __call__(self) -> float:
    return self.t


def test_format_duration():
  assert progress.format_duration(0) == "0s"
  assert progress.format_duration(42.4) == "42s"
  assert progress.format_duration(258) == "4m18s"
  assert progress.format_duration(3720) == "1h02m"
  assert progress.format_duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"
  assert progress.format_duration(float("nan")) == "?"


def test_plain_lines_every_interval():
  out, clock = io.StringIO(), Clock()
  p = progress.Progress(total=1000, interval_s=30, file=out, clock=clock)
  assert not p.uses_tqdm  # StringIO is not a terminal
  clock.t = 10.0
  p.update(50, loss=0.5)  # absolute position
  assert out.getvalue() == ""  # less than interval_s since the start
  clock.t = 30.0
  p.advance(52, loss=0.123)  # relative
  assert out.getvalue().splitlines() == ["step 102/1000 (10%) 3.4 steps/s eta 4m24s loss=0.123"]
  # The next line's rate covers only the interval since the previous line.
  clock.t = 50.0
  p.set_postfix({"loss": 0.1, "lr": 1e-4})
  p.update(200)
  clock.t = 60.0
  p.advance(2)
  assert out.getvalue().splitlines()[1] == (
      "step 202/1000 (20%) 3.33 steps/s eta 3m59s loss=0.1 lr=0.0001")
  clock.t = 300.0
  p.update(1000)
  p.close()
  p.close()  # idempotent
  lines = out.getvalue().splitlines()
  assert lines[-1] == "step 1000/1000 (100%) 3.33 steps/s done in 5m00s loss=0.1 lr=0.0001"
  assert len(lines) == 4


def test_resumed_and_unknown_total():
  lines, clock = [], Clock()
  with progress.Progress(initial=500, desc="batch", unit="batches", interval_s=5,
                         print_fn=lines.append, clock=clock) as p:
    clock.t = 5.0
    p.update(510, fid=float("nan"), n=3)
  assert lines == ["batch 510 2 batches/s fid=nan n=3",
                   "batch 510 2 batches/s done in 5s fid=nan n=3"]


def test_tqdm_bar_when_asked():
  out = io.StringIO()
  with progress.Progress(total=10, file=out, use_tqdm=True) as p:
    p.advance(4, loss=0.25)
    p.update(10)
  text = out.getvalue()
  assert p.uses_tqdm and "10/10" in text and "steps/s" in text


def test_disabled_prints_nothing():
  out, clock = io.StringIO(), Clock()
  with progress.Progress(total=10, file=out, clock=clock, interval_s=0, enabled=False) as p:
    clock.t = 1.0
    p.update(5, loss=1.0)
    p.advance(5)
  assert out.getvalue() == "" and not p.uses_tqdm


def test_write_prints_a_line_of_its_own():
  """Lines such as ``compiling the train step ...``: plain, or above a tqdm bar that goes on."""
  out, clock = io.StringIO(), Clock()
  with progress.Progress(total=10, file=out, clock=clock, interval_s=100) as p:
    p.write("compiling the train step ...")
    clock.t = 2.0
    p.update(10)
  assert out.getvalue().splitlines() == ["compiling the train step ...",
                                         "step 10/10 (100%) 5 steps/s done in 2s"]
  out = io.StringIO()
  with progress.Progress(total=10, file=out, use_tqdm=True) as p:
    p.advance(4)
    p.write("compiled in 3s")
    p.advance(6)
  text = out.getvalue()
  assert "compiled in 3s\n" in text and "10/10" in text.split("compiled in 3s\n")[1]
  out = io.StringIO()
  progress.Progress(total=10, file=out, enabled=False).write("x")
  assert out.getvalue() == ""
