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

from scale_optax import path_str

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
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

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
        its arrays do not match ``abstract_state`` (the mismatching paths are
        listed: a checkpoint of another model or optimizer is refused).
    """
    self.check_compatible(step, abstract_state)
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

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises unless the saved arrays have the paths and shapes expected."""
    try:
      saved_tree = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} has unreadable '
          f'metadata: {type(e).__name__}: {e}') from e
    if saved_tree is None:
      raise CheckpointError(f'checkpoint at step {step} in {self.directory} '
                            f'has no state item.')
    shapes = lambda tree: {path_str(p): tuple(x.shape) for p, x in
                           jax.tree_util.tree_flatten_with_path(tree)[0]}
    saved, expected = shapes(saved_tree), shapes(abstract_state)
    order = lambda paths: sorted(paths, key=lambda p: (p.startswith('opt'), p))
    problems = [f'{p}: saved {saved[p]}, expected {expected[p]}'
                for p in order(saved.keys() & expected.keys())
                if saved[p] != expected[p]]
    problems += [f'{p}: missing from the checkpoint'
                 for p in order(expected.keys() - saved.keys())]
    problems += [f'{p}: in the checkpoint, not in this run'
                 for p in order(saved.keys() - expected.keys())]
    if problems:
      shown = '; '.join(problems[:12])
      more = f' (and {len(problems) - 12} more)' if len(problems) > 12 else ''
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} does not match this '
          f'run\'s model and optimizer, resume refused: {shown}{more}. Use '
          f'another train.run_dir or --no-resume.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
