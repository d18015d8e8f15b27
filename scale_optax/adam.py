"""Adam in the original paper's "efficient" form, as the released code runs it.

Kingma and Ba's Algorithm 1 note (Section 2) folds both bias corrections into
the step size; epsilon then sits next to the uncorrected :math:`\\sqrt{v_t}`.
The official SCALE release updates its 1-D parameters (RMSNorm scales) this
way, and so do GaLore, Fira and APOLLO (a copy of transformers' old
``AdamW``), whereas ``optax.scale_by_adam`` adds epsilon after bias
correction. This module holds that Adam once: :func:`update_moments`,
:func:`bias_correction` and :func:`normalized_moment` are the per-array steps
that :func:`scale_by_authors_adam` and the projected and spike-aware
optimizers of :mod:`scale_optax.contrib` compose.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from scale_optax import leafwise


def update_moments(g: jax.Array, mu: jax.Array, nu: jax.Array, b1: Any,
                   b2: Any) -> tuple[jax.Array, jax.Array]:
  """Adam's EMAs ``b1 mu + (1 - b1) g`` and ``b2 nu + (1 - b2) g^2``.

  ``g`` is cast to each moment's dtype first, so a float32 moment of a
  bfloat16 gradient accumulates in float32 (as torch's in-place updates do).
  ``b1`` and ``b2`` may be traced (Stable-SPAM's ``b1`` follows a cosine).
  """
  mu = (1 - b1) * g.astype(mu.dtype) + b1 * mu
  nu = (1 - b2) * g.astype(nu.dtype) ** 2 + b2 * nu
  return mu, nu


def normalized_moment(mu: jax.Array, nu: jax.Array, eps: float) -> jax.Array:
  """``mu / (sqrt(nu) + eps)``: Adam's direction, epsilon on the raw ``nu``."""
  return mu / (jnp.sqrt(nu) + eps)


def bias_correction(count: jax.Array, b1: float, b2: float) -> jax.Array:
  """``sqrt(1 - b2^t) / (1 - b1^t)`` at step ``t = count`` (float32)."""
  t = count.astype(jnp.float32)
  return jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)


class ScaleByAuthorsAdamState(NamedTuple):
  """Step count and the (uncorrected) first and second moments."""
  count: jax.Array  # int32 scalar
  mu: optax.Updates
  nu: optax.Updates


def scale_by_authors_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam with epsilon added before bias correction.

  With :math:`g_t` the gradient at step :math:`t = 1, 2, \dots`:

  .. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
    u_t = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
          \frac{m_t}{\sqrt{v_t} + \epsilon}
        = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon / \sqrt{1 - \beta_2^t}}.

  ``optax.scale_by_adam`` computes :math:`\hat m_t / (\sqrt{\hat v_t} +
  \epsilon)` instead: the two differ only while :math:`\sqrt{\hat v_t}` is
  comparable to :math:`\epsilon` (tiny gradients, early steps), where this
  form takes smaller steps: its effective epsilon
  :math:`\epsilon / \sqrt{1 - \beta_2^t}` is about :math:`31 \epsilon` at
  :math:`t = 1` (:math:`\beta_2 = 0.999`) and falls to :math:`\epsilon`.

  Args:
    b1: :math:`\beta_1`, decay of the first moment.
    b2: :math:`\beta_2`, decay of the second moment.
    eps: :math:`\epsilon`, added to :math:`\sqrt{v_t}` before bias correction.
    mu_dtype: dtype of the first moment (None: the params'); the second moment
      always has the params' dtype, as in ``optax.scale_by_adam``.

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from scale_optax.adam import scale_by_authors_adam
    >>> tx = optax.chain(scale_by_authors_adam(), optax.scale(-0.1))
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state, params)
    >>> print(' '.join(f'{u:.4f}' for u in updates))  # -lr * sign(g), nearly.
    -0.1000 0.1000

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015 (Section 2, the "efficient"
    ordering); the official SCALE release,
    ``mem_eff_pt/pt_scale/scale_optimizer.py`` of
    OptimAI-Lab/Minimalist_LLM_Pretraining.
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params: optax.Params) -> ScaleByAuthorsAdamState:
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return ScaleByAuthorsAdamState(count=jnp.zeros([], jnp.int32), mu=mu,
                                   nu=nu)

  def update_fn(updates: optax.Updates, state: ScaleByAuthorsAdamState,
                params: Optional[optax.Params] = None
                ) -> tuple[optax.Updates, ScaleByAuthorsAdamState]:
    del params
    count = optax.safe_increment(state.count)
    step_size = bias_correction(count, b1, b2)
    mu, nu = leafwise.map_leaves(
        lambda _, g, m, v: update_moments(g, m, v, b1, b2), 2, updates,
        state.mu, state.nu)
    new_updates = jax.tree.map(
        lambda g, m, v: normalized_moment(step_size * m, v, eps).astype(g.dtype),
        updates, mu, nu)
    return new_updates, ScaleByAuthorsAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def authors_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""AdamW with :func:`scale_by_authors_adam`, decay applied before the step.

  .. math::
    p \leftarrow p (1 - \eta_t \lambda) - \eta_t u_t

  with :math:`u_t` from :func:`scale_by_authors_adam`: the official SCALE
  release's update of 1-D parameters. It is ``optax.adamw`` with the
  epsilon placement of :func:`scale_by_authors_adam`; both decay the
  parameter before the step (``optax.add_decayed_weights`` reads the
  pre-update parameter).

  Args:
    learning_rate: :math:`\eta`, a float or an Optax schedule.
    b1: :math:`\beta_1`.
    b2: :math:`\beta_2`.
    eps: :math:`\epsilon`, added to :math:`\sqrt{v_t}` before bias correction.
    weight_decay: :math:`\lambda`, decoupled.
    mu_dtype: dtype of the first moment (None: the params').

  Returns:
    The corresponding ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax.adam import authors_adamw
    >>> tx = authors_adamw(0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> updates, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(params), params)
    >>> print(' '.join(f'{u:.4f}' for u in updates))
    -0.1000 0.1000

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019; the official SCALE release,
    ``mem_eff_pt/pt_scale/scale_optimizer.py``.
  """
  return optax.chain(
      scale_by_authors_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
