"""The trainer's only uses of third-party behaviour that no public API offers.

Each function names the private detail it rests on. ``tests/train/
test_compat.py`` checks every one against the installed packages and fails
naming the package and its version when an upgrade changes it, so that an
upgrade breaks there, loudly, and not in a checkpoint or a data run. Each
function imports its package itself: the data pipeline does not load orbax,
nor the checkpoints TFDS.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import pathlib
from types import ModuleType
from typing import Callable

# orbax-checkpoint: the coroutine that writes array data in the background
# after ``save`` has returned (the arrays are on the host by then).
_ORBAX_ARRAY_WRITER = ('orbax.checkpoint._src.serialization.jax_array_handlers',
                       '_async_serialize_replica_slices')


def pre_commit_temporary_path(
    before_commit: Callable[[pathlib.Path, pathlib.Path], None]) -> type:
  """An orbax temporary-path class that runs a hook just before the commit.

  Orbax writes a checkpoint into ``<final>.orbax-checkpoint-tmp`` and renames
  it to ``<final>`` once every item is written. The returned class calls
  ``before_commit(temporary, final)`` (in a worker thread) right before that
  rename, for the step folder and for each item folder, so whatever the hook
  writes is committed atomically with the data.

  Rests on: ``CheckpointManagerOptions.temporary_path_class`` (deprecated in
  favour of ``atomicity_options``, which offers no hook) and
  ``orbax.checkpoint.path.atomicity.AtomicRenameTemporaryPath.finalize``
  being the coroutine that renames ``get()`` to ``get_final()``.
  """
  from orbax.checkpoint import path as ocp_path  # pylint: disable=g-import-not-at-top
  base = ocp_path.atomicity.AtomicRenameTemporaryPath

  class PreCommitTemporaryPath(base):

    async def finalize(self, *args, **kwargs):
      await asyncio.to_thread(before_commit,
                              pathlib.Path(os.fspath(self.get())),
                              pathlib.Path(os.fspath(self.get_final())))
      return await super().finalize(*args, **kwargs)

  return PreCommitTemporaryPath


def tfds_progress_bar_shown() -> bool:
  """Whether TFDS shows progress bars (``tfds.display_progress_bar`` sets it;
  TFDS has no getter).

  Rests on: ``tensorflow_datasets.core.utils.tqdm_utils._active``.
  """
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  return tqdm_utils._active  # pylint: disable=protected-access


def orbax_array_writer() -> tuple[ModuleType, str]:
  """``(module, name)`` of orbax's background writer of array data.

  For fault tests that hold a save in flight: replacing it with a slower
  coroutine delays the write while the arrays are already on the host.

  Rests on: ``orbax.checkpoint._src.serialization.jax_array_handlers.
  _async_serialize_replica_slices``, a coroutine function looked up by name
  at each call.
  """
  module = importlib.import_module(_ORBAX_ARRAY_WRITER[0])
  name = _ORBAX_ARRAY_WRITER[1]
  if not inspect.iscoroutinefunction(getattr(module, name, None)):
    raise AttributeError(f'{module.__name__}.{name} is not a coroutine '
                         f'function in this orbax-checkpoint.')
  return module, name
