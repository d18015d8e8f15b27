"""Checkpoints with orbax: params, optimizer state, step, RNG and data position.

Each checkpoint is an orbax ``Composite`` of two items: ``state`` (a pytree of
sharded arrays, saved asynchronously by every process) and ``data`` (the grain
iterator's position, one JSON file per process, written before ``save``
returns). Restores place every array with the sharding of the given abstract
tree, so a checkpoint restores onto a mesh of a different shape.

Crash safety:

- Atomic commit. Orbax writes step ``N`` into ``N.orbax-checkpoint-tmp`` and
  renames it to ``N`` when every item is written, so a save cut short (the
  process killed, the machine preempted) is never listed as a step; leftover
  temporary folders are deleted when the next run opens the folder.
- Integrity. Just before the rename every file of the checkpoint is listed
  with its size and SHA-256 in ``N/integrity.json`` (see ``integrity.py``:
  orbax itself restores flipped array bytes silently). ``restore`` verifies it
  first: a missing, truncated or altered file is a
  :class:`CheckpointCorruptError` naming the step and the files.
- Fallback. :meth:`Checkpointer.restore_latest` tries the newest step, then
  older ones, warning about each corrupt one and moving it aside to
  ``<checkpoints>.corrupt/``; when none can be restored it raises instead of
  silently starting from scratch. Only damage counts as corrupt (see
  :meth:`Checkpointer.restore`): any other error propagates and moves
  nothing. A checkpoint of another model, optimizer or process count
  (:class:`CheckpointMismatchError`) is refused at once, with no fallback.
- Donation. ``save`` copies (or, on CPU, pins: a buffer with a live host view
  is never donated) every array to host memory before it returns, so the
  train step may donate and overwrite the state while the write goes on in
  the background.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp

from scale_optax import path_str
from . import distributed
from .integrity import MANIFEST, ManifestTemporaryPath, verify_manifest

from .errors import RunError

log = logging.getLogger(__name__)

# What reading a damaged or incomplete checkpoint raises: TensorStore reports
# a missing, truncated or undecodable file as ValueError ('NOT_FOUND: ...',
# 'DATA_LOSS: ...', 'OUT_OF_RANGE: ...'), orbax and grain a garbled JSON file
# as json.JSONDecodeError (a ValueError) and a missing one as ValueError or
# OSError.
_DAMAGE_ERRORS = (OSError, ValueError)


class CheckpointError(RunError):
  """A checkpoint could not be restored; the message names its step."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint is damaged or unreadable (an older one may still be good)."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds other shapes or paths than this run (another model),
  or was saved by another number of processes."""


def _damage(e: Optional[BaseException]) -> Optional[BaseException]:
  """``e``, or the error it was raised from, if that is a damaged file's.

  Orbax re-raises a failed array read as a bare ``Exception`` from
  TensorStore's error. None for anything else (TypeError, AttributeError,
  ...): a bug, which keeps its traceback.
  """
  while e is not None and not isinstance(e, _DAMAGE_ERRORS):
    e = e.__cause__
  return e


def _short(e: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message``, cut (TensorStore errors are huge)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  if len(text) > limit:
    text = text[:limit] + '...'
  return f'{type(e).__name__}: {text}'


def set_aside(directory: str | os.PathLike, label: str) -> Optional[pathlib.Path]:
  """Renames ``directory`` to ``<directory>.<label>-<UTC time>`` if it exists
  and is not empty; returns the new path (None if there was nothing)."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir() or not any(directory.iterdir()):
    return None
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  target = directory.with_name(f'{directory.name}.{label}-{stamp}')
  n = 1
  while target.exists():
    n += 1
    target = directory.with_name(f'{directory.name}.{label}-{stamp}-{n}')
  directory.rename(target)
  return target


def _scanned(shapes: dict[str, Any]) -> Optional[bool]:
  """Whether the params in ``shapes`` (path -> shape) have the scanned layer
  layout (``params/layers/attn/...``), the unrolled one
  (``params/layers/0/attn/...``), or neither (None)."""
  for path in shapes:
    parts = path.split('/')
    if parts[:2] == ['params', 'layers'] and len(parts) > 2:
      return not parts[2].isdigit()
  return None


