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

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from scale_optax import paths

Axes = Union[int, Sequence[int], None]
ReductionAxes = Union[None, paths.PathSpec]
DEFAULT_OUTPUT_LAYER = r'(^|/)lm_head(/|$)'


class NormalizeState(NamedTuple):
  """``column_normalize`` and ``row_normalize`` keep no state."""


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


def fan_in_axes(tree: Any, reduction_axes: ReductionAxes = None) -> Any:
  """Returns the fan-in axes of every leaf of ``tree`` (None where skipped).

  Args:
    tree: parameters or updates.
    reduction_axes: None for the Flax defaults (rank 2: axis 0; rank < 2:
      skipped; rank >= 3: an error naming the leaf), or a pytree / callable
      ``fn(path, leaf)`` giving, per leaf, an int or tuple of ints (None falls
      back to the default).

  Returns:
    A list with, for each leaf in flattening order, a sorted tuple of axes or
    None.
  """
  if reduction_axes is None:
    return [_default_axes(p, x) for p, x in paths.leaves_with_paths(tree)]
  return [_canonical_axes(p, x, a) for p, x, a in
          paths.resolve(reduction_axes, tree, 'reduction_axes')]


# XLA:CPU reduces a wide matrix over its leading (fan-in) axis far below memory
# bandwidth: the column sums of squares of a [512, 32000] LM head (LLaMA-60M),
# a YNNPACK fusion in jaxlib 0.10.2, run at under 1 GB/s, against 20-30 GB/s
# when accumulated one row at a time (benchmarks/update_speed.py); up to about
# 8K kept columns the plain reduction is fast. So a leaf that reduces over its
# leading axes and keeps at least this many elements is summed row by row, but
# only where that cannot cost an all-gather: when the computation is lowered
# for CPU (``jax.lax.platform_dependent``; GPU and TPU always get the plain
# reduction) and the CPU backend has a single device (a loop over a sharded
# fan-in axis would gather the whole leaf on every device).
_CPU_ROW_LOOP_MIN_KEPT = 16384


def _single_cpu_device() -> bool:
  try:
    return len(jax.devices('cpu')) == 1
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS without cpu).
    return False


