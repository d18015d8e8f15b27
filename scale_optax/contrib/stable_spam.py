r"""Stable-SPAM: Adam with spike clipping, gradient-norm scaling and resets.

Per step :math:`T` (1-based) and per parameter, as the authors' repository
(TianjinYellow/StableSPAM) runs it:

.. math::
  c_T = \eta_{\min} + (1-\eta_{\min}) \tfrac{1}{2}\big(1 + \cos
  \tfrac{\pi T}{T_{\max}+1}\big), \quad \beta_1' = \beta_1 c_T, \quad
  \gamma_1' = \gamma_1 c_T, \\
  \text{AdaClip:}\ M = \max|g|,\ m^{\max} = \theta m^{\max} + (1-\theta) M,\
  \tau = m^{\max} / (1 - \theta^k),\
  g_i \leftarrow g_i \tau / M \text{ where } |g_i| > \tau, \\
  \text{AdaGN:}\ n = \lVert g \rVert,\
  \mu = \gamma_1' \mu + (1-\gamma_1') n,\ \nu = \gamma_2 \nu + (1-\gamma_2) n^2,\
  g \leftarrow \frac{g}{n}\,
  \frac{\mu / (1-\gamma_1'^k)}{\sqrt{\nu / (1-\gamma_2^k)} + \epsilon}, \\
  m = \beta_1' m + (1-\beta_1') g,\ v = \beta_2 v + (1-\beta_2) g^2,\quad
  p \leftarrow p (1 - \eta\lambda) - \frac{\eta}{1-\beta_1'^{k'}}
  \frac{m}{\sqrt{v} / \sqrt{1-\beta_2^{k'}} + \epsilon}.

:math:`k` counts steps since the last momentum reset and is reset to 1 every
``reset_interval`` steps; clipping and AdaGN use the count before the reset
(:math:`k`), Adam after it (:math:`k'`). At a reset step the update still
uses the old moments (updated with :math:`g`) with step-1 bias correction and
the *stored* moments become zero, so the next step starts from zeros with a
bias correction of 2 steps: the authors' code does exactly that, and the
compared numbers came from it (pytorch-optimizer's port restarts cleanly and
uses the global step in the clip and AdaGN corrections instead). A zero
gradient still takes the Adam step. All three norm statistics are 0-d, per
parameter, kept in float32 whatever the parameters' dtype (torch keeps them
in the gradient's dtype, where a bfloat16 EMA with decay 0.99999 cannot
move).

Reference: Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than
16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from scale_optax import adam
from scale_optax import leafwise


class StableSpamState(NamedTuple):
  """Global step, steps since the last reset, and per-leaf statistics."""
  count: jax.Array
  step: jax.Array
  mu: Any
  nu: Any
  norm_mean: Any
  norm_sq_mean: Any
  max_mean: Any


def momentum_scale(count: jax.Array, t_max: Optional[int],
                   eta_min: float) -> jax.Array:
  """The cosine factor on ``b1`` and ``gamma1`` at step ``count`` (1-based)."""
  if t_max is None:
    return jnp.ones([], jnp.float32)
  t = count.astype(jnp.float32)
  return eta_min + (1 - eta_min) * (1 + jnp.cos(math.pi * t / (t_max + 1))) / 2


def ada_clip(g: jax.Array, max_mean: jax.Array, k: jax.Array,
             theta: float) -> tuple[jax.Array, jax.Array]:
  r"""AdaClip: scales every entry above the adaptive threshold by ``tau / M``.

  .. math::
    M = \max|g|,\quad m^{\max} \leftarrow \theta m^{\max} + (1-\theta) M,
    \quad \tau = m^{\max} / (1 - \theta^k), \quad
    g_i \leftarrow g_i \tau / M \text{ where } |g_i| > \tau,

  so the largest entry becomes :math:`\pm\tau` and the other spiked entries
  keep their ratios to it (the authors' code; not a clamp to :math:`\tau`).

  Args:
    g: one leaf's gradient (float32).
    max_mean: :math:`m^{\max}`, the EMA of :math:`M` (0-d).
    k: the 1-based step count of the EMA's bias correction.
    theta: the EMA's decay.

  Returns:
    ``(clipped g, new max_mean)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax.contrib.stable_spam import ada_clip
    >>> g, m = ada_clip(jnp.array([1.0, -4.0, 2.0]), jnp.zeros([]),
    ...                 jnp.ones([]), theta=0.5)
    >>> print(g, m)  # tau = M = 4 at step 1: nothing is above it.
    [ 1. -4.  2.] 2.0
  """
  top = jnp.max(jnp.abs(g))
  max_mean = theta * max_mean + (1 - theta) * top
  threshold = max_mean / (1 - theta ** k)
  return jnp.where(jnp.abs(g) > threshold, g / top * threshold, g), max_mean


def scale_by_stable_spam(
    gamma1: float = 0.85,
    gamma2: float = 0.99999,
    theta: float = 0.999,
    t_max: Optional[int] = None,
    eta_min: float = 0.5,
    reset_interval: int = 1000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Stable-SPAM's direction: AdaClip, AdaGN, Adam with momentum resets.

  Returns :math:`m / (1-\beta_1'^{k'}) / (\sqrt{v}/\sqrt{1-\beta_2^{k'}} +
  \epsilon)` (module docstring), to be followed by weight decay and the
  learning rate (:func:`stable_spam`).

  Args:
    gamma1: AdaGN's norm-mean decay (0.85), times the cosine factor.
    gamma2: AdaGN's squared-norm decay (0.99999).
    theta: AdaClip's decay of the max (0.999; ``--gamma3``).
    t_max: length of the cosine on ``b1`` and ``gamma1`` (``--total_T``);
      None: no cosine (factor 1).
    eta_min: the cosine's floor (0.5).
    reset_interval: the moments are reset every this many steps (1000;
      ``--update_proj_gap``); 0: never.
    b1: Adam's first-moment decay, times the cosine factor.
    b2: Adam's second-moment decay.
    eps: Adam's and AdaGN's epsilon (after bias correction).
    mu_dtype: dtype of the moments (None: the parameters').

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.scale_by_stable_spam()
    >>> u, _ = tx.update({'w': jnp.array([3.0, -4.0])},
    ...                  tx.init({'w': jnp.zeros(2)}))
    >>> print(jnp.round(u['w'], 3))  # about sign(g) on the first step
    [ 1. -1.]

  References:
    Huang et al., `Stable-SPAM <https://arxiv.org/abs/2502.17055>`_, 2025
  """
  def init_fn(params):
    zeros = lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype)
    scalar = lambda p: jnp.zeros([], jnp.float32)
    return StableSpamState(
        jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
        jax.tree.map(zeros, params), jax.tree.map(zeros, params),
        jax.tree.map(scalar, params), jax.tree.map(scalar, params),
        jax.tree.map(scalar, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    k = (state.step + 1).astype(jnp.float32)
    reset = (count % reset_interval == 0) if reset_interval else jnp.array(
        False)
    step = jnp.where(reset, 1, state.step + 1)
    k_adam = step.astype(jnp.float32)
    c = momentum_scale(count, t_max, eta_min)
    g1, beta1 = gamma1 * c, b1 * c
    bc1, bc2 = 1 - beta1 ** k_adam, 1 - b2 ** k_adam

    def leaf(_, g, m, v, norm_mean, norm_sq_mean, max_mean):
      gf, max_mean = ada_clip(g.astype(jnp.float32), max_mean, k, theta)
      n = jnp.linalg.norm(gf)
      norm_mean = g1 * norm_mean + (1 - g1) * n
      norm_sq_mean = gamma2 * norm_sq_mean + (1 - gamma2) * n ** 2
      ratio = (norm_mean / (1 - g1 ** k)) / (
          jnp.sqrt(norm_sq_mean / (1 - gamma2 ** k)) + eps)
      gf = jnp.where(n > 0, gf / jnp.where(n > 0, n, 1.0) * ratio, gf)
      m, v = adam.update_moments(gf, m, v, beta1, b2)
      u = m / bc1 / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
      m, v = (jnp.where(reset, jnp.zeros_like(x), x) for x in (m, v))
      return u.astype(g.dtype), m, v, norm_mean, norm_sq_mean, max_mean

    u, *fields = leafwise.map_leaves(leaf, 6, updates, *state[2:])
    return u, StableSpamState(count, step, *fields)

  return optax.GradientTransformation(init_fn, update_fn)


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    gamma1: float = 0.85,
    gamma2: float = 0.99999,
    theta: float = 0.999,
    t_max: Optional[int] = None,
    eta_min: float = 0.5,
    reset_interval: int = 1000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Stable-SPAM on every parameter, one learning rate.

  :func:`scale_by_stable_spam`, then decoupled weight decay on the parameters
  before the step (:math:`p \leftarrow p(1 - \eta\lambda)`), then
  :math:`-\eta`. Embeddings, LM head and norms included, as the authors run
  it.

  Args:
    learning_rate: :math:`\eta` (8e-4 in the authors' 130M script).
    gamma1: see :func:`scale_by_stable_spam`.
    gamma2: see :func:`scale_by_stable_spam`.
    theta: see :func:`scale_by_stable_spam`.
    t_max: see :func:`scale_by_stable_spam` (the run's steps in the scripts).
    eta_min: see :func:`scale_by_stable_spam`.
    reset_interval: see :func:`scale_by_stable_spam`.
    b1: see :func:`scale_by_stable_spam`.
    b2: see :func:`scale_by_stable_spam`.
    eps: see :func:`scale_by_stable_spam`.
    weight_decay: :math:`\lambda`.
    mu_dtype: dtype of the moments.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from scale_optax import contrib
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> tx = contrib.stable_spam(1e-3, t_max=100)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025
  """
  return optax.chain(
      scale_by_stable_spam(gamma1, gamma2, theta, t_max, eta_min,
                           reset_interval, b1, b2, eps, mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
