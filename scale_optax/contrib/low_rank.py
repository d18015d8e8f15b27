r"""GaLore, Fira, APOLLO and APOLLO-Mini: Adam in a projected space.

The four share one core, :func:`scale_by_projected_adam`. Per 2-D kernel
``G`` at step ``t`` (1-based):

1. on steps ``t = 1, 1 + gap, 1 + 2 gap, ...`` a new basis ``Q`` is made
   from the current raw gradient (SVD: GaLore, Fira) or drawn from the key in
   the state (Gaussian: APOLLO), inside the compiled step (``lax.cond``);
2. ``R = proj(G)`` (:mod:`scale_optax.contrib.projection`);
3. ``m = b1 m + (1-b1) R``, ``v = b2 v + (1-b2) R^2``, ``N = m / (sqrt(v) +
   eps)``, no bias correction. The moments are *not* reset or rotated when
   ``Q`` changes (the released code keeps them in the old basis's
   coordinates);
4. an output rule turns ``(G, R, N, Q)`` into the update:

   * :func:`back_projection` (GaLore): ``proj^T(N)``;
   * :func:`fira_output`: ``alpha proj^T(N) + limit(S)`` with
     ``S = (G - alpha proj^T(R)) * phi`` and ``phi = ||N||/||R||`` per channel
     (the released code subtracts the *alpha-scaled* projection);
   * :func:`channel_scaling` / :func:`tensor_scaling` (APOLLO / APOLLO-Mini):
     ``G * phi`` per channel or per tensor; nothing is projected back.

``phi`` per channel reduces over the rank axis of ``R`` (and ``N``): one
factor per output unit when the input axis is compressed, per input unit
otherwise, which is the released code's rule for both Fira and APOLLO.

The aliases chain the core with the scale factor, the norm-growth limiter
(:mod:`scale_optax.contrib.limiter`), the bias correction
``sqrt(1-b2^t)/(1-b1^t)`` and the learning rate, and give every other
parameter (embeddings, LM head, norms) the released ``AdamW``
(:func:`scale_optax.contrib.authors_adamw`) at the same learning rate.

References:
  Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection <https://arxiv.org/abs/2403.03507>`_, 2024;
  Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024;
  Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
  <https://arxiv.org/abs/2412.05270>`_, 2025.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from scale_optax import adam
from scale_optax import leafwise
from scale_optax import paths
from scale_optax.contrib import adam as contrib_adam
from scale_optax.contrib import limiter
from scale_optax.contrib import projection

# The attention and MLP kernels of the trainer's LLaMA
# (``layers/<i>/attn/q_proj/kernel``, ``layers/<i>/mlp/down_proj/kernel``):
# the released scripts project every Linear whose module name contains "attn"
# or "mlp".
LOW_RANK_PARAMS = r'(^|/)(attn|mlp)(/|$)'

LowRankSpec = Union[str, Callable[[str, Any], bool]]


def low_rank_labels(low_rank: LowRankSpec = LOW_RANK_PARAMS
                    ) -> Callable[[Any], Any]:
  """Labels for ``optax.partition``: 'low_rank' or 'adam' per leaf.

  Args:
    low_rank: a regular expression searched in the leaf's '/'-joined path, or
      a callable ``fn(path, leaf) -> bool``; only leaves of rank >= 2 it
      selects are labelled 'low_rank' (rank 3: a stack of kernels, one
      projection per matrix).

  Returns:
    A function of the parameters returning the tree of labels.
  """
  if isinstance(low_rank, str):
    pattern = re.compile(low_rank)
    select = lambda path, leaf: bool(pattern.search(path))
  else:
    select = low_rank

  def labels(params):
    def label(path, leaf):
      chosen = leaf.ndim >= 2 and select(paths.path_str(path), leaf)
      return 'low_rank' if chosen else 'adam'
    return jax.tree_util.tree_map_with_path(label, params)
  return labels


# ----------------------------------------------------------- output rules --


class OutputRule(NamedTuple):
  """How the core turns ``(G, R, N, Q)`` into an update.

  ``init(leaf)`` gives the rule's per-leaf state (``init`` None: the rule
  keeps none); ``apply(g, r, n, basis, axis, state, first)`` returns
  ``(update, state)``, where ``axis`` is the kernel's compressed axis and
  ``first`` is True on step 1.
  """
  init: Optional[Callable[[Any], Any]]
  apply: Callable[..., tuple[jax.Array, Any]]


def _channel_phi(n: jax.Array, r: jax.Array, axis: int) -> jax.Array:
  norm = lambda x: jnp.linalg.norm(x, axis=axis - 2, keepdims=True)
  return norm(n) / (norm(r) + 1e-8)


def back_projection() -> OutputRule:
  """GaLore's output: ``proj^T(N)``."""
  def apply(g, r, n, basis, axis, state, first):
    del g, r, first
    return projection.project_back(n, basis, axis), state
  return OutputRule(None, apply)


