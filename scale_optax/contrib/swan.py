r"""SWAN: stateless normalization and whitening of each matrix's gradient.

Transcribed from the paper (no code is released). For a kernel ``[in, out]``
(torch's :math:`G` is its transpose, ``[m, n] = [out, in]``):

.. math::
  \text{GradNorm:}\quad \tilde G = \frac{G - \mu}{s + \epsilon},\quad
  \mu, s \text{ the mean and population std of each output unit over its
  inputs}; \\
  \text{GradWhitening:}\quad X = \tilde G / \lVert \tilde G \rVert_F,\
  Y_0 = X X^\top,\ Z_0 = I,\ T = 3I - Z_k Y_k,\ Y_{k+1} = \beta Y_k T,\
  Z_{k+1} = \beta T Z_k,\ D = Z_K X,

on the smaller Gram side (:math:`X X^\top` for :math:`m \le n`, otherwise
:math:`X^\top X` with the result transposed back), :math:`W \leftarrow W -
\eta D`. Embeddings, LM head and norms take Adam.

Choices the paper leaves open, each a parameter here: the statistics' axis
(inputs, i.e. a Flax kernel's axis -2), population std with :math:`\epsilon = 10^{-8}`
added to it, :math:`K = 10` Newton-Schulz steps of step size
:math:`\beta = 1/2`, the Frobenius pre-normalization, no rescaling after the
whitening, no weight decay. Centring makes :math:`\tilde G` orthogonal to the
ones vector, so the Gram matrix is singular for square and tall matrices;
Newton-Schulz leaves that direction near 0 (an exact inverse square root does
not exist).

Reference: Ma et al., `SWAN: SGD with Normalization and Whitening Enables
Stateless LLM Training <https://arxiv.org/abs/2412.13148>`_, 2024.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from scale_optax.contrib import low_rank


def grad_norm(g: jax.Array, eps: float = 1e-8, axis: int = -2) -> jax.Array:
  """Centres and scales ``g`` over ``axis`` (the inputs of a Flax kernel)."""
  mean = jnp.mean(g, axis=axis, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(g - mean), axis=axis, keepdims=True))
  return (g - mean) / (std + eps)


def whiten(g: jax.Array, ns_steps: int = 10, beta: float = 0.5) -> jax.Array:
  """``(X X^T)^{-1/2} X`` for ``X = g / ||g||`` by coupled Newton-Schulz.

  ``g`` is a Flax kernel ``[..., in, out]`` (leading axes: a stack of
  kernels, each whitened alone); the Gram matrix is taken on its smaller
  side.
  """
  x = g.astype(jnp.float32)
  x = x / jnp.linalg.norm(x, axis=(-2, -1), keepdims=True)
  t_ = lambda y: jnp.swapaxes(y, -1, -2)
  # torch's m <= n is out <= in: the Gram of the output side, X_K^T X_K.
  flip = x.shape[-1] <= x.shape[-2]
  a = t_(x) if flip else x            # a is [..., small, large].
  eye = jnp.broadcast_to(jnp.eye(a.shape[-2], dtype=a.dtype),
                         (*a.shape[:-1], a.shape[-2]))

  def body(_, yz):
    y, z = yz
    t = 3 * eye - z @ y
    return beta * y @ t, beta * t @ z
  _, z = jax.lax.fori_loop(0, ns_steps, body, (a @ t_(a), eye))
  d = z @ a
  return (t_(d) if flip else d).astype(g.dtype)


def scale_by_swan(ns_steps: int = 10, beta: float = 0.5, eps: float = 1e-8,
                  axis: int = -2) -> optax.GradientTransformation:
  r"""SWAN's matrix step: GradNorm then GradWhitening (stateless).

  .. math::
    D = \mathrm{whiten}\Big(\frac{G - \mu}{s + \epsilon}\Big),

  see the module docstring for both operators and the open choices.

  Args:
    ns_steps: Newton-Schulz iterations.
    beta: the Newton-Schulz step size.
    eps: added to the standard deviation.
    axis: the axis the GradNorm statistics reduce over (-2: a Flax kernel's
      inputs, i.e. one mean and std per output unit).

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.scale_by_swan(ns_steps=30)
    >>> g = {'w': jax.random.normal(jax.random.key(0), (16, 4))}
    >>> d, _ = tx.update(g, tx.init(g))
    >>> d['w'].shape
    (16, 4)
    >>> # The 4 output units come out orthonormal.
    >>> print(jnp.round(jnp.linalg.eigvalsh(d['w'].T @ d['w']), 2))
    [1. 1. 1. 1.]

  References:
    Ma et al., `SWAN <https://arxiv.org/abs/2412.13148>`_, 2024
  """
  def update_fn(updates, state, params=None):
    del params
    out = jax.tree.map(lambda g: whiten(grad_norm(g, eps, axis), ns_steps,
                                        beta), updates)
    return out, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def swan(
    learning_rate: optax.ScalarOrSchedule,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    ns_steps: int = 10,
    beta: float = 0.5,
    eps: float = 1e-8,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    low_rank_params: low_rank.LowRankSpec = low_rank.LOW_RANK_PARAMS,
) -> optax.GradientTransformation:
  r"""SWAN on the attention and MLP kernels, Adam on the rest.

  .. math::
    W \leftarrow W - \eta\, \mathrm{whiten}(\mathrm{GradNorm}(G))

  for the kernels :func:`low_rank_labels` selects (GaLore's group), and
  ``optax.adam`` (eps after bias correction) with ``adam_learning_rate`` for
  embeddings, LM head and norms. No weight decay (the paper uses none). The
  learning rates are not published.

  Args:
    learning_rate: :math:`\eta` for the whitened kernels.
    adam_learning_rate: Adam's rate (None: ``learning_rate``).
    ns_steps: see :func:`scale_by_swan`.
    beta: see :func:`scale_by_swan`.
    eps: see :func:`scale_by_swan`.
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps: Adam's epsilon.
    low_rank_params: which 2-D leaves are whitened, see
      :func:`low_rank_labels`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> params = {'mlp': {'kernel': jnp.ones((4, 6))}, 'norm': jnp.ones(4)}
    >>> tx = contrib.swan(1e-3)
    >>> grads = {'mlp': {'kernel': jnp.arange(24.).reshape(4, 6)},
    ...          'norm': jnp.ones(4)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)

  References:
    Ma et al., `SWAN: SGD with Normalization and Whitening Enables Stateless
    LLM Training <https://arxiv.org/abs/2412.13148>`_, 2024
  """
  matrices = optax.chain(scale_by_swan(ns_steps, beta, eps),
                         optax.scale_by_learning_rate(learning_rate))
  rest = optax.adam(learning_rate if adam_learning_rate is None
                    else adam_learning_rate, b1=adam_b1, b2=adam_b2,
                    eps=adam_eps)
  return low_rank.partition_low_rank(matrices, rest, low_rank_params)
