"""Host batches onto the devices: the global batch, and reading ahead.

:func:`global_batch` makes the global arrays of a batch from this process's
rows. The loop calls :meth:`DevicePrefetch.prefetch` right after dispatching
step ``N``: the host reads and transfers batch ``N + 1`` while the devices run
step ``N``. The position it reports for a checkpoint (``get_state``) is the
one before the batch read ahead, so a checkpoint taken after step ``N``
resumes at batch ``N + 1`` exactly as without read-ahead.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import grain
import jax
import numpy as np

from . import mesh as mesh_lib
from .state import TrainSetup


def global_batch(setup: TrainSetup, local: dict[str, np.ndarray]
                 ) -> dict[str, jax.Array]:
  """The global batch whose rows on this process are ``local``.

  The transfer is asynchronous. With one process the local rows are the
  whole batch: one ``device_put`` of all its arrays, less host work than
  assembling each array from process-local parts (this runs every step).
  """
  sharding = mesh_lib.batch_sharding(setup.mesh, setup.config.mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  rows = setup.config.data.batch_size
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (rows,) + v.shape[1:]) for k, v in local.items()}


class DevicePrefetch(grain.DatasetIterator):
  """Wraps a host-batch iterator; ``next()`` gives device batches.

  Args:
    parent: a grain ``DatasetIterator`` of host (numpy) batches.
    to_device: turns a host batch into device arrays (e.g. the global batch
      of this process's rows); its transfer is asynchronous.
  """

  def __init__(self, parent: grain.DatasetIterator,
               to_device: Callable[[Any], dict[str, jax.Array]]):
    super().__init__(parent)
    self._to_device = to_device
    self._ahead: Optional[tuple[Any, dict[str, jax.Array]]] = None

  def prefetch(self) -> None:
    """Reads the next batch and starts its transfer (once; idempotent)."""
    if self._ahead is None:
      state = self._parent.get_state()
      self._ahead = (state, self._to_device(next(self._parent)))

  def __next__(self) -> dict[str, jax.Array]:
    self.prefetch()
    _, batch = self._ahead
    self._ahead = None
    return batch

  def get_state(self) -> Any:
    """The position after the last batch returned by ``next()``."""
    return self._ahead[0] if self._ahead else self._parent.get_state()

  def set_state(self, state: Any) -> None:
    self._ahead = None
    self._parent.set_state(state)