def fira_output(alpha: float, gamma: float = 1.01) -> OutputRule:
  """Fira's output: ``alpha proj^T(N) + limit((G - alpha proj^T(R)) phi)``.

  ``phi`` is per channel (reduction over the rank axis of ``N`` and ``R``);
  the limiter (``gamma``) acts on the residual term only, its state one
  scalar per leaf.
  """
  def init(leaf):
    return jnp.zeros(leaf.shape[:-2], leaf.dtype)

  def apply(g, r, n, basis, axis, state, first):
    phi = _channel_phi(n, r, axis)
    residual = (g - alpha * projection.project_back(r, basis, axis)) * phi
    residual, state = limiter.limit_norm_growth(residual, state, first, gamma)
    return alpha * projection.project_back(n, basis, axis) + residual, state
  return OutputRule(init, apply)


def channel_scaling() -> OutputRule:
  """APOLLO's output: ``G * phi``, ``phi = ||N|| / ||R||`` per channel."""
  def apply(g, r, n, basis, axis, state, first):
    del basis, first
    return g * _channel_phi(n, r, axis), state
  return OutputRule(None, apply)


def tensor_scaling() -> OutputRule:
  """APOLLO-Mini's output: ``G * ||N||_F / (||R||_F + 1e-8)``."""
  def apply(g, r, n, basis, axis, state, first):
    del basis, axis, first
    norm = lambda x: jnp.linalg.norm(x, axis=(-2, -1), keepdims=True)
    return g * (norm(n) / (norm(r) + 1e-8)), state
  return OutputRule(None, apply)


# ------------------------------------------------------------------- core --


class ProjectedAdamState(NamedTuple):
  """State of :func:`scale_by_projected_adam`.

  ``count``: steps done; ``key``: the PRNG key the random bases are drawn
  from (None for SVD bases); ``basis``: ``Q`` per leaf; ``mu``, ``nu``: the
  moments in the projected shape; ``output``: the output rule's state.
  """
  count: jax.Array
  key: Optional[jax.Array]
  basis: Any
  mu: Any
  nu: Any
  output: Any


