"""Checkpoints with orbax: params, optimizer state, step, RNG and data position.

Each checkpoint is an orbax ``Composite`` of two items: ``state`` (a pytree of
sharded arrays, saved asynchronously by every process) and ``data`` (the grain
iterator's position, one JSON file per process). Orbax writes into a temporary
folder and renames it when complete, so a checkpoint whose save was
interrupted is never listed as a step. Restores place every array with the
sharding of the given abstract tree, so a checkpoint restores onto a mesh of a
different shape.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names its step."""


class Checkpointer:
  """Saves and restores training state under ``<run_dir>/checkpoints``."""

  def __init__(self, directory: str | pathlib.Path, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any,
           force: bool = True) -> bool:
    """Starts an (asynchronous) save of ``state`` and the iterator position."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any) -> Any:
    """Restores step ``step`` onto ``abstract_state``'s shapes and shardings.

    The data iterator is moved to the saved position in place.

    Raises:
      CheckpointError: naming the step, when the checkpoint is unreadable or
        its arrays do not match ``abstract_state``.
    """
    try:
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # orbax raises many types; name the step.
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: '
          f'{type(e).__name__}: {e}') from e
    return restored['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
