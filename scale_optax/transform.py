"""SCALE's building blocks, each an ``optax.GradientTransformation``.

* :func:`column_normalize`: divide each output unit's gradient by its RMS over
  the unit's inputs (SCALE's ``C``).
* :func:`row_normalize`: the same over the output axes instead (the paper's
  ablation, which destabilises training).
* :func:`output_layer_momentum`: an EMA of the gradient, kept for the output
  layer only, through :func:`optax.masked`.

Reference: Glentis, Li, Han, Hong, `A Minimalist Optimizer Design for LLM
Pretraining <https://arxiv.org/abs/2506.16659>`_, 2025.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from scale_optax import paths

Axes = Union[int, Sequence[int], None]
ReductionAxes = Union[None, paths.PathSpec]
DEFAULT_OUTPUT_LAYER = r'(^|/)lm_head(/|$)'
# Flax names every bias 'bias' (Dense, DenseGeneral, MultiHeadAttention,
# Conv); attention biases are [heads, head_dim], still one value per unit.
DEFAULT_VECTOR_MASK = r'(^|/)bias$'
# Rows summed per elementwise add in :func:`_sum_over_axis`.
_BLOCK = 8


def vector_flags(tree: Any, vector_mask: paths.PathSpec = DEFAULT_VECTOR_MASK,
                 complete: bool = False) -> list[bool]:
  """Whether each leaf takes SCALE's vector path (AdamW) instead of ``C``.

  Args:
    tree: parameters or updates.
    vector_mask: which leaves of rank >= 2 are vectors all the same: a regular
      expression on the '/'-joined path (default: the last component
      ``bias``), a callable ``fn(path: str, leaf) -> bool``, a boolean pytree
      (the parameters' structure or a prefix of it), or a callable
      ``fn(params)`` returning one; ``False`` for none. Leaves of rank 0 and
      1 are always vectors.
    complete: reject a pytree mask with entries that match no leaf.

  Returns:
    A list with one bool per leaf, in flattening order.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'attn': {'kernel': jnp.ones((8, 2, 4)),
    ...                    'bias': jnp.zeros((2, 4))},
    ...           'norm': {'scale': jnp.ones(8)}}
    >>> scale_optax.vector_flags(params)
    [True, False, True]
    >>> scale_optax.vector_flags(params, vector_mask=False)
    [False, False, True]
  """
  return [x.ndim < 2 or bool(v) for _, x, v in
          paths.resolve(vector_mask, tree, 'vector_mask', complete)]


def _matrix_paths(tree: Any, vectors: Sequence[bool]) -> list[str]:
  return [paths.path_str(p) for (p, _), v in
          zip(paths.leaves_with_paths(tree), vectors) if not v]


def _tied_flags(tree: Any, tied_embedding: paths.PathSpec,
                vectors: Sequence[bool]) -> list[bool]:
  """The leaves ``tied_embedding`` selects; raises if it selects no matrix."""
  tied = [bool(v) and not vec for (_, _, v), vec in
          zip(paths.resolve(tied_embedding, tree, 'tied_embedding'), vectors)]
  if not any(tied) and not all(vectors):
    raise ValueError(
        f'tied_embedding={tied_embedding!r} selects no matrix parameter. The '
        f'matrix parameters are: {_matrix_paths(tree, vectors)}.')
  return tied


def _default_axes(path: paths.KeyPath, leaf: Any) -> tuple[int, ...] | None:
  if leaf.ndim < 2:
    return None
  if leaf.ndim == 2:
    return (0,)
  raise ValueError(
      f'Parameter {paths.path_str(path)!r} has rank {leaf.ndim} (shape '
      f'{tuple(leaf.shape)}): its fan-in axes are ambiguous. Pass '
      f'reduction_axes= (a pytree or a callable of path and leaf) naming them.')


def _canonical_axes(path: paths.KeyPath, leaf: Any, axes: Axes
                    ) -> tuple[int, ...] | None:
  """The fan-in axes of ``leaf`` as sorted non-negative ints, or None to skip."""
  if axes is None:
    return _default_axes(path, leaf)
  if leaf.ndim < 2:
    return None
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = tuple(sorted(a % leaf.ndim for a in axes if -leaf.ndim <= a < leaf.ndim))
  if len(out) != len(axes) or len(set(out)) != len(out) or len(out) == leaf.ndim:
    raise ValueError(
        f'reduction_axes {axes} are not valid fan-in axes for parameter '
        f'{paths.path_str(path)!r} of shape {tuple(leaf.shape)}: they must be '
        f'distinct axes of the leaf, leaving at least one output axis.')
  return out


def _tied_axes(path: paths.KeyPath, leaf: Any, axes: Axes) -> tuple[int, ...]:
  """Axis 1 of a tied ``[vocab, d]`` table: one scale per vocabulary entry."""
  name = paths.path_str(path)
  if leaf.ndim != 2:
    raise ValueError(
        f'tied_embedding selects {name!r} of shape {tuple(leaf.shape)}: a '
        f'tied embedding table must be a [vocab, d] matrix.')
  if axes is not None and _canonical_axes(path, leaf, axes) != (1,):
    raise ValueError(
        f'reduction_axes {axes} for {name!r} conflict with tied_embedding, '
        f'which normalizes the table over axis 1 (one scale per vocabulary '
        f'entry, as an untied LM head).')
  return (1,)


def fan_in_axes(tree: Any, reduction_axes: ReductionAxes = None,
                tied_embedding: Optional[paths.PathSpec] = None) -> list[Any]:
  """Returns the fan-in axes of every leaf of ``tree`` (None where skipped).

  Args:
    tree: parameters or updates.
    reduction_axes: None for the Flax defaults (rank 2: axis 0; rank < 2:
      skipped; rank >= 3: an error naming the leaf), or a pytree, a callable
      ``fn(path: str, leaf)`` or a callable ``fn(params)`` returning a pytree,
      giving per leaf an int or a tuple of ints (None falls back to the
      default).
    tied_embedding: leaves that are a ``[vocab, d]`` embedding table also used
      as the output layer (logits ``h @ table.T``): their fan-in is axis 1
      (``d``), as for an untied head. A regular expression, a callable or a
      boolean pytree, like ``reduction_axes``.

  Returns:
    A list with, for each leaf in flattening order, a sorted tuple of axes or
    None.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'embed': {'embedding': jnp.ones((16, 4))},
    ...           'o': {'kernel': jnp.ones((2, 3, 4))},
    ...           'norm': {'scale': jnp.ones(4)}}
    >>> def axes(path, leaf):
    ...   return (0, 1) if path == 'o/kernel' else None
    >>> scale_optax.fan_in_axes(params, reduction_axes=axes,
    ...                         tied_embedding='embed')
    [(1,), None, (0, 1)]
  """
  items = paths.leaves_with_paths(tree)
  given = ([None] * len(items) if reduction_axes is None else
           [a for _, _, a in paths.resolve(reduction_axes, tree,
                                           'reduction_axes')])
  tied = ([False] * len(items) if tied_embedding is None else
          _tied_flags(tree, tied_embedding, [x.ndim < 2 for _, x in items]))
  return [_tied_axes(p, x, a) if t else _canonical_axes(p, x, a)
          for (p, x), a, t in zip(items, given, tied)]


def _sum_over_axis(x: jax.Array, axis: int) -> jax.Array:
  """``jnp.sum(x, axis, keepdims=True)`` as elementwise adds of row blocks.

  Each pass adds the ``_BLOCK`` interleaved slices of consecutive rows, so the
  data streams through memory in its own order on every backend, a shard of
  ``axis`` stays on its device until the last passes, and the result is the
  same sequence of additions whatever the backend or the number of devices.
  benchmarks/column_reduction.py compares it with ``jnp.sum`` and others.
  """
  while x.shape[axis] > 1:
    n = x.shape[axis]
    block = min(_BLOCK, n)
    q, rest = divmod(n, block)
    blocks = jax.lax.slice_in_dim(x, 0, q * block, axis=axis).reshape(
        x.shape[:axis] + (q, block) + x.shape[axis + 1:])
    total = functools.reduce(jnp.add, [
        jax.lax.index_in_dim(blocks, i, axis + 1, keepdims=False)
        for i in range(block)])
    if rest:
      total = jnp.concatenate(
          [total, jax.lax.slice_in_dim(x, q * block, n, axis=axis)], axis)
    # One pass at a time: fused into the next pass, a pass would read its
    # input in strides of a row instead of streaming it.
    x = jax.lax.optimization_barrier(total)
  return x


def mean_square(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``mean(x ** 2, axis=axes, keepdims=True)``, one formulation everywhere.

  Args:
    x: a floating-point array (the caller picks the accumulation dtype).
    axes: the axes to average over.

  Returns:
    The mean of squares, with the reduced axes kept as size 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> scale_optax.mean_square(jnp.array([[3.0, 1.0], [1.0, 3.0]]), (0,))
    Array([[5., 5.]], dtype=float32)
  """
  total = jnp.square(x)
  for axis in axes:
    total = _sum_over_axis(total, axis)
  return total / math.prod(x.shape[a] for a in axes)


