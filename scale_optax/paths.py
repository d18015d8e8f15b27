"""Selecting parameter leaves by their path in the tree.

SCALE treats a few leaves differently from the rest (the output layer gets
momentum, biases and norm scales take the vector path, rank >= 3 kernels need
their fan-in axes named). Users say which leaves those are in one of these
ways, all resolved here:

* a regular expression, searched in the leaf's '/'-joined path
  (``'layers/3/attn/q_proj/kernel'``);
* a callable ``fn(path: str, leaf) -> value``;
* a pytree with the structure of the parameters (or a prefix of it) holding
  the value per leaf, or, as in Optax's masks, a callable ``fn(params)``
  returning such a pytree (a callable taking one argument).

Paths are computed from JAX key paths, so they are the same for plain dicts,
Flax linen ``FrozenDict`` and ``flax.nnx.State`` trees. The array inside a box
(a Flax ``nnx.Variable``, a linen ``nn.Partitioned``) sits behind an attribute
``value``; that last key is dropped, so a path is the same whether a
transformation sees the boxed tree (``nnx.Optimizer`` calls ``init`` on
``nnx.Variable`` leaves) or plain arrays (its ``update`` call).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Sequence, Union

import jax

PathSpec = Union[str, Callable[..., Any], Any]
KeyPath = tuple[Any, ...]


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _unbox(path: KeyPath) -> KeyPath:
  """Drops a last ``.value`` attribute: the array inside an nnx.Variable."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == 'value'):
    return path[:-1]
  return path


def path_str(path: KeyPath) -> str:
  """Returns the '/'-joined form of a JAX key path.

  A last attribute ``value`` (the array inside a Flax ``nnx.Variable`` or a
  linen ``nn.Partitioned`` box) is left out, so the path of a parameter does
  not depend on whether it is boxed.

  Args:
    path: a key path, as given by ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The path's keys joined by '/'.

  Examples:
    >>> import jax
    >>> import scale_optax
    >>> params = {'lm_head': {'kernel': 0.0}, 'layers': [{'bias': 0.0}]}
    >>> [scale_optax.path_str(p) for p, _ in
    ...  jax.tree_util.tree_flatten_with_path(params)[0]]
    ['layers/0/bias', 'lm_head/kernel']
  """
  return '/'.join(_key_name(k) for k in _unbox(path))


def leaves_with_paths(tree: Any) -> list[tuple[KeyPath, Any]]:
  """Flattens ``tree`` into ``(key_path, leaf)`` pairs, paths unboxed.

  ``MaskedNode`` placeholders (``optax.masked``) hold no leaf and vanish.
  """
  return [(_unbox(p), x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (bool, int)) or (
      isinstance(x, tuple) and all(isinstance(a, int) for a in x))


class PytreeSpec:
  """Per-leaf values given as a pytree, looked up by key-path prefix."""

  def __init__(self, tree: Any, what: str):
    self.what = what
    self.entries = {
        _unbox(p): x for p, x in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=_is_spec_leaf)[0]}

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


def _takes_params(fn: Callable[..., Any]) -> bool:
  """Whether ``fn`` is Optax's ``fn(params)`` rather than ``fn(path, leaf)``."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # Some builtins have no signature.
    return False
  try:
    signature.bind(None, None)
    return False
  except TypeError:
    pass
  try:
    signature.bind(None)
    return True
  except TypeError:
    return False


def resolve(spec: PathSpec, tree: Any, what: str, complete: bool = False
            ) -> list[tuple[KeyPath, Any, Any]]:
  """Evaluates ``spec`` on every leaf of ``tree``.

  Args:
    spec: a regular expression (the value is whether it matches the leaf's
      path), a callable ``fn(path_str, leaf)``, a pytree of values, or a
      callable ``fn(tree)`` returning such a pytree.
    tree: the parameters (or updates) to evaluate the spec on.
    what: the name of the argument, used in error messages.
    complete: also reject a pytree spec with entries that match no leaf (only
      meaningful when ``tree`` is the whole parameter tree, not a masked part).

  Returns:
    ``(key_path, leaf, value)`` for each leaf of ``tree``, paths unboxed.
  """
  items = leaves_with_paths(tree)
  if isinstance(spec, str):
    pattern = re.compile(spec)
    return [(p, x, pattern.search(path_str(p)) is not None) for p, x in items]
  if callable(spec) and not _takes_params(spec):
    return [(p, x, spec(path_str(p), x)) for p, x in items]
  table = PytreeSpec(spec(tree) if callable(spec) else spec, what)
  if complete:
    table.check_covers([p for p, _ in items])
  return [(p, x, table.lookup(p)) for p, x in items]
