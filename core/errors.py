"""One error type for mistakes a user can fix, one for preemption, and the one-line reporter.

:func:`run_main` prints a :class:`UserError` as one ``error: ...`` line naming the fix (exit 2)
and a :class:`Preempted` command, which has written its checkpoint, exits 75 (sysexits.h
EX_TEMPFAIL): a scheduler requeues it and the same command resumes.

SIGTERM is how schedulers ask a command to stop (SLURM's ``--signal``, its time limit and
preemption, Cloud TPU maintenance). :func:`defer_sigterm` keeps one that arrives while a command
starts (importing, joining ``jax.distributed``) for the code that stops at a checkpoint to take
(:func:`take_deferred_sigterm`); :class:`StopOnSigterm` turns SIGTERM into :class:`Preempted` in
commands that have nothing to checkpoint themselves.
"""
from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import threading
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


_deferred = {"received": False}


def _defer(signum, frame):  # pylint: disable=unused-argument
  _deferred["received"] = True


def defer_sigterm() -> None:
  """From now until another handler takes SIGTERM over, a SIGTERM is remembered instead of
  ending the process (Python's default). Call it first thing in a command's module: a scheduler's
  early warning can arrive while the command still imports JAX."""
  try:
    signal.signal(signal.SIGTERM, _defer)
  except ValueError:  # not in the main thread: nothing to defer
    pass


def take_deferred_sigterm() -> bool:
  """Whether a SIGTERM arrived while deferred (then forgotten: it is the caller's to act on)."""
  received = _deferred["received"]
  _deferred["received"] = False
  return received


class StopOnSigterm:
  """Inside the block SIGTERM raises :class:`Preempted` in the main thread (after a SIGTERM that
  :func:`defer_sigterm` kept, at once on entry). A library that catches the ``Preempted`` raised
  inside it and raises an ``Exception`` of its own instead (orbax does, restoring a checkpoint)
  does not turn the stop into a failure: whatever escapes the block after a SIGTERM leaves it
  as ``Preempted``. A ``Preempted`` that Python drops ("Exception ignored in": raised while a
  finaliser runs, e.g. a ZipFile's ``__del__`` while torch loads a model, or a garbage-collector
  callback, e.g. JAX's) reaches ``sys.unraisablehook``, and one raised in an asyncio callback
  (orbax's event loop reading its wake-up pipe) is one asyncio logs and drops; the block would run
  on: the signal is delivered again, once the finaliser or callback has returned.
  Code that checkpoints installs its own handler inside the block (the trainer's), so it stops
  at its next step instead."""

  def __init__(self, message: str = "SIGTERM: stopped; rerun the same command to resume"):
    self.message = message
    self.received = False
    self._previous = None
    self._previous_unraisable = sys.unraisablehook
    self._active = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True
    if _in_an_asyncio_callback(frame):
      # Raised here, asyncio would log and drop it: the signal comes again once the callback has
      # returned.
      self._deliver_again()
      return
    raise Preempted(self.message)

  def _deliver_again(self) -> None:
    threading.Timer(0.05, self._again).start()

  def _again(self) -> None:
    if self._active:
      os.kill(os.getpid(), signal.SIGTERM)

  def _unraisable(self, unraisable) -> None:
    """Wraps ``sys.unraisablehook`` while the block runs: our ``Preempted``, dropped where Python
    cannot raise (a finaliser, a garbage-collector or weakref callback), is delivered again; any
    other error goes on to the hook before."""
    if self._active and isinstance(unraisable.exc_value, Preempted):
      self._deliver_again()
    else:
      self._previous_unraisable(unraisable)

  def __enter__(self) -> "StopOnSigterm":
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    self._previous_unraisable = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    self._active = True
    if take_deferred_sigterm():
      self.__exit__(None, None, None)
      self.received = True
      raise Preempted(self.message)
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self._active = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
    if sys.unraisablehook == self._unraisable:  # else a hook set inside wraps ours: inactive now
      sys.unraisablehook = self._previous_unraisable
    if self.received and exc is not None and not isinstance(exc, Preempted):
      raise Preempted(self.message) from exc
    return False


def _in_an_asyncio_callback(frame) -> bool:
  """Whether an exception raised in ``frame`` would be logged and dropped by asyncio: inside a
  callback the event loop runs (``Handle._run``) that is not a coroutine's step, whose task would
  take the exception instead."""
  while frame is not None:
    code = frame.f_code
    if code.co_flags & inspect.CO_COROUTINE:
      return False
    if code.co_name == "_run" and code.co_filename.endswith(os.path.join("asyncio", "events.py")):
      return True
    frame = frame.f_back
  return False


def first_line(e: BaseException) -> str:
  # gin appends "In call to configurable ..." lines to exceptions raised inside configurables.
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _quiet_exit(status: int, whole_process: bool) -> None:
  """Exits after the one line: work the error abandoned must not print after it (an async
  checkpoint write that hit a full disk, whose coroutine is finalised at shutdown with a "never
  awaited" RuntimeWarning; the other failed reads of a checkpoint that does not restore, whose
  tasks asyncio logs as "Task exception was never retrieved"). Logging and unraisable exceptions
  are silenced only where the command owns the process (``run_main`` reading ``sys.argv``), not
  in a caller that goes on (a test)."""
  warnings.simplefilter("ignore")
  if whole_process:
    logging.disable(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
  sys.exit(status)


def run_main(main: Callable[[Sequence[str]], int | None],
             argv: Sequence[str] | None = None) -> None:
  """Runs ``main(argv)``: a UserError becomes one ``error:`` line and exit status 2, a Preempted
  one ``preempted:`` line and exit status 75."""
  whole_process = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rc = main(argv)
  except UserError as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    _quiet_exit(EXIT_USER_ERROR, whole_process)
  except Preempted as e:
    print(f"preempted: {first_line(e)}", file=sys.stderr, flush=True)
    _quiet_exit(EXIT_PREEMPTED, whole_process)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(rc or 0)