def _compute_dtype(path: paths.KeyPath, g: jax.Array) -> Any:
  """float32 at least; integer gradients are normalized as floats too."""
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    raise ValueError(
        f'Parameter {paths.path_str(path)!r} has a complex gradient '
        f'({g.dtype}); SCALE normalizes real gradients only.')
  return jnp.promote_types(g.dtype, jnp.float32)


def _rms_normalize(eps: float, reduction_axes: ReductionAxes,
                   tied_embedding: Optional[paths.PathSpec],
                   pick_axes: Callable[[int, tuple[int, ...]], tuple[int, ...]]
                   ) -> optax.GradientTransformation:
  """Divides every matrix leaf by its RMS over ``pick_axes(ndim, fan_in)``."""

  def init_fn(params):
    # Fails here, not at the first step.
    fan_in_axes(params, reduction_axes, tied_embedding)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def normalize(path, g, fan_in):
      if fan_in is None:
        return g
      dtype = _compute_dtype(path, g)
      x = g.astype(dtype)
      rms = jnp.sqrt(mean_square(x, pick_axes(g.ndim, fan_in)))
      u = x / jnp.maximum(rms, eps)
      # Integer gradients give float updates, as optax.sgd's do.
      return u.astype(g.dtype) if jnp.issubdtype(g.dtype, jnp.floating) else u

    items = paths.leaves_with_paths(updates)
    axes = fan_in_axes(updates, reduction_axes, tied_embedding)
    leaves = [normalize(p, g, a) for (p, g), a in zip(items, axes)]
    return jax.tree.unflatten(jax.tree.structure(updates), leaves), state

  return optax.GradientTransformation(init_fn, update_fn)


