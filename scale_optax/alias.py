"""SCALE and the variants of the paper's bottom-up study, as Optax chains.

Every optimizer here is the same chain with different parts:

.. code-block:: text

  momentum on the output layer   (optax.masked(optax.ema(beta, debias=False)))
  -> partition by rank:
       matrices: normalize (column | row | sign) -> decoupled weight decay
                 -> scale by the learning rate
       vectors:  AdamW (norm scales, biases)

Reference: Glentis, Li, Han, Hong, `A Minimalist Optimizer Design for LLM
Pretraining <https://arxiv.org/abs/2506.16659>`_, 2025.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax
import optax

from scale_optax import paths
from scale_optax import transform

# Matches the token embedding and the LM head of the trainer's LLaMA (and of
# most Flax LLaMAs): the "momentum on the first and last layers" ablation.
FIRST_AND_LAST_LAYERS = r'(^|/)(embed|embedding|tok_embeddings|wte|lm_head)(/|$)'

_NORMALIZATIONS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'column': transform.column_normalize,
    'row': transform.row_normalize,
    'sign': lambda eps, reduction_axes: optax.scale_by_sign(),
}


def _check_nonnegative(name: str, value: Any) -> None:
  if isinstance(value, numbers.Real) and value < 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def matrix_or_vector(params: Any) -> Any:
  """Labels each leaf 'matrix' (rank >= 2) or 'vector' (rank 0 and 1)."""
  return jax.tree.map(lambda x: 'matrix' if x.ndim >= 2 else 'vector', params)


def scale(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    output_layer: paths.PathSpec = transform.DEFAULT_OUTPUT_LAYER,
    vector_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    *,
    normalization: str = 'column',
    reduction_axes: transform.ReductionAxes = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    momentum_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""SCALE: Stochastic Column-normAlized Last-layer momEntum.

  At step :math:`t` with learning rate :math:`\eta_t`, for every matrix
  parameter :math:`W` with gradient :math:`G`:

  .. math::
    M_t = \beta M_{t-1} + (1 - \beta) G_t \quad\text{(output layer only;
    elsewhere } M_t = G_t\text{)}, \\
    W \leftarrow W (1 - \eta_t \lambda) - \eta_t \, C(M_t),

  where :math:`C` divides each output unit by its RMS over the unit's inputs
  (:func:`scale_optax.column_normalize`). Vector parameters (RMSNorm scales,
  biases) use AdamW with ``vector_learning_rate``. The state is the output
  layer's momentum, AdamW's moments of the vectors, and step counters.

  Args:
    learning_rate: :math:`\eta`, a float or an Optax schedule.
    momentum: :math:`\beta` in [0, 1) for the output layer's EMA (no
      debiasing); None keeps no momentum at all (column-normalized SGD).
    weight_decay: :math:`\lambda`, decoupled, on every parameter.
    eps: lower clamp of the per-unit RMS.
    output_layer: which matrix leaves get momentum: a regular expression on the
      '/'-joined path (default: the path component ``lm_head``), a callable
      ``fn(path: str, leaf) -> bool``, or a boolean pytree. ``init`` raises a
      ``ValueError`` listing the matrix paths when it selects none. Under
      ``optax.inject_hyperparams`` a callable needs
      ``static_args=('output_layer',)``.
    vector_learning_rate: AdamW's learning rate for vector leaves, a float or a
      schedule; None uses ``learning_rate`` (and so its schedule).
    normalization: 'column' (SCALE), or the ablations 'row'
      (:func:`scale_optax.row_normalize`) and 'sign' (sign descent).
    reduction_axes: fan-in axes of the matrix leaves, see
      :func:`scale_optax.column_normalize`; needed for rank >= 3 leaves.
    adam_b1: AdamW's first-moment decay for vector leaves.
    adam_b2: AdamW's second-moment decay for vector leaves.
    adam_eps: AdamW's epsilon for vector leaves.
    momentum_dtype: dtype of the output layer's momentum (None: the params').

  Returns:
    The corresponding ``optax.GradientTransformation``.

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
  if vector_learning_rate is None:
    vector_learning_rate = learning_rate

  matrices = optax.chain(
      _NORMALIZATIONS[normalization](eps=eps, reduction_axes=reduction_axes),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  vectors = optax.adamw(vector_learning_rate, b1=adam_b1, b2=adam_b2,
                        eps=adam_eps, weight_decay=weight_decay)
  parts = optax.partition({'matrix': matrices, 'vector': vectors},
                          matrix_or_vector)
  if momentum is None:
    return parts
  return optax.chain(
      transform.output_layer_momentum(momentum, output_layer, momentum_dtype),
      parts)


def column_normalized_sgd(learning_rate: optax.ScalarOrSchedule,
                          **kwargs: Any) -> optax.GradientTransformation:
  """SGD with column normalization and no momentum: ``scale(momentum=None)``.

  The paper's first step up from plain SGD (its Section 3). Keyword arguments
  are those of :func:`scale`.
  """
  return scale(learning_rate, momentum=None, **kwargs)


def first_last_momentum(learning_rate: optax.ScalarOrSchedule,
                        **kwargs: Any) -> optax.GradientTransformation:
  """SCALE with momentum on the embedding and the LM head.

  ``scale(output_layer=FIRST_AND_LAST_LAYERS)``: the paper's ablation that
  adds first-layer momentum. Keyword arguments are those of :func:`scale`.
  """
  return scale(learning_rate, output_layer=FIRST_AND_LAST_LAYERS, **kwargs)
