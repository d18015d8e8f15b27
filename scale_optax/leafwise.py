"""A per-leaf map whose function returns several arrays (update and state)."""

from __future__ import annotations

from typing import Any, Callable

import jax


def map_leaves(fn: Callable[..., tuple[Any, ...]], num_outputs: int,
               tree: Any, *rest: Any) -> tuple[Any, ...]:
  """``fn(i, leaf, *rest_leaves)`` on every leaf, unzipped into trees.

  ``jax.tree.map`` would give one tree of tuples; a transformation that
  computes an update and several state arrays per leaf wants one tree per
  output instead.

  Args:
    fn: called with the leaf's index in flattening order, the leaf of
      ``tree`` and the matching leaves of ``rest``; returns ``num_outputs``
      values.
    num_outputs: how many values ``fn`` returns (the number of trees given
      back, also when ``tree`` has no leaves, e.g. all masked out).
    tree: the tree whose structure the outputs take (the updates).
    *rest: trees with ``tree``'s structure, or None (``fn`` then gets None).

  Returns:
    A tuple of ``num_outputs`` trees of ``tree``'s structure.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax.leafwise import map_leaves
    >>> twice, plus = map_leaves(lambda i, x, y: (2 * x, x + y), 2,
    ...                          {'a': jnp.ones(2)}, {'a': jnp.arange(2.)})
    >>> twice['a'], plus['a']
    (Array([2., 2.], dtype=float32), Array([1., 2.], dtype=float32))
  """
  leaves, treedef = jax.tree.flatten(tree)
  columns = [[None] * len(leaves) if t is None else treedef.flatten_up_to(t)
             for t in rest]
  results = [fn(i, *args) for i, args in enumerate(zip(leaves, *columns))]
  if not results:
    return (treedef.unflatten([]),) * num_outputs
  return tuple(treedef.unflatten(list(x)) for x in zip(*results))
