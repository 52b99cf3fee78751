"""One error type for mistakes a user can fix, one for preemption, and the one-line reporter.

:func:`run_main` prints a :class:`UserError` as one ``error: ...`` line naming the fix (exit 2)
and a :class:`Preempted` command, which has written its checkpoint, exits 75 (sysexits.h
EX_TEMPFAIL): a scheduler requeues it and the same command resumes.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL


class UserError(Exception):
  """A problem with the user's input or environment; its message says how to fix it."""


class Preempted(BaseException):
  """The command was asked to stop (SIGTERM) and stopped cleanly; rerunning it resumes.

  Like KeyboardInterrupt it is not an ``Exception``, so no broad ``except Exception`` swallows it.
  """


def first_line(e: BaseException) -> str:
  # gin appends "In call to configurable ..." lines to exceptions raised inside configurables.
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _quiet_exit(status: int) -> None:
  """Exits after the one line: work the error abandoned (e.g. an async checkpoint write that hit
  a full disk, whose coroutine is finalised at shutdown with a "never awaited" RuntimeWarning)
  must not print after it."""
  warnings.simplefilter("ignore")
  sys.exit(status)


def run_main(main: Callable[[Sequence[str]], int | None],
             argv: Sequence[str] | None = None) -> None:
  """Runs ``main(argv)``: a UserError becomes one ``error:`` line and exit status 2, a Preempted
  one ``preempted:`` line and exit status 75."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rc = main(argv)
  except UserError as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    _quiet_exit(EXIT_USER_ERROR)
  except Preempted as e:
    print(f"preempted: {first_line(e)}", file=sys.stderr, flush=True)
    _quiet_exit(EXIT_PREEMPTED)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(rc or 0)
