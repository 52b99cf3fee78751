"""Preemption-safe checkpoints of the whole training state (orbax), with the data iterator state.

A checkpoint at step ``s`` holds everything the run needs to continue as if it had never stopped:
parameters, optimizer state, EMA parameters, the step counter, the non-finite-step counters, and
the grain iterator state of every data shard this process reads (written per process by grain's
own orbax handler). Saves are asynchronous and keep the newest ``max_to_keep``. Orbax writes each
checkpoint under a temporary name and renames it only once it is complete (on GCS, a commit marker
plays that part), so a checkpoint half-written when the process died is never listed and never
loaded: :meth:`Checkpointer.latest_step` only sees finished ones.

Faults end in one line: :meth:`Checkpointer.restore_latest` refuses a checkpoint of another model
naming the first parameter whose shape differs, and sets a complete but unreadable newest checkpoint
aside (to ``<run>/checkpoints.corrupt/<step>``, nothing is deleted) to resume from the newest one
that restores, saying which and why; a full disk during a save names the step and the space to free.
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy
from etils import epath

from core.io import storage
from core.errors import UserError, first_line

STATE, DATA = "state", "data"


DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
               errno.EDQUOT: "Disk quota exceeded"}


class _DropDiskErrors(logging.Filter):
  """Drops the log records orbax's save threads (absl) and asyncio emit for a full or read-only
  disk: :meth:`Checkpointer._disk_errors` reports that as one line instead of hundreds."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return not any(k in text for k in (*DISK_ERRORS.values(), "RESOURCE_EXHAUSTED"))


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_DropDiskErrors())


