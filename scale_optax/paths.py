"""Selecting parameter leaves by their path in the tree.

SCALE treats a few leaves differently from the rest (the output layer gets
momentum; rank >= 3 kernels need their fan-in axes named). Users say which
leaves those are in one of three ways, all resolved here:

* a regular expression, searched in the leaf's '/'-joined path
  (``'layers/3/attn/q_proj/kernel'``);
* a callable ``fn(path: str, leaf) -> value``;
* a pytree with the structure of the parameters (or a prefix of it) holding
  the value per leaf.

Paths are computed from JAX key paths, so they are the same for plain dicts,
Flax linen ``FrozenDict`` and ``flax.nnx.State`` trees. A pytree spec is
matched by key-path prefix, which keeps it valid when the parameter leaves are
wrapped (``nnx.Optimizer`` initialises its transformation with a state whose
leaves are ``nnx.Variable`` objects).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax

PathSpec = Union[str, Callable[[str, Any], Any], Any]
KeyPath = tuple[Any, ...]


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: KeyPath) -> str:
  """Returns the '/'-joined form of a JAX key path, e.g. ``'lm_head/kernel'``."""
  return '/'.join(_key_name(k) for k in path)


def leaves_with_paths(tree: Any) -> list[tuple[KeyPath, Any]]:
  """Flattens ``tree`` into ``(key_path, leaf)`` pairs (``MaskedNode``s vanish)."""
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (bool, int)) or (
      isinstance(x, tuple) and all(isinstance(a, int) for a in x))


class PytreeSpec:
  """Per-leaf values given as a pytree, looked up by key-path prefix."""

  def __init__(self, tree: Any, what: str):
    self.what = what
    self.entries = dict(
        jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)[0])

  def lookup(self, path: KeyPath) -> Any:
    for n in range(len(path), -1, -1):
      if path[:n] in self.entries:
        return self.entries[path[:n]]
    known = ', '.join(sorted(path_str(p) for p in self.entries)) or '(none)'
    raise ValueError(
        f'{self.what}: no entry for parameter {path_str(path)!r}; the given '
        f'pytree does not have the structure of the parameters. Its paths '
        f'are: {known}.')

  def check_covers(self, paths: Sequence[KeyPath]) -> None:
    """Raises if the spec has entries that match no parameter."""
    unused = [p for p in self.entries
              if not any(q[:len(p)] == p for q in paths)]
    if unused:
      raise ValueError(
          f'{self.what}: entries {sorted(path_str(p) for p in unused)} match '
          f'no parameter; the given pytree does not have the structure of the '
          f'parameters {sorted(path_str(p) for p in paths)}.')


def resolve(spec: PathSpec, tree: Any, what: str, complete: bool = False
            ) -> list[tuple[KeyPath, Any, Any]]:
  """Evaluates ``spec`` on every leaf of ``tree``.

  Args:
    spec: a regular expression (the value is whether it matches the leaf's
      path), a callable ``fn(path_str, leaf)``, or a pytree of values.
    tree: the parameters (or updates) to evaluate the spec on.
    what: the name of the argument, used in error messages.
    complete: also reject a pytree spec with entries that match no leaf (only
      meaningful when ``tree`` is the whole parameter tree, not a masked part).

  Returns:
    ``(key_path, leaf, value)`` for each leaf of ``tree``.
  """
  items = leaves_with_paths(tree)
  if isinstance(spec, str):
    pattern = re.compile(spec)
    return [(p, x, pattern.search(path_str(p)) is not None) for p, x in items]
  if callable(spec):
    return [(p, x, spec(path_str(p), x)) for p, x in items]
  table = PytreeSpec(spec, what)
  if complete:
    table.check_covers([p for p, _ in items])
  return [(p, x, table.lookup(p)) for p, x in items]


