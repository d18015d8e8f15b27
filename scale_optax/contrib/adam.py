"""The Adam pieces the GaLore code family shares, in its released form.

GaLore, Fira and APOLLO (and the plain AdamW their non-projected parameters
get) compute Adam as a copy of transformers' old ``AdamW``:

.. math::
  m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad
  v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\\\
  p \\leftarrow p - \\eta \\, \\frac{\\sqrt{1 - \\beta_2^t}}{1 - \\beta_1^t}
      \\frac{m_t}{\\sqrt{v_t} + \\epsilon}, \\qquad
  p \\leftarrow p - \\eta \\lambda p \\ \\text{(on the updated } p\\text{)}.

``eps`` is added *before* the bias correction (``optax.adam`` adds it after),
which matters while ``v`` is small: the Adam of the official SCALE release,
:func:`scale_optax.scale_by_authors_adam`. Here are the pieces the GaLore
family adds around it: the bias correction as a transformation of its own
(:func:`scale_by_bias_correction`; the projected optimizers apply it after
projecting back) and the weight decay on the updated parameters
(:func:`decay_updated_weights`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from scale_optax import adam


class CountState(NamedTuple):
  """The number of updates done so far (int32)."""
  count: jax.Array


def scale_by_bias_correction(b1: float = 0.9, b2: float = 0.999
                             ) -> optax.GradientTransformation:
  r"""Multiplies updates by :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`.

  The GaLore family's ``step_size / lr`` factor, applied after a direction
  that carries no bias correction (the projected moments of
  :func:`scale_optax.contrib.scale_by_projected_adam`).

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.

  Returns:
    An ``optax.GradientTransformation`` whose state counts the steps.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.scale_by_bias_correction()
    >>> u, _ = tx.update({'w': jnp.ones(1)}, tx.init({'w': jnp.zeros(1)}))
    >>> print(round(float(u['w'][0]), 4))  # sqrt(0.001) / 0.1
    0.3162

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
  """
  def init_fn(params):
    del params
    return CountState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    factor = adam.bias_correction(count, b1, b2)
    return (jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates),
            CountState(count))

  return optax.GradientTransformation(init_fn, update_fn)


def decay_updated_weights(learning_rate: optax.ScalarOrSchedule,
                          weight_decay: float
                          ) -> optax.GradientTransformation:
  r"""Weight decay applied after the step, on the updated parameters.

  Given the step's update :math:`u` (already scaled by :math:`-\eta`), returns
  :math:`u - \eta \lambda (p + u)`: the result of ``p += u`` then
  ``p -= lr * wd * p``, as the GaLore family's ``AdamW`` does it. The last
  transformation of a chain; needs ``params``.

  Args:
    learning_rate: :math:`\eta`, a float or a schedule (of the step count).
    weight_decay: :math:`\lambda`; 0 makes this the identity.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.decay_updated_weights(0.5, 0.1)
    >>> p = {'w': jnp.array([2.0])}
    >>> u, _ = tx.update({'w': jnp.array([-1.0])}, tx.init(p), p)
    >>> print(round(float(u['w'][0]), 4))  # -1 - 0.05 * (2 - 1)
    -1.05

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  def init_fn(params):
    del params
    return CountState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if weight_decay == 0:
      return updates, state
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    out = jax.tree.map(
        lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype),
        updates, params)
    return out, CountState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def authors_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
                  b2: float = 0.999, eps: float = 1e-6,
                  weight_decay: float = 0.0,
                  mu_dtype: Optional[Any] = None
                  ) -> optax.GradientTransformation:
  r"""AdamW as GaLore, Fira and APOLLO release it (eps before bias correction).

  .. math::
    p \leftarrow p - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
        \frac{m_t}{\sqrt{v_t} + \epsilon}, \qquad
    p \leftarrow p - \eta \lambda p.

  Equivalent to ``optax.adamw`` with :math:`\epsilon / \sqrt{1-\beta_2^t}` in
  place of :math:`\epsilon` and the decay taken on the updated parameters;
  :func:`scale_optax.authors_adamw` with the decay after the step instead of
  before it (and the released eps, 1e-6).
  The non-projected parameters (embeddings, LM head, norms) of
  :func:`galore`, :func:`fira`, :func:`apollo` and :func:`apollo_mini` get it.

  Args:
    learning_rate: :math:`\eta`, a float or a schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon` (1e-6 in the released code).
    weight_decay: :math:`\lambda`, applied after the step.
    mu_dtype: dtype of the first moment (None: the parameters').

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.authors_adamw(0.01)
    >>> p = {'w': jnp.array([1.0, -1.0])}
    >>> u, _ = tx.update({'w': jnp.array([0.5, -2.0])}, tx.init(p), p)
    >>> print(jnp.round(u['w'], 5))  # -lr * sign(g) on the first step
    [-0.01  0.01]

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024;
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return optax.chain(
      adam.scale_by_authors_adam(b1, b2, eps, mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
      decay_updated_weights(learning_rate, weight_decay))