def quiet_closed_loop_errors() -> None:
  """Wraps ``sys.unraisablehook`` so that it drops two errors of orbax's abandoned asynchronous
  work, each of which would print a bare traceback after the one ``error:`` or ``preempted:``
  line:

  * tensorstore's future callbacks that find orbax's asyncio loop already closed, as after a
    failed save on a full disk;
  * a read coroutine of a restore that a SIGTERM stopped, closed unfinished when it is collected:
    orbax catches the ``GeneratorExit`` and raises an ``Exception`` instead (one per array read,
    hundreds, at whatever later moment the garbage collector runs).

  Every other unraisable error goes on to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_closed_loops", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    closed_loop = isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
    closed_read = (isinstance(e.__cause__, GeneratorExit)
                   and inspect.iscoroutine(unraisable.object))
    if not (closed_loop or closed_read):
      previous(unraisable)

  hook.quiets_closed_loops = True
  sys.unraisablehook = hook


def _why(e: BaseException) -> str:
  """The innermost error of a chain, on one short line."""
  while (e.__cause__ or e.__context__) is not None and (e.__cause__ or e.__context__) is not e:
    e = e.__cause__ or e.__context__
  return f"{type(e).__name__}: {first_line(e)}"[:200]


class _Manager(ocp.CheckpointManager):
  """orbax's manager, whose saves do not ask the preemption sync manager themselves: ``save``
  would report the global step to it, which is not the count the training loop reports
  (:meth:`Checkpointer.reached_preemption`), and a notice that came during a save would then set
  the sync point from it."""

  def reached_preemption(self, step: int) -> bool:
    return False


class Checkpointer:
  """Saves and restores ``(train_state, data_iterator)`` pairs under ``<run_dir>/checkpoints``."""

  def __init__(self, run_dir: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               with_data: bool = True, use_ocdbt: bool = True, keep_steps=()):
    quiet_closed_loop_errors()
    if not storage.is_remote(run_dir):
      run_dir = os.path.abspath(run_dir)  # orbax wants absolute paths
    self.directory = storage.join(run_dir, "checkpoints")
    self.with_data = with_data
    # OCDBT (one key-value database per checkpoint) is orbax's default and the fast path for
    # thousands of arrays; use_ocdbt=False writes one zarr array per leaf instead.
    handlers = {STATE: ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)}
    if with_data:
      handlers[DATA] = grain.checkpoint.CheckpointHandler()
    keep: dict[str, Any] = {"max_to_keep": max_to_keep}
    if keep_steps and max_to_keep is not None:  # the newest max_to_keep, and keep_steps always
      keep = {"preservation_policy": preservation_policy.AnyPreservationPolicy([
          preservation_policy.LatestN(max_to_keep),
          preservation_policy.CustomSteps([int(s) for s in keep_steps])])}
    self._manager = _Manager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            **keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True),
        item_handlers=handlers)

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, oldest first (also those another process wrote since)."""
    if storage.is_remote(self.directory):
      # Orbax lists gs:// through etils.epath -> gcsfs, which caches every directory listing for
      # the life of the process: without this, a process that listed the checkpoints once (the
      # eval worker polling a run, the runner after its trainer subprocess) never sees newer ones.
      epath.backend.fsspec_backend.fs(self.directory).invalidate_cache()
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
    """Starts an asynchronous save of ``state`` (and the iterator state) as step ``step``."""
    items = {STATE: ocp.args.StandardSave(state)}
    if self.with_data:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._disk_errors(step):
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def reached_preemption(self, count: int) -> bool:
    """True on every host at the same call once any host got SIGTERM (under jax.distributed).

    ``count`` must be the same on every host at a given step and grow by one a step from 1 at the
    first step after the hosts start or resume (core/trainer.py: the steps this invocation has run),
    since a notice that arrives before the first call sets the sync point to 1."""
    return jax.process_count() > 1 and ocp.multihost.reached_preemption(count)

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raises a UserError naming the first model parameter whose shape (or presence) in the
    checkpoint differs from ``abstract_state``'s (``params``, then ``ema_params``)."""
    saved_tree = self._manager.item_metadata(step)[STATE].tree
    fix = ("the run directory holds another model: use a new workdir, or the configuration it was "
           "trained with (its config.gin)")
    for part in ("params", "ema_params"):
      if not (isinstance(abstract_state, dict) and part in abstract_state):
        continue
      flat = lambda t: {jax.tree_util.keystr(p): tuple(getattr(a, "shape", ()))
                        for p, a in jax.tree_util.tree_flatten_with_path(t)[0]}
      want, saved = flat(abstract_state[part]), flat(saved_tree.get(part, {}))
      for key in sorted(want.keys() | saved.keys()):
        name = f"{part}{key}"
        if key not in saved:
          raise UserError(f"checkpoint step {step} in {self.directory} has no {name} (the model's "
                          f"has shape {want[key]}); {fix}")
        if key not in want:
          raise UserError(f"checkpoint step {step} in {self.directory} has {name} of shape "
                          f"{saved[key]}, which the model does not have; {fix}")
        if saved[key] != want[key]:
          raise UserError(f"checkpoint step {step} in {self.directory} has {name} of shape "
                          f"{saved[key]} but the model's is {want[key]}; {fix}")

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None
                     ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

    A checkpoint of another model is refused (:meth:`check_shapes`). When the newest checkpoints
    cannot be read but an older one can, the unreadable ones are moved to ``checkpoints.corrupt/``
    (one process, local run directory) with a message naming each and its error, and the run
    resumes from the older one. When none restores, nothing is moved and one line names the newest.
    """
    steps = self.all_steps()
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        self.check_shapes(step, abstract_state)
        state = self.restore(step, abstract_state, data_iterator)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore/json errors alike)
        failed.append((step, _why(e)))
        if storage.is_remote(self.directory) or jax.process_count() > 1:
          break  # no renames on GCS or across hosts: stop with one line
        continue
      for bad, why in failed:
        aside = self._set_aside(bad)
        print(f"checkpoint step {bad} does not restore ({why}); moved it to {aside}; resuming from "
              f"step {step}", file=sys.stderr, flush=True)
      return step, state
    if failed:
      bad, why = failed[0]
      raise UserError(f"checkpoint step {bad} ({storage.join(self.directory, str(bad))}) does not "
                      f"restore ({why}); move it out of {self.directory} to resume from the one "
                      f"before, or use a new workdir")
    return None, None

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` to ``<run>/checkpoints.corrupt/<step>`` (kept, not deleted)."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints.corrupt", str(step))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    if os.path.exists(aside):
      aside += f".{time.time_ns()}"
    os.rename(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()
    return aside

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores step ``step`` into arrays shaped and sharded like ``abstract_state``.

    ``data_iterator`` (when given) has its position set to where it was at that step.
    """
    if step not in self.all_steps():
      raise UserError(f"no complete checkpoint for step {step} in {self.directory}; "
                      f"available: {self.all_steps() or 'none'}")
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if self.with_data and data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves have been committed."""
    with self._disk_errors(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._disk_errors(None):
      self._manager.wait_until_finished()
    self._manager.close()

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None):
    """A full or read-only disk during a save: remove the half-written ``*-tmp`` checkpoint and stop
    with one line (the newest complete checkpoint is intact and is where a rerun resumes)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (tensorstore wraps OS errors)
      text = f"{e} {e.__cause__ or ''}"
      kind = DISK_ERRORS.get(getattr(e, "errno", None)) or next(
          (k for k in DISK_ERRORS.values() if k in text), None)
      if kind is None:
        raise
      self._remove_tmp()
      last = self.latest_step()
      raise UserError(f"cannot write checkpoint{'' if step is None else f' step {step}'} to "
                      f"{self.directory} ({kind}); free space (or make it writable) and rerun to "
                      f"resume from step {last if last is not None else 0}") from None

  def _remove_tmp(self) -> None:
    """Removes orbax's temporary (unfinished) checkpoint directories."""
    if storage.is_remote(self.directory) or jax.process_index() != 0:
      return  # orbax removes them when the next manager opens the directory
    for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
      if ".orbax-checkpoint-tmp" in name or name.endswith("-tmp"):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

