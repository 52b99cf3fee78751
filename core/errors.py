"""One error type for mistakes a user can fix, and the one-line reporter for entry points.

Every command of the harness (``python -m core.train``, ``python -m experiments.run``, ...) runs its
main function through :func:`run_main`: a :class:`UserError` (bad gin binding, unknown table,
missing data, wrong shape, ...) is printed as a single ``error: ...`` line naming the fix, and the
process exits with status 2 instead of showing a traceback from deep inside JAX.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
  """A problem with the user's input or environment; its message says how to fix it."""


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Runs ``main(argv)`` and turns a UserError into a one-line message and exit status 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rc = main(argv)
  except UserError as e:
    # gin appends "In call to configurable ..." lines to exceptions raised inside configurables.
    print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(rc or 0)
