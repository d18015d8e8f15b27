"""SCALE and the variants of the paper's bottom-up study, as Optax chains.

Every optimizer here is the same chain with different parts:

.. code-block:: text

  momentum on the output layer   (optax.masked(optax.ema(beta, debias=False)))
  -> partition (matrix_or_vector):
       matrices: normalize (column | row | sign) -> decoupled weight decay
                 -> scale by the learning rate
       vectors:  AdamW (rank 0 and 1, and biases of any rank)

Reference: Glentis, Li, Han, Hong, `A Minimalist Optimizer Design for LLM
Pretraining <https://arxiv.org/abs/2506.16659>`_, 2025.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional

import jax
import optax

from scale_optax import adam
from scale_optax import paths
from scale_optax import transform

# Matches the token embedding and the LM head of the trainer's LLaMA (and of
# most Flax LLaMAs): the "momentum on the first and last layers" ablation.
FIRST_AND_LAST_LAYERS = r'(^|/)(embed|embedding|tok_embeddings|wte|lm_head)(/|$)'

_NORMALIZATIONS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'column': transform.column_normalize,
    'row': transform.row_normalize,
    'sign': lambda **_: optax.scale_by_sign(),
}

# The AdamW of the vector leaves: Optax's, or the official release's (epsilon
# before bias correction, see scale_optax.adam).
_VECTOR_ADAMS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'optax': optax.adamw,
    'authors': adam.authors_adamw,
}


def _check_nonnegative(name: str, value: Any) -> None:
  if isinstance(value, numbers.Real) and value < 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def matrix_or_vector(params: Any,
                     vector_mask: paths.PathSpec = transform.DEFAULT_VECTOR_MASK
                     ) -> Any:
  """Labels each leaf 'matrix' or 'vector', the partition :func:`scale` uses.

  Args:
    params: the parameters.
    vector_mask: leaves of rank >= 2 that are vectors all the same (default:
      those whose last path component is ``bias``); see
      :func:`scale_optax.vector_flags`. Leaves of rank 0 and 1 are vectors.

  Returns:
    A pytree of the parameters' structure holding 'matrix' or 'vector'.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'attn': {'kernel': jnp.ones((8, 2, 4)),
    ...                    'bias': jnp.zeros((2, 4))},
    ...           'norm': {'scale': jnp.ones(8)}}
    >>> scale_optax.matrix_or_vector(params)
    {'attn': {'bias': 'vector', 'kernel': 'matrix'}, 'norm': {'scale': 'vector'}}
  """
  labels = iter(['vector' if v else 'matrix' for v in
                 transform.vector_flags(params, vector_mask, complete=True)])
  return jax.tree.map(lambda _: next(labels), params)


def scale(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    output_layer: paths.PathSpec = transform.DEFAULT_OUTPUT_LAYER,
    vector_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    *,
    normalization: str = 'column',
    vector_adam: str = 'optax',
    reduction_axes: transform.ReductionAxes = None,
    vector_mask: paths.PathSpec = transform.DEFAULT_VECTOR_MASK,
    tied_embedding: Optional[paths.PathSpec] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""SCALE: Stochastic Column-normAlized Last-layer momEntum.

  At step :math:`t` with learning rate :math:`\eta_t`, for every matrix
  parameter :math:`W` with gradient :math:`G`:

  .. math::
    M_t = \beta M_{t-1} + (1 - \beta) G_t \quad\text{(output layer only;
    elsewhere } M_t = G_t\text{)}, \\
    W \leftarrow W (1 - \eta_t \lambda) - \eta_t \, C(M_t),

  where :math:`C` divides each output unit by its RMS over the unit's inputs
  (:func:`scale_optax.column_normalize`). Vector parameters (norm scales and
  biases, see ``vector_mask``) use AdamW with ``vector_learning_rate``. The
  state is the output layer's momentum, AdamW's moments of the vectors, and
  step counters.

  Which leaves are which (each argument below takes a regular expression
  searched in the '/'-joined path, a callable ``fn(path: str, leaf)``, a
  pytree with the parameters' structure or a prefix of it, or, as Optax's
  masks, a callable ``fn(params)`` returning that pytree; paths are the same
  under ``nnx.Optimizer``, without a last ``/value``):

  * vectors: leaves of rank 0 and 1, and those ``vector_mask`` selects
    (default: any leaf named ``bias``, as Flax's attention biases
    ``[heads, head_dim]``);
  * the output layer: ``output_layer`` (default: the path component
    ``lm_head``), plus ``tied_embedding``;
  * a tied embedding ``[vocab, d]`` whose transpose is the output layer:
    ``tied_embedding``. It gets the output layer's momentum and is normalized
    over ``d`` (axis 1), one scale per vocabulary entry, as an untied head.

  Args:
    learning_rate: :math:`\eta`, a float or an Optax schedule.
    momentum: :math:`\beta` in [0, 1) for the output layer's EMA (no
      debiasing); None keeps no momentum at all (column-normalized SGD).
    weight_decay: :math:`\lambda`, decoupled, on every parameter.
    eps: lower clamp of the per-unit RMS.
    output_layer: which matrix leaves get momentum. ``init`` raises a
      ``ValueError`` listing the matrix paths when it selects none. Under
      ``optax.inject_hyperparams`` a callable needs
      ``static_args=('output_layer',)``.
    vector_learning_rate: AdamW's learning rate for vector leaves, a float or a
      schedule; None uses ``learning_rate`` (and so its schedule).
    normalization: 'column' (SCALE), or the ablations 'row'
      (:func:`scale_optax.row_normalize`) and 'sign' (sign descent).
    vector_adam: the vector leaves' AdamW: 'optax' (``optax.adamw``,
      :math:`\hat m / (\sqrt{\hat v} + \epsilon)`) or 'authors'
      (:func:`scale_optax.adam.authors_adamw`, the official release's
      :math:`\hat m / (\sqrt{\hat v} + \epsilon / \sqrt{1 - \beta_2^t})`);
      they differ only while :math:`\sqrt{\hat v}` is near epsilon.
    reduction_axes: fan-in axes of the matrix leaves, see
      :func:`scale_optax.column_normalize`; needed for rank >= 3 leaves.
    vector_mask: which leaves of rank >= 2 take the vector path;
      ``False`` for none (rank alone decides).
    tied_embedding: the embedding table that is also the output layer, in a
      model without a separate head.
    adam_b1: AdamW's first-moment decay for vector leaves.
    adam_b2: AdamW's second-moment decay for vector leaves.
    adam_eps: AdamW's epsilon for vector leaves.
    mu_dtype: dtype of the output layer's momentum (None: the params').

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import scale_optax
    >>> params = {'mlp': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'lm_head': {'kernel': jnp.ones((4, 5))}}
    >>> def f(p):
    ...   h = jnp.tanh(jnp.ones(3) @ p['mlp']['kernel'] + p['mlp']['bias'])
    ...   return jnp.sum((h @ p['lm_head']['kernel'] - 1.0) ** 2)
    >>> solver = scale_optax.scale(learning_rate=0.03)
    >>> opt_state = solver.init(params)
    >>> print('Objective function: {:.2f}'.format(f(params)))
    Objective function: 44.41
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> for _ in range(3):
    ...   params, opt_state = step(params, opt_state)
    ...   print('Objective function: {:.2f}'.format(f(params)))
    Objective function: 40.77
    Objective function: 37.26
    Objective function: 33.88

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  _check_nonnegative('learning_rate', learning_rate)
  _check_nonnegative('vector_learning_rate', vector_learning_rate)
  _check_nonnegative('weight_decay', weight_decay)
  if isinstance(eps, numbers.Real) and eps <= 0:
    raise ValueError(f'eps must be > 0, got {eps}.')
  if normalization not in _NORMALIZATIONS:
    raise ValueError(f'normalization must be one of {sorted(_NORMALIZATIONS)},'
                     f' got {normalization!r}.')
  if vector_adam not in _VECTOR_ADAMS:
    raise ValueError(f'vector_adam must be one of {sorted(_VECTOR_ADAMS)},'
                     f' got {vector_adam!r}.')
  if vector_learning_rate is None:
    vector_learning_rate = learning_rate

  matrices = optax.chain(
      _NORMALIZATIONS[normalization](eps=eps, reduction_axes=reduction_axes,
                                     tied_embedding=tied_embedding),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  vectors = _VECTOR_ADAMS[vector_adam](
      vector_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
      weight_decay=weight_decay)
  parts = optax.partition(
      {'matrix': matrices, 'vector': vectors},
      functools.partial(matrix_or_vector, vector_mask=vector_mask))
  if momentum is None:
    return parts
  return optax.chain(
      transform.output_layer_momentum(
          momentum, output_layer, mu_dtype, vector_mask=vector_mask,
          tied_embedding=tied_embedding),
      parts)


def column_normalized_sgd(learning_rate: optax.ScalarOrSchedule,
                          **kwargs: Any) -> optax.GradientTransformation:
  r"""SGD with column normalization and no momentum: ``scale(momentum=None)``.

  The paper's first step up from plain SGD (its Section 3).

  Args:
    learning_rate: :math:`\eta`, a float or an Optax schedule.
    **kwargs: the keyword arguments of :func:`scale` but ``momentum``.

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'w': jnp.zeros((2, 2))}
    >>> solver = scale_optax.column_normalized_sgd(learning_rate=1.0)
    >>> grads = {'w': jnp.array([[1.0, 2.0], [7.0, 2.0]])}
    >>> updates, _ = solver.update(grads, solver.init(params), params)
    >>> print(updates['w'])
    [[-0.2 -1. ]
     [-1.4 -1. ]]

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  return scale(learning_rate, momentum=None, **kwargs)