class Checkpointer:
  """Saves and restores training state under ``<run_dir>/checkpoints``."""

  def __init__(self, directory: str | pathlib.Path, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        temporary_path_class=ManifestTemporaryPath,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any,
           force: bool = True) -> bool:
    """Starts an (asynchronous) save of ``state`` and the iterator position.

    When it returns, the arrays are on the host and the iterator position is
    written: both may change. It waits for the previous save to finish first.
    """
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def verify(self, step: int) -> bool:
    """Checks step ``step`` against its manifest.

    Returns:
      True when verified, False when the checkpoint has no manifest.

    Raises:
      CheckpointCorruptError: naming the step and the damaged files.
    """
    problems = verify_manifest(self.directory / str(step))
    if problems:
      shown = '; '.join(problems[:8])
      more = f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''
      raise CheckpointCorruptError(
          f'checkpoint at step {step} in {self.directory} is corrupt: '
          f'{shown}{more}.')
    return problems is not None

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any) -> Any:
    """Restores step ``step`` onto ``abstract_state``'s shapes and shardings.

    The data iterator is moved to the saved position in place.

    Raises:
      CheckpointCorruptError: naming the step, when the checkpoint fails its
        integrity check, or has no manifest and reading it fails as a damaged
        file does.
      CheckpointMismatchError: when its arrays do not match
        ``abstract_state`` (the mismatching paths are listed: a checkpoint of
        another model or optimizer is refused).

    Any other error propagates with its traceback, including a read error of
    a checkpoint that passed its integrity check: its files are as
    committed, so the error is not damage, and the checkpoint must not be
    set aside as corrupt.
    """
    verified = self.verify(step)
    if not verified:
      log.warning('checkpoint at step %d in %s has no %s: restored without an '
                  'integrity check.', step, self.directory, MANIFEST)
    try:
      self.check_compatible(step, abstract_state)
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # pylint: disable=broad-except
      damage = _damage(e)
      if verified or damage is None:
        raise
      raise CheckpointCorruptError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: '
          f'{_short(damage)}') from e
    return restored['state']

  def restore_latest(self, abstract_state: Any, data_iterator: Any,
                     warn: Optional[Callable[[str], None]] = None
                     ) -> Optional[tuple[int, Any]]:
    """Restores the newest restorable step: ``(step, state)``, or None when
    there are no checkpoints at all.

    A step that is corrupt or unreadable is reported through ``warn`` (default:
    ``log.warning``), moved aside to ``<checkpoints>.corrupt/`` (so it is
    neither tried again nor in the way of the next save of that step), and
    the next older step is tried.

    Raises:
      CheckpointMismatchError: at once, for a checkpoint of another model.
      CheckpointError: when checkpoints exist but none can be restored,
        listing each step tried and why. The run does not start from scratch
        by itself: the user decides (``--no-resume`` sets them aside).
    """
    warn = warn or log.warning
    failures: list[tuple[int, CheckpointCorruptError]] = []
    for step in reversed(self.steps()):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointCorruptError as e:
        warn(f'{e} Trying an older checkpoint.')
        failures.append((step, e))
        continue
      if failures:
        self._move_corrupt([s for s, _ in failures], warn)
      return step, state
    if not failures:
      return None
    tried = '; '.join(str(e) for _, e in failures)
    raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored (tried steps '
        f'{", ".join(str(s) for s, _ in failures)}): {tried} Not starting '
        f'from scratch: repair or remove them, or pass --no-resume to set '
        f'them aside and start over.')

  def _move_corrupt(self, steps: list[int],
                    warn: Callable[[str], None]) -> None:
    if jax.process_index() == 0:
      target = self.directory.with_name(self.directory.name + '.corrupt')
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest = target / str(step)
        n = 1
        while dest.exists():
          n += 1
          dest = target / f'{step}-{n}'
        shutil.move(os.fspath(self.directory / str(step)), os.fspath(dest))
        warn(f'moved the corrupt checkpoint of step {step} to {dest}.')
    # Every process found the same steps corrupt (the same files, verified
    # the same way), so every process is here.
    distributed.sync_processes('checkpoint_move_corrupt')
    self.manager.reload()

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises unless the saved arrays have the paths and shapes expected and
    the data positions were saved by as many processes as this run has.

    Reading the metadata of a damaged checkpoint raises what orbax raises
    (see ``restore``).
    """
    self._check_process_count(step)
    saved_tree = self.manager.item_metadata(step)['state']
    if saved_tree is None:
      raise CheckpointCorruptError(
          f'checkpoint at step {step} in {self.directory} has no state item.')
    shapes = lambda tree: {path_str(p): tuple(x.shape) for p, x in
                           jax.tree_util.tree_flatten_with_path(tree)[0]}
    saved, expected = shapes(saved_tree), shapes(abstract_state)
    saved_scan, expected_scan = _scanned(saved), _scanned(expected)
    if None not in (saved_scan, expected_scan) and saved_scan != expected_scan:
      raise CheckpointMismatchError(
          f'checkpoint at step {step} in {self.directory} holds '
          f'{"scanned" if saved_scan else "unrolled"} layers '
          f'(model.scan_layers={str(saved_scan).lower()}), this run has '
          f'model.scan_layers={str(expected_scan).lower()}: resume refused. '
          f'Set model.scan_layers={str(saved_scan).lower()} to resume it, or '
          f'use another train.run_dir or --no-resume.')
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
      raise CheckpointMismatchError(
          f'checkpoint at step {step} in {self.directory} does not match this '
          f'run\'s model and optimizer, resume refused: {shown}{more}. Use '
          f'another train.run_dir or --no-resume.')

  def _check_process_count(self, step: int) -> None:
    # grain saves one data position per process, named by index and count.
    data = self.directory / str(step) / 'data'
    count = jax.process_count()
    if (data / f'process_{jax.process_index()}-of-{count}.json').exists():
      return
    saved = sorted({name.split('-of-')[1].removesuffix('.json') for name in
                    (p.name for p in data.glob('process_*-of-*.json'))})
    if saved:
      raise CheckpointMismatchError(
          f'checkpoint at step {step} in {self.directory} was saved by '
          f'{" or ".join(saved)} process(es), this run has {count}: resume '
          f'refused (the data position is saved per process). Resume with '
          f'{saved[0]} process(es), or use another train.run_dir or '
          f'--no-resume.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