def _mean_square(g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``mean(g ** 2, axis=axes, keepdims=True)`` for float32 ``g``."""

  def plain(x):
    return jnp.mean(jnp.square(x), axis=axes, keepdims=True)

  n_lead = len(axes)
  rows = math.prod(g.shape[:n_lead])
  kept = math.prod(g.shape[n_lead:])
  if (axes != tuple(range(n_lead)) or kept < _CPU_ROW_LOOP_MIN_KEPT
      or not _single_cpu_device()):
    return plain(g)

  def row_loop(x):
    x2 = x.reshape(rows, kept)

    def add_row(i, acc):
      row = jax.lax.dynamic_index_in_dim(x2, i, 0, keepdims=False)
      return acc + row * row

    # Eight rows an iteration: measured about 30% faster than one row on a
    # loaded 2-core machine (same summation order).
    total = jax.lax.fori_loop(0, rows, add_row, jnp.zeros((kept,), x.dtype),
                              unroll=8)
    return (total / rows).reshape((1,) * n_lead + x.shape[n_lead:])

  return jax.lax.platform_dependent(g, cpu=row_loop, default=plain)


def _rms_normalize(eps: float, reduction_axes: ReductionAxes,
                   pick_axes: Callable[[int, tuple[int, ...]], tuple[int, ...]]
                   ) -> optax.GradientTransformation:
  """Divides every matrix leaf by its RMS over ``pick_axes(ndim, fan_in)``."""

  def init_fn(params):
    fan_in_axes(params, reduction_axes)  # Fails here, not at the first step.
    return NormalizeState()

  def update_fn(updates, state, params=None):
    del params
    axes = iter(fan_in_axes(updates, reduction_axes))

    def normalize(g, fan_in):
      if fan_in is None:
        return g
      g32 = g.astype(jnp.float32)
      ms = _mean_square(g32, pick_axes(g.ndim, fan_in))
      return (g32 / jnp.maximum(jnp.sqrt(ms), eps)).astype(g.dtype)

    updates = jax.tree.map(lambda g: normalize(g, next(axes)), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def column_normalize(eps: float = 1e-8,
                     reduction_axes: ReductionAxes = None
                     ) -> optax.GradientTransformation:
  r"""Normalizes each output unit's update by its RMS over the unit's inputs.

  For a matrix leaf :math:`G` with fan-in axes :math:`I` (axis 0 of a Flax
  ``Dense`` kernel ``[in, out]`` and of an ``Embed`` table ``[vocab, d]``),

  .. math::
    s_j = \max\left(\sqrt{\tfrac{1}{|I|} \textstyle\sum_{i \in I} G_{ij}^2},
                    \epsilon\right), \qquad C(G)_{ij} = G_{ij} / s_j ,

  one scale per output unit :math:`j`: after it every nonzero unit has RMS 1
  over its fan-in. The mean of squares is accumulated in float32 and the
  update keeps the gradient's dtype. Leaves of rank 0 and 1 pass through.

  Args:
    eps: lower clamp of the RMS; an all-zero unit stays zero.
    reduction_axes: the fan-in axes. None means the Flax defaults: axis 0 for
      rank-2 leaves, and a ``ValueError`` naming the leaf for rank >= 3 leaves,
      whose axes are ambiguous. Otherwise a pytree (the parameters' structure
      or a prefix of it) or a callable ``fn(path: str, leaf)`` giving an int,
      a tuple of ints, or None (the default) per leaf.

  Returns:
    The corresponding ``optax.GradientTransformation`` (stateless).

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025 (SCALE's column-wise
    normalization, Algorithm 1)
  """
  return _rms_normalize(eps, reduction_axes, lambda ndim, fan_in: fan_in)


def row_normalize(eps: float = 1e-8,
                  reduction_axes: ReductionAxes = None
                  ) -> optax.GradientTransformation:
  r"""Normalizes each input unit's update by its RMS over the outputs.

  The ablation of :func:`column_normalize` studied in the paper (its Figure 3):
  the RMS is taken over the axes that are *not* fan-in axes,
  :math:`r_i = \max(\sqrt{\mathrm{mean}_j G_{ij}^2}, \epsilon)`,
  :math:`R(G)_{ij} = G_{ij} / r_i`. ``reduction_axes`` names the fan-in axes,
  exactly as for :func:`column_normalize`.

  Args:
    eps: lower clamp of the RMS.
    reduction_axes: the fan-in axes, as in :func:`column_normalize`.

  Returns:
    The corresponding ``optax.GradientTransformation`` (stateless).

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  return _rms_normalize(
      eps, reduction_axes,
      lambda ndim, fan_in: tuple(a for a in range(ndim) if a not in fan_in))


def _validate_momentum(momentum: Any) -> None:
  if isinstance(momentum, numbers.Real) and not 0.0 <= momentum < 1.0:
    raise ValueError(f'momentum must be in [0, 1), got {momentum}.')


def output_layer_mask(output_layer: paths.PathSpec
                      ) -> Callable[[Any], Any]:
  """Returns a mask function selecting the output layer's matrix leaves.

  Args:
    output_layer: a regular expression searched in each leaf's '/'-joined path,
      a callable ``fn(path: str, leaf) -> bool``, or a boolean pytree with the
      parameters' structure.

  Returns:
    ``mask_fn(params)``: a boolean pytree, True on selected leaves of rank >= 2.
    It raises a ``ValueError`` listing the matrix paths it saw when nothing is
    selected.
  """

  def mask_fn(params):
    resolved = paths.resolve(output_layer, params, 'output_layer',
                             complete=True)
    picked = [bool(v) and x.ndim >= 2 for _, x, v in resolved]
    if resolved and not any(picked):
      seen = [paths.path_str(p) for p, x, _ in resolved if x.ndim >= 2]
      raise ValueError(
          f'output_layer={output_layer!r} selects no matrix parameter. The '
          f'matrix parameters are: {seen}.')
    picked = iter(picked)
    return jax.tree.map(lambda _: next(picked), params)

  return mask_fn


def output_layer_momentum(momentum: float = 0.9,
                          output_layer: paths.PathSpec = DEFAULT_OUTPUT_LAYER,
                          accumulator_dtype: Optional[Any] = None
                          ) -> optax.GradientTransformation:
  r"""Momentum (an EMA without debiasing) on the output layer only.

  On the selected leaves :math:`M_t = \beta M_{t-1} + (1 - \beta) G_t` and the
  update is :math:`M_t`; every other leaf passes through unchanged and holds
  no state. Built as ``optax.masked(optax.ema(beta, debias=False), mask)``.

  Args:
    momentum: :math:`\beta`, in [0, 1).
    output_layer: which leaves get momentum (see :func:`output_layer_mask`);
      the default matches the path component ``lm_head``.
    accumulator_dtype: dtype of :math:`M`; None keeps the parameters' dtype.

  Returns:
    The corresponding ``optax.GradientTransformation``.

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  _validate_momentum(momentum)
  return optax.masked(
      optax.ema(momentum, debias=False, accumulator_dtype=accumulator_dtype),
      output_layer_mask(output_layer))