def scale_by_projected_adam(
    rank: int,
    update_gap: int,
    output: OutputRule,
    basis: str = 'svd',
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adam's moments kept in a refreshed low-rank projection of each kernel.

  For every kernel (``[in, out]``; leading axes of a stack of kernels are
  batch axes, one basis per matrix), at step :math:`t`:

  .. math::
    Q_t = \begin{cases} \mathrm{basis}(G_t) & (t - 1) \bmod \mathrm{gap} = 0
    \\ Q_{t-1} & \text{otherwise,}\end{cases} \quad
    R_t = \mathrm{proj}_{Q_t}(G_t), \\
    m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2, \quad
    N_t = m_t / (\sqrt{v_t} + \epsilon),

  then ``output`` maps :math:`(G_t, R_t, N_t, Q_t)` to the update. The
  basis is recomputed inside the compiled step on refresh steps only
  (``lax.cond``); the moments carry over a refresh unchanged.

  Args:
    rank: :math:`r`. SVD bases are truncated to the compressed axis's size,
      random ones are not.
    update_gap: steps between basis refreshes.
    output: the output rule (:func:`back_projection`, :func:`fira_output`,
      :func:`channel_scaling`, :func:`tensor_scaling`).
    basis: 'svd' (leading singular vectors of the gradient) or 'random'
      (Gaussian, variance :math:`1/r`, from the key in the state).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to :math:`\sqrt{v}` (no bias correction here).
    seed: seeds the key of random bases; leaf ``i`` (in flattening order)
      draws from ``fold_in(key, i)``, the key being split at each refresh.
    mu_dtype: dtype of the moments (None: the parameters').

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> tx = contrib.scale_by_projected_adam(2, 200, contrib.back_projection())
    >>> params = {'w': jnp.zeros((4, 6))}
    >>> state = tx.init(params)
    >>> state.basis['w'].shape, state.mu['w'].shape  # [in, r], [r, out]
    ((4, 2), (2, 6))
    >>> g = {'w': jax.random.normal(jax.random.key(0), (4, 6))}
    >>> u, state = tx.update(g, state)
    >>> u['w'].shape
    (4, 6)

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024;
    Zhu et al., `APOLLO <https://arxiv.org/abs/2412.05270>`_, 2025.
  """
  if basis not in ('svd', 'random'):
    raise ValueError(f"basis must be 'svd' or 'random', got {basis!r}.")
  if rank < 1 or update_gap < 1:
    raise ValueError(f'rank and update_gap must be >= 1, got {rank}, '
                     f'{update_gap}.')
  truncate = basis == 'svd'

  def check(path, leaf):
    if leaf.ndim < 2:
      raise ValueError(
          f'scale_by_projected_adam: parameter {paths.path_str(path)!r} has '
          f'shape {tuple(leaf.shape)}; only kernels (rank >= 2) can be '
          f'projected (route the others elsewhere, e.g. with '
          f'low_rank_labels).')

  def init_fn(params):
    jax.tree_util.tree_map_with_path(check, params)
    dtype = lambda p: mu_dtype or p.dtype
    zeros = lambda shape_fn: (lambda p: jnp.zeros(
        shape_fn(p.shape, rank, truncate), dtype(p)))
    moments = lambda: jax.tree.map(zeros(projection.projected_shape), params)
    return ProjectedAdamState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(seed) if basis == 'random' else None,
        basis=jax.tree.map(
            lambda p: jnp.zeros(projection.basis_shape(p.shape, rank, truncate),
                                p.dtype), params),
        mu=moments(), nu=moments(),
        output=None if output.init is None else jax.tree.map(output.init,
                                                             params))

  def update_fn(updates, state, params=None):
    del params
    refresh = state.count % update_gap == 0
    first = state.count == 0
    count = optax.safe_increment(state.count)
    key = draw = None
    if basis == 'random':
      next_key, draw = jax.random.split(state.key)
      key = jnp.where(refresh, next_key, state.key)

    def leaf_step(i, g, q, m, v, o):
      if basis == 'svd':
        make = lambda: projection.svd_basis(g, q.shape[-1])
      else:
        make = lambda: projection.random_basis(
            jax.random.fold_in(draw, i), g.shape, rank, q.dtype)
      q = jax.lax.cond(refresh, make, lambda: q)
      r = projection.project(g, q.astype(g.dtype))
      m, v = adam.update_moments(r, m, v, b1, b2)
      n = adam.normalized_moment(m, v, eps).astype(g.dtype)
      u, o = output.apply(g, r, n, q.astype(g.dtype),
                          projection.compressed_axis(g.shape), o, first)
      return u.astype(g.dtype), q, m, v, o

    u, q, m, v, o = leafwise.map_leaves(leaf_step, 5, updates, state.basis,
                                        state.mu, state.nu, state.output)
    return u, ProjectedAdamState(count, key, q, m, v,
                                 None if state.output is None else o)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------- aliases --


def partition_low_rank(kernels: optax.GradientTransformation,
                       rest: optax.GradientTransformation,
                       low_rank: LowRankSpec = LOW_RANK_PARAMS
                       ) -> optax.GradientTransformation:
  """``kernels`` on the leaves :func:`low_rank_labels` selects, ``rest`` on
  the others: the parameter split of GaLore, Fira, APOLLO and SWAN.

  Args:
    kernels: the transformation of the selected kernels.
    rest: the transformation of every other leaf (embeddings, LM head,
      norms).
    low_rank: which leaves are selected, see :func:`low_rank_labels`.

  Returns:
    An ``optax.partition`` whose states are keyed 'low_rank' and 'adam'.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from scale_optax import contrib
    >>> tx = contrib.partition_low_rank(optax.sgd(0.1), optax.adam(0.1))
    >>> state = tx.init({'attn': {'kernel': jnp.ones((4, 4))},
    ...                  'norm': jnp.ones(4)})
    >>> sorted(state.inner_states)
    ['adam', 'low_rank']
  """
  return optax.partition({'low_rank': kernels, 'adam': rest},
                         low_rank_labels(low_rank))


def _projected_optimizer(learning_rate, low_rank_chain, b1, b2, eps,
                         weight_decay, low_rank, mu_dtype):
  """The projected chain for the selected kernels, AdamW for the rest."""
  projected = optax.chain(
      *low_rank_chain,
      contrib_adam.scale_by_bias_correction(b1, b2),
      optax.scale_by_learning_rate(learning_rate),
      contrib_adam.decay_updated_weights(learning_rate, weight_decay))
  rest = contrib_adam.authors_adamw(learning_rate, b1, b2, eps, weight_decay,
                                    mu_dtype)
  return partition_low_rank(projected, rest, low_rank)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    low_rank: LowRankSpec = LOW_RANK_PARAMS,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""GaLore-AdamW as released (``GaLoreAdamW``, ``proj_type='std'``).

  For the attention and MLP kernels, with :math:`Q` the leading ``rank``
  singular vectors of the gradient along its compressed axis, refreshed every
  ``update_gap`` steps:

  .. math::
    W \leftarrow W - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \,
    \alpha \, \mathrm{proj}^\top_Q\!\Big(\frac{m_t}{\sqrt{v_t} + \epsilon}
    \Big), \qquad W \leftarrow W - \eta \lambda W,

  with :math:`m, v` Adam's moments of :math:`R = \mathrm{proj}_Q(G)` and
  :math:`\alpha` = ``scale``. Every other parameter gets
  :func:`authors_adamw` at the same :math:`\eta`.

  Args:
    learning_rate: :math:`\eta` for every parameter, a float or a schedule.
    rank: projection rank (128 at 60M, 256 at 130M/350M, 512 at 1B in the
      compared numbers).
    update_gap: steps between SVD refreshes (200).
    scale: :math:`\alpha` (``--galore_scale``, 0.25).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: :math:`\epsilon`, before bias correction (1e-6).
    weight_decay: :math:`\lambda`, after the step (0 in every script).
    low_rank: which 2-D leaves are projected, see :func:`low_rank_labels`.
    mu_dtype: dtype of the projected moments and of the other leaves' first
      moment (None: the parameters').

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from scale_optax import contrib
    >>> params = {'attn': {'kernel': jnp.ones((8, 8))}, 'norm': jnp.ones(8)}
    >>> tx = contrib.galore(0.01, rank=2)
    >>> state = tx.init(params)
    >>> grads = {'attn': {'kernel': jnp.eye(8)}, 'norm': jnp.ones(8)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  core = scale_by_projected_adam(rank, update_gap, back_projection(), 'svd',
                                 b1, b2, eps, mu_dtype=mu_dtype)
  return _projected_optimizer(learning_rate, [core, optax.scale(scale)], b1,
                              b2, eps, weight_decay, low_rank, mu_dtype)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_gap: int = 200,
    alpha: float = 0.25,
    gamma: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    low_rank: LowRankSpec = LOW_RANK_PARAMS,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Fira-AdamW as released (``FiraAdamW``).

  GaLore's projected Adam plus a scaled full-rank residual:

  .. math::
    S_t = (G_t - \alpha\, \mathrm{proj}^\top_Q(R_t)) \odot \phi_t, \quad
    \phi_t = \frac{\lVert N_t \rVert_{\text{rank axis}}}
    {\lVert R_t \rVert_{\text{rank axis}} + 10^{-8}}, \\
    W \leftarrow W - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
    \big(\alpha\, \mathrm{proj}^\top_Q(N_t) + \mathrm{limit}_\gamma(S_t)\big),

  where :math:`N_t = m_t / (\sqrt{v_t} + \epsilon)` and the norm-growth
  limiter (:func:`scale_by_norm_growth_limiter`) acts on :math:`S_t` only.
  The residual subtracts the *alpha-scaled* projection, as the released code
  does (its ``project_back`` carries the scale); the paper writes
  :math:`G - P P^\top G`. Other parameters get :func:`authors_adamw`.

  Args:
    learning_rate: :math:`\eta` for every parameter.
    rank: projection rank (as GaLore's).
    update_gap: steps between SVD refreshes (200).
    alpha: :math:`\alpha` (``--alpha``: 0.25, 0.0625 at 1B).
    gamma: the limiter's growth bound (1.01, hard-coded in the release).
    b1, b2, eps, weight_decay, low_rank, mu_dtype: as in :func:`galore`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> params = {'mlp': {'kernel': jnp.ones((4, 6))}, 'norm': jnp.ones(4)}
    >>> tx = contrib.fira(0.01, rank=2)
    >>> grads = {'mlp': {'kernel': jnp.arange(24.).reshape(4, 6)},
    ...          'norm': jnp.ones(4)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['mlp']['kernel'].shape
    (4, 6)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  core = scale_by_projected_adam(rank, update_gap, fira_output(alpha, gamma),
                                 'svd', b1, b2, eps, mu_dtype=mu_dtype)
  return _projected_optimizer(learning_rate, [core], b1, b2, eps,
                              weight_decay, low_rank, mu_dtype)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = 'channel',
    scale_front: bool = False,
    gamma: float = 1.01,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    low_rank: LowRankSpec = LOW_RANK_PARAMS,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""APOLLO-AdamW as released (``APOLLOAdamW``, random projection).

  Adam's moments of a random projection estimate a per-channel (or
  per-tensor) scale of the raw gradient:

  .. math::
    R_t = \mathrm{proj}_Q(G_t), \ Q \sim \mathcal{N}(0, 1/r) \text{ redrawn
    every gap steps}, \quad N_t = m_t / (\sqrt{v_t} + \epsilon), \\
    U_t = \sqrt{s}\; G_t \odot \frac{\lVert N_t \rVert}{\lVert R_t \rVert +
    10^{-8}}, \quad
    W \leftarrow W - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
    \mathrm{limit}_\gamma(U_t),

  the norms per channel (over the rank axis: one factor per output unit of
  ``q/k/v/o/gate/up``, per input unit of ``down``) or over the whole tensor.
  The multiplier is :math:`\sqrt{s}`, applied before the norm-growth limiter
  when ``scale_front`` and after it otherwise. Other parameters get
  :func:`authors_adamw`. The basis is drawn from a JAX key in the state
  (``seed``), not torch's generator: runs are reproducible, not bitwise
  equal to the release's.

  Args:
    learning_rate: :math:`\eta` for every parameter.
    rank: projection rank (not truncated).
    update_gap: steps between redraws (200).
    scale: :math:`s` (1 for APOLLO, 128 for APOLLO-Mini).
    scale_type: 'channel' (APOLLO) or 'tensor' (APOLLO-Mini).
    scale_front: multiply by :math:`\sqrt{s}` before the limiter.
    gamma: the limiter's growth bound (1.01).
    seed: seeds the projection key.
    b1, b2, eps, weight_decay, low_rank, mu_dtype: as in :func:`galore`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> params = {'attn': {'kernel': jnp.ones((8, 8))}, 'norm': jnp.ones(8)}
    >>> tx = contrib.apollo(0.01, rank=2)
    >>> state = tx.init(params)
    >>> grads = {'attn': {'kernel': jnp.eye(8)}, 'norm': jnp.ones(8)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates['attn']['kernel'].shape
    (8, 8)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2025
  """
  rules = {'channel': channel_scaling, 'tensor': tensor_scaling}
  if scale_type not in rules:
    raise ValueError(f"scale_type must be 'channel' or 'tensor', got "
                     f'{scale_type!r}.')
  core = scale_by_projected_adam(rank, update_gap, rules[scale_type](),
                                 'random', b1, b2, eps, seed, mu_dtype)
  multiply = optax.scale(math.sqrt(scale))
  limit = limiter.scale_by_norm_growth_limiter(gamma)
  steps = [core, multiply, limit] if scale_front else [core, limit, multiply]
  return _projected_optimizer(learning_rate, steps, b1, b2, eps, weight_decay,
                              low_rank, mu_dtype)


def apollo_mini(learning_rate: optax.ScalarOrSchedule, rank: int = 1,
                update_gap: int = 200, scale: float = 128.0,
                scale_front: bool = True, **kwargs: Any
                ) -> optax.GradientTransformation:
  r"""APOLLO-Mini: :func:`apollo` with rank 1 and one scale per tensor.

  .. math::
    U_t = \sqrt{s}\; G_t \frac{\lVert N_t \rVert_F}{\lVert R_t \rVert_F +
    10^{-8}},

  with :math:`s = 128` (a multiplier of 11.31). ``scale_front`` is True in the
  60M script and False in the 1B one. Other keyword arguments are those of
  :func:`apollo`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from scale_optax import contrib
    >>> params = {'mlp': {'kernel': jnp.ones((4, 6))}}
    >>> state = contrib.apollo_mini(0.01).init(params)
    >>> state.inner_states['low_rank'].inner_state[0].mu['mlp']['kernel'].shape
    (1, 6)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2025
  """
  return apollo(learning_rate, rank=rank, update_gap=update_gap, scale=scale,
                scale_type='tensor', scale_front=scale_front, **kwargs)