def column_normalize(eps: float = 1e-8,
                     reduction_axes: ReductionAxes = None,
                     *,
                     tied_embedding: Optional[paths.PathSpec] = None
                     ) -> optax.GradientTransformation:
  r"""Normalizes each output unit's update by its RMS over the unit's inputs.

  For a matrix leaf :math:`G` with fan-in axes :math:`I` (axis 0 of a Flax
  ``Dense`` kernel ``[in, out]`` and of an ``Embed`` table ``[vocab, d]``),

  .. math::
    s_j = \max\left(\sqrt{\tfrac{1}{|I|} \textstyle\sum_{i \in I} G_{ij}^2},
                    \epsilon\right), \qquad C(G)_{ij} = G_{ij} / s_j ,

  one scale per output unit :math:`j`: after it every nonzero unit has RMS 1
  over its fan-in. The mean of squares is accumulated in float32 (or the
  gradient's wider dtype) and the update keeps a floating gradient's dtype;
  integer gradients give float32 updates. Leaves of rank 0 and 1 pass
  through.

  Args:
    eps: lower clamp of the RMS; an all-zero unit stays zero.
    reduction_axes: the fan-in axes. None means the Flax defaults: axis 0 for
      rank-2 leaves, and a ``ValueError`` naming the leaf for rank >= 3 leaves,
      whose axes are ambiguous. Otherwise a pytree (the parameters' structure
      or a prefix of it), a callable ``fn(path: str, leaf)``, or a callable
      ``fn(params)`` returning such a pytree, giving an int, a tuple of ints,
      or None (the default) per leaf.
    tied_embedding: an embedding table ``[vocab, d]`` that is also the output
      layer (logits ``h @ table.T``), as a regular expression on the path, a
      callable or a boolean pytree: normalized over axis 1, one scale per
      vocabulary entry, as an untied LM head is.

  Returns:
    The corresponding ``optax.GradientTransformation`` (stateless).

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> tx = scale_optax.column_normalize()
    >>> grads = {'kernel': jnp.array([[1.0, 0.0], [7.0, 0.0]]),
    ...          'bias': jnp.array([5.0, 0.0])}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates['kernel'])
    [[0.2 0. ]
     [1.4 0. ]]
    >>> print(updates['bias'])
    [5. 0.]

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025 (SCALE's column-wise
    normalization, Algorithm 1)
  """
  return _rms_normalize(eps, reduction_axes, tied_embedding,
                        lambda ndim, fan_in: fan_in)


