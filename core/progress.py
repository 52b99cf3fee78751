"""Progress of long loops (training steps, sampling batches, feature extraction).

A tqdm bar on a terminal; elsewhere (CI logs, batch jobs) one plain line every ``interval_s``
seconds and one at the end, e.g. ``step 102/1000 (10%) 3.4 steps/s eta 4m24s loss=0.123``.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from typing import Any, Callable, Mapping, TextIO

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
  """``42s``, ``4m18s``, ``1h02m``, ``2d03h`` (``?`` when unknown)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
  return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _fmt_value(v: Any) -> str:
  if isinstance(v, bool) or isinstance(v, str):
    return str(v)
  if isinstance(v, numbers.Integral):
    return str(int(v))
  try:
    return f"{float(v):.4g}"
  except (TypeError, ValueError):
    return str(v)


def format_postfix(metrics: Mapping[str, Any]) -> str:
  """``loss=0.123 lr=0.0001``: numbers with 4 significant digits, in insertion order."""
  return " ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items())


class Progress:
  """A progress reporter: tqdm bar on a terminal, periodic plain log lines elsewhere.

  Args:
    total: the step count at the end (``None``: unknown; no percentage or ETA).
    initial: the step to start counting from (e.g. the restored checkpoint's step).
    desc: the word in front of the counts (``step``, ``batch``, ``images``).
    unit: the plural in the rate (``steps/s``, ``batches/s``).
    interval_s: seconds between plain lines.
    file: where to write (default ``sys.stderr``).
    use_tqdm: ``None`` picks tqdm exactly when ``file`` is an interactive terminal.
    print_fn: writes plain lines instead of ``file`` (e.g. ``logging.info``).
    clock: monotonic time source in seconds.
    enabled: ``False`` makes every method a no-op (e.g. on non-chief hosts).
  """

  def __init__(self, total: int | None = None, *, initial: int = 0, desc: str = "step",
               unit: str = "steps", interval_s: float = 30.0, file: TextIO | None = None,
               use_tqdm: bool | None = None, print_fn: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic, enabled: bool = True):
    self.total = None if total is None else int(total)
    self.step = int(initial)
    self.desc = desc
    self.unit = unit
    self.interval_s = float(interval_s)
    self._file = file if file is not None else sys.stderr
    self._print_fn = print_fn
    self._clock = clock
    self._postfix: dict[str, Any] = {}
    self._closed = not enabled
    self.enabled = enabled
    if use_tqdm is None:
      isatty = getattr(self._file, "isatty", None)
      use_tqdm = bool(isatty and isatty()) and print_fn is None
    self._bar = None
    if use_tqdm and enabled:
      self._bar = tqdm(total=self.total, initial=self.step, desc=desc, unit=unit,
                       file=self._file, dynamic_ncols=True, smoothing=0.05)
    now = clock()
    self._start_time, self._start_step = now, self.step
    self._last_time, self._last_step = now, self.step

  @property
  def uses_tqdm(self) -> bool:
    return self._bar is not None

  def set_postfix(self, metrics: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
    """Sets the metrics shown after the counts (replacing earlier ones with the same name)."""
    if not self.enabled:
      return
    self._postfix.update(metrics or {})
    self._postfix.update(kwargs)
    if self._bar is not None:
      self._bar.set_postfix_str(format_postfix(self._postfix), refresh=False)

  def update(self, step: int, /, **metrics: Any) -> None:
    """Moves to the absolute position ``step`` (e.g. the loop's step counter after a step) and
    sets postfix metrics; may print a line."""
    self.advance(int(step) - self.step, **metrics)

  def advance(self, n: int = 1, /, **metrics: Any) -> None:
    """Counts ``n`` more steps (relative, like ``tqdm.update``) and sets postfix metrics."""
    if not self.enabled or self._closed:
      return
    if metrics:
      self.set_postfix(metrics)
    self.step += int(n)
    if self._bar is not None:
      self._bar.update(int(n))
      return
    now = self._clock()
    if now - self._last_time >= self.interval_s:
      self._emit(self._line(now))
      self._last_time, self._last_step = now, self.step

  def write(self, line: str) -> None:
    """Prints a line of its own (``compiling the train step ...``) above the bar, or as a plain
    line, without breaking the bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line, file=self._file)
    else:
      self._emit(line)

  def close(self) -> None:
    """Ends the bar, or prints the final line with the average rate and the time taken."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
      return
    self._emit(self._line(self._clock(), final=True))

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ----------------------------------------------------------------------------------------------

  def _line(self, now: float, final: bool = False) -> str:
    parts = [f"{self.desc} {self.step}" + (f"/{self.total}" if self.total is not None else "")]
    if self.total:
      parts.append(f"({100 * self.step // self.total}%)")
    if final:
      dt, dn = now - self._start_time, self.step - self._start_step
    else:
      dt, dn = now - self._last_time, self.step - self._last_step
    rate = dn / dt if dt > 0 else float("nan")
    if math.isfinite(rate):
      parts.append(f"{rate:.3g} {self.unit}/s")
    if final:
      parts.append(f"done in {format_duration(now - self._start_time)}")
    elif self.total is not None:
      remaining = max(self.total - self.step, 0)
      eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else float("nan"))
      parts.append(f"eta {format_duration(eta)}")
    if self._postfix:
      parts.append(format_postfix(self._postfix))
    return " ".join(parts)

  def _emit(self, line: str) -> None:
    if self._print_fn is not None:
      self._print_fn(line)
    else:
      self._file.write(line + "\n")
      self._file.flush()
