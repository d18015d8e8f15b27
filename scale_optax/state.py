"""Counting the memory an optimizer's state holds."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def state_bytes(tree: Any) -> int:
  """Returns the bytes of every array leaf of ``tree``.

  Works on any Optax state (``MaskedNode`` placeholders hold nothing), on
  parameters, and on abstract trees from ``jax.eval_shape`` (leaves of
  ``jax.ShapeDtypeStruct``), so nothing needs to be allocated. Python scalars
  and other non-array leaves count zero.

  Args:
    tree: a pytree.

  Returns:
    The total ``size * itemsize`` over leaves that have a shape and a dtype.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'lm_head': {'kernel': jnp.zeros((512, 32000))},
    ...           'norm': {'scale': jnp.zeros(512)}}
    >>> state = jax.eval_shape(scale_optax.scale(1e-3).init, params)
    >>> scale_optax.state_bytes(state)  # Head momentum, Adam moments, counts.
    65540104
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(
          leaf.dtype).itemsize
  return total
