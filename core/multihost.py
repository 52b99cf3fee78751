"""What process 0 decides, every process does: decisions of a multi-host run, broadcast from one.

Under ``jax.distributed`` every process must run the same collectives in the same order. A process
that decides from its own view of a disk (which sample batches are cached, which results exist,
which checkpoints are complete) can fall out of step with the others: a collective then pairs the
wrong arrays (garbage) or waits forever (a hang). Here process 0 decides and broadcasts the
decision; an error while deciding is raised on process 0 and reaches every other process as a
one-line error, instead of leaving them waiting. With one process these are plain calls.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from core.errors import UserError

_T = TypeVar("_T")


def is_chief() -> bool:
  return jax.process_index() == 0


def _chief_error() -> UserError:
  return UserError("process 0 stopped with an error (its output names it); fix that and rerun "
                   "every process")


def from_chief(decide: Callable[[], np.ndarray], like: np.ndarray) -> np.ndarray:
  """``decide()`` computed on process 0 only, the same array on every process.

  ``like`` gives the shape and dtype every process expects (what ``decide`` returns, converted).
  """
  like = np.asarray(like)
  if jax.process_count() == 1:
    return np.asarray(decide(), like.dtype).reshape(like.shape)
  value, error = like, None
  if is_chief():
    try:
      value = np.asarray(decide(), like.dtype).reshape(like.shape)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, after the broadcast)
      error = e
  ok, value = multihost_utils.broadcast_one_to_all((np.int32(error is None), value))
  if error is not None:
    raise error
  if not int(ok):
    raise _chief_error()
  return np.asarray(value)


def on_chief(work: Callable[[], _T]) -> _T | None:
  """``work()`` on process 0 only (writing results, events, shared caches); every process waits
  for it and learns whether it succeeded. Returns its result on process 0, None elsewhere."""
  out: list = [None]

  def run() -> np.ndarray:
    out[0] = work()
    return np.int32(1)

  from_chief(run, np.int32(0))
  return out[0] if is_chief() else None
