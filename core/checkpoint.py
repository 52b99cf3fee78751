"""Preemption-safe checkpoints of the whole training state (orbax), with the data iterator state.

A checkpoint at step ``s`` holds everything the run needs to continue as if it had never stopped:
parameters, optimizer state, EMA parameters, the step counter, the non-finite-step counters, and
the grain iterator state of every data shard this process reads (written per process by grain's
own orbax handler). Saves are asynchronous and keep the newest ``max_to_keep``. Orbax writes each
checkpoint under a temporary name and renames it only once it is complete (on GCS, a commit marker
plays that part), so a checkpoint half-written when the process died is never listed and never
loaded: :meth:`Checkpointer.latest_step` only sees finished ones.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from core import storage
from core.errors import UserError

STATE, DATA = "state", "data"


class Checkpointer:
  """Saves and restores ``(train_state, data_iterator)`` pairs under ``<run_dir>/checkpoints``."""

  def __init__(self, run_dir: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               with_data: bool = True, use_ocdbt: bool = True):
    if not storage.is_remote(run_dir):
      run_dir = os.path.abspath(run_dir)  # orbax wants absolute paths
    self.directory = storage.join(run_dir, "checkpoints")
    self.with_data = with_data
    # OCDBT (one key-value database per checkpoint) is orbax's default and the fast path for
    # thousands of arrays; use_ocdbt=False writes one zarr array per leaf instead.
    handlers = {STATE: ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)}
    if with_data:
      handlers[DATA] = grain.checkpoint.CheckpointHandler()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True),
        item_handlers=handlers)

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, oldest first."""
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
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

