"""Fira's norm-growth limiter (also APOLLO's), one scalar per tensor.

.. math::
  r_t = \\frac{\\lVert U_t \\rVert_F}{s_{t-1} + 10^{-8}}, \\qquad
  U_t \\leftarrow \\frac{U_t}{\\max(r_t, \\gamma) / \\gamma}, \\qquad
  s_t = \\lVert U_t \\rVert_F \\ \\text{(after the limit)},

skipped on the first step (which only records :math:`s_1`). With
:math:`\\gamma = 1.01` an update's norm may grow by at most 1% a step.

Reference: Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs
Under Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _matrix_axes(u: jax.Array) -> tuple[int, ...]:
  """The axes one norm covers: the last two (one norm per matrix of a
  stack), or all of a vector."""
  return (-2, -1) if u.ndim >= 2 else tuple(range(u.ndim))


def limit_norm_growth(u: jax.Array, prev_norm: jax.Array, first: jax.Array,
                      gamma: float) -> tuple[jax.Array, jax.Array]:
  """Returns ``(u limited, its norm)``; ``first``: only record the norm.

  One norm per matrix (``prev_norm`` has ``u``'s leading axes).
  """
  axes = _matrix_axes(u)
  norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=axes))
  ratio = norm / (prev_norm.astype(jnp.float32) + 1e-8)
  divisor = jnp.where(first, 1.0, jnp.maximum(ratio, gamma) / gamma)
  scale = jnp.expand_dims(divisor, axes) if axes else divisor
  return ((u / scale.astype(u.dtype)).astype(u.dtype),
          (norm / divisor).astype(prev_norm.dtype))


class NormGrowthLimiterState(NamedTuple):
  """The step count and, per leaf, the previous update's norm (0-d)."""
  count: jax.Array
  norm: Any


def scale_by_norm_growth_limiter(gamma: float = 1.01
                                 ) -> optax.GradientTransformation:
  r"""Limits the growth of each leaf's update norm to a factor ``gamma``.

  .. math::
    U_t \leftarrow U_t \Big/ \frac{\max(\lVert U_t\rVert / (s_{t-1} +
    10^{-8}), \gamma)}{\gamma}, \qquad s_t = \lVert U_t \rVert,

  on every step but the first. The state holds one scalar per matrix (per
  leaf, or per matrix of a stack of kernels), in the leaf's dtype.

  Args:
    gamma: the largest allowed norm ratio between consecutive updates.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.scale_by_norm_growth_limiter(1.01)
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> _, s = tx.update({'w': jnp.array([3.0, 4.0])}, s)
    >>> u, s = tx.update({'w': jnp.array([6.0, 8.0])}, s)
    >>> print(round(float(jnp.linalg.norm(u['w'])), 4))  # 5 * 1.01
    5.05

  References:
    Chen et al., `Fira <https://arxiv.org/abs/2410.01623>`_, 2024.
  """
  def init_fn(params):
    return NormGrowthLimiterState(
        jnp.zeros([], jnp.int32),
        jax.tree.map(lambda p: jnp.zeros(p.shape[:-2] if p.ndim >= 2 else (),
                                         p.dtype), params))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0
    pairs = jax.tree.map(lambda u, n: limit_norm_growth(u, n, first, gamma),
                         updates, state.norm)
    # Split the pairs at the leaves of `updates` (a tree without leaves, all
    # masked out, stays as it is: jax.tree.transpose cannot take one).
    out = jax.tree.map(lambda _, pair: pair[0], updates, pairs)
    norm = jax.tree.map(lambda _, pair: pair[1], updates, pairs)
    return out, NormGrowthLimiterState(optax.safe_increment(state.count), norm)

  return optax.GradientTransformation(init_fn, update_fn)