def row_normalize(eps: float = 1e-8,
                  reduction_axes: ReductionAxes = None,
                  *,
                  tied_embedding: Optional[paths.PathSpec] = None
                  ) -> optax.GradientTransformation:
  r"""Normalizes each input unit's update by its RMS over the outputs.

  The ablation of :func:`column_normalize` studied in the paper (its Figure 3):
  the RMS is taken over the axes that are *not* fan-in axes,
  :math:`r_i = \max(\sqrt{\mathrm{mean}_j G_{ij}^2}, \epsilon)`,
  :math:`R(G)_{ij} = G_{ij} / r_i`. ``reduction_axes`` and
  ``tied_embedding`` name the fan-in axes exactly as for
  :func:`column_normalize`.

  Args:
    eps: lower clamp of the RMS.
    reduction_axes: the fan-in axes, as in :func:`column_normalize`.
    tied_embedding: a tied embedding table, as in :func:`column_normalize`.

  Returns:
    The corresponding ``optax.GradientTransformation`` (stateless).

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> tx = scale_optax.row_normalize()
    >>> g = jnp.array([[1.0, 7.0], [0.0, 0.0]])
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> print(updates)
    [[0.2 1.4]
     [0.  0. ]]

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  return _rms_normalize(
      eps, reduction_axes, tied_embedding,
      lambda ndim, fan_in: tuple(a for a in range(ndim) if a not in fan_in))


def _validate_momentum(momentum: Any) -> None:
  if isinstance(momentum, numbers.Real) and not 0.0 <= momentum < 1.0:
    raise ValueError(f'momentum must be in [0, 1), got {momentum}.')


def output_layer_mask(output_layer: paths.PathSpec = DEFAULT_OUTPUT_LAYER,
                      *,
                      vector_mask: paths.PathSpec = DEFAULT_VECTOR_MASK,
                      tied_embedding: Optional[paths.PathSpec] = None
                      ) -> Callable[[Any], Any]:
  """Returns a mask function selecting the output layer's matrix leaves.

  Args:
    output_layer: a regular expression searched in each leaf's '/'-joined path,
      a callable ``fn(path: str, leaf) -> bool``, a boolean pytree with the
      parameters' structure (or a prefix of it), or a callable ``fn(params)``
      returning one.
    vector_mask: leaves that are vectors (see :func:`vector_flags`); never
      selected.
    tied_embedding: a tied embedding table (see :func:`column_normalize`),
      selected as well: it is the output layer.

  Returns:
    ``mask_fn(params)``: a boolean pytree, True on selected matrix leaves. It
    raises a ``ValueError`` listing the matrix paths when nothing is selected,
    or when ``tied_embedding`` selects nothing.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'decoder': {'kernel': jnp.ones((4, 16)),
    ...                       'bias': jnp.zeros(16)},
    ...           'mlp': {'kernel': jnp.ones((4, 4))}}
    >>> scale_optax.output_layer_mask('decoder')(params)
    {'decoder': {'bias': False, 'kernel': True}, 'mlp': {'kernel': False}}
  """

  def mask_fn(params):
    vectors = vector_flags(params, vector_mask, complete=True)
    chosen = [bool(v) for _, _, v in
              paths.resolve(output_layer, params, 'output_layer',
                            complete=True)]
    if tied_embedding is not None:
      tied = _tied_flags(params, tied_embedding, vectors)
      chosen = [a or b for a, b in zip(chosen, tied)]
    picked = [c and not v for c, v in zip(chosen, vectors)]
    if picked and not any(picked):
      hint = ('' if tied_embedding is not None else
              ' If the logits use the embedding table (tied embeddings), '
              'pass tied_embedding= naming the table instead.')
      raise ValueError(
          f'output_layer={output_layer!r} selects no matrix parameter. The '
          f'matrix parameters are: {_matrix_paths(params, vectors)}.{hint}')
    picked = iter(picked)
    return jax.tree.map(lambda _: next(picked), params)

  return mask_fn


def output_layer_momentum(momentum: float = 0.9,
                          output_layer: paths.PathSpec = DEFAULT_OUTPUT_LAYER,
                          mu_dtype: Optional[Any] = None,
                          *,
                          vector_mask: paths.PathSpec = DEFAULT_VECTOR_MASK,
                          tied_embedding: Optional[paths.PathSpec] = None
                          ) -> optax.GradientTransformation:
  r"""Momentum (an EMA without debiasing) on the output layer only.

  On the selected leaves :math:`M_t = \beta M_{t-1} + (1 - \beta) G_t` and the
  update is :math:`M_t`; every other leaf passes through unchanged and holds
  no state. Built as ``optax.masked(optax.ema(beta, debias=False), mask)``.

  Args:
    momentum: :math:`\beta`, in [0, 1).
    output_layer: which leaves get momentum (see :func:`output_layer_mask`);
      the default matches the path component ``lm_head``.
    mu_dtype: dtype of :math:`M`; None keeps the parameters' dtype.
    vector_mask: leaves that are vectors and never get momentum (see
      :func:`vector_flags`).
    tied_embedding: a tied embedding table, which gets momentum as the output
      layer (see :func:`column_normalize`).

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> tx = scale_optax.output_layer_momentum(0.9)
    >>> grads = {'lm_head': {'kernel': jnp.ones((2, 3))},
    ...          'mlp': {'kernel': jnp.ones((2, 2))}}
    >>> state = tx.init(grads)
    >>> updates, state = tx.update(grads, state)
    >>> print(updates['lm_head']['kernel'][0], updates['mlp']['kernel'][0])
    [0.1 0.1 0.1] [1. 1.]

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  _validate_momentum(momentum)
  return optax.masked(
      optax.ema(momentum, debias=False, accumulator_dtype=mu_dtype),
      output_layer_mask(output_layer, vector_mask=vector_mask,
                        tied_embedding=tied_embedding))