def first_last_momentum(learning_rate: optax.ScalarOrSchedule,
                        **kwargs: Any) -> optax.GradientTransformation:
  r"""SCALE with momentum on the embedding and the LM head.

  ``scale(output_layer=FIRST_AND_LAST_LAYERS)``: the paper's ablation that
  adds first-layer momentum.

  Args:
    learning_rate: :math:`\eta`, a float or an Optax schedule.
    **kwargs: the keyword arguments of :func:`scale` but ``output_layer``.

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import scale_optax
    >>> params = {'embed': {'embedding': jnp.ones((16, 4))},
    ...           'lm_head': {'kernel': jnp.ones((4, 16))},
    ...           'mlp': {'kernel': jnp.ones((4, 4))}}
    >>> state = scale_optax.first_last_momentum(1e-3).init(params)
    >>> jax.tree.map(jnp.shape, state[0].inner_state.ema)
    {'embed': {'embedding': (16, 4)}, 'lm_head': {'kernel': (4, 16)}, 'mlp': {'kernel': MaskedNode()}}

  References:
    Glentis et al., `A Minimalist Optimizer Design for LLM Pretraining
    <https://arxiv.org/abs/2506.16659>`_, 2025
  """
  return scale(learning_rate, output_layer=FIRST_AND_LAST_LAYERS, **kwargs)
