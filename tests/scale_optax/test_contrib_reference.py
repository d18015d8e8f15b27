"""scale_optax.contrib against NumPy transcriptions of the released updates.

Each method runs several jitted steps on a LLaMA-shaped tree (square q/k/v/o,
wide gate/up, tall down: both projection sides) with weight decay, next to
``contrib_reference`` in torch layout. The projected methods get the
library's own basis fed to the reference on its refresh steps (steps 1, 3,
5 with gap 2), so the trajectories must agree exactly up to float32; the SVD
bases themselves are compared on those steps sign-invariantly (as projectors
``Q Q^T``) with NumPy's, and the bases between refreshes are checked through
the trajectories (the reference keeps its own).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import contrib_reference as ref
import scale_test_util as tu
from scale_optax import contrib
from scale_optax import paths
from scale_optax.contrib.stable_spam import ada_clip

# One kernel of each projection case (square, wide, tall in Flax layout) and
# one leaf of each AdamW kind, with the trainer's LLaMA paths: few leaves keep
# the compile short.
SHAPES = {
    'embed': {'embedding': (32, 16)},
    'layers': {'0': {'attn': {'q_proj': {'kernel': (16, 16)}},
                     'attn_norm': {'scale': (16,)},
                     'mlp': {'gate_proj': {'kernel': (16, 24)},
                             'down_proj': {'kernel': (24, 16)}}}},
    'lm_head': {'kernel': (16, 32)},
}
STEPS, GAP, RANK, LR, WD = 5, 2, 4, 0.01, 0.1
LOW_RANK = ('attn', 'mlp')


def _flat(tree):
  return {paths.path_str(p): np.asarray(x, np.float64)
          for p, x in paths.leaves_with_paths(tree)}


def _is_low_rank(name):
  return any(f'/{w}/' in f'/{name}' for w in LOW_RANK)


def _torch(x):
  return x.T if x.ndim == 2 else x


def _grads(seed):
  """Per-step random gradients with unequal channel scales and a spike."""
  rng = np.random.default_rng(seed)
  def make(x):
    g = rng.standard_normal(x.shape) * (0.5 + rng.random(x.shape[-1]))
    g.flat[rng.integers(g.size)] *= 30.0
    return jnp.asarray(g, jnp.float32)
  return [jax.tree.map(make, tu.make_params(SHAPES)) for _ in range(STEPS)]


def _core_state(state):
  """The ProjectedAdamState inside a contrib low-rank optimizer's state."""
  return state.inner_states['low_rank'].inner_state[0]


def _run_library(tx, grads):
  params = tu.make_params(SHAPES, seed=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    history.append((_flat(params), state))
  return tu.make_params(SHAPES, seed=3), history


def _assert_close(got, want, start, what):
  for name in want:
    np.testing.assert_allclose(
        _torch(got[name]) - _torch(start[name]), want[name] - _torch(
            start[name]), rtol=2e-4, atol=2e-7, err_msg=f'{what}: {name}')


def _check_svd_basis(q, g, t):
  """The library's SVD basis spans NumPy's (``Q Q^T`` is sign-invariant)."""
  for name, basis in q.items():
    p = ref.svd_basis(g[name], RANK)
    want = p.T @ p if p.shape[0] == RANK else p @ p.T   # Right / left case.
    np.testing.assert_allclose(basis @ basis.T, want, atol=2e-5,
                               err_msg=f'{name} step {t}')


LOW_RANK_CASES = {
    'galore': (functools.partial(contrib.galore, scale=0.25),
               dict(method='galore', alpha=0.25)),
    'fira': (functools.partial(contrib.fira, alpha=0.25),
             dict(method='fira', alpha=0.25)),
    'apollo': (functools.partial(contrib.apollo, scale=2.0),
               dict(method='apollo', alpha=2.0)),
    'apollo_front': (functools.partial(contrib.apollo, scale=2.0,
                                       scale_front=True),
                     dict(method='apollo', alpha=2.0, scale_front=True)),
    'apollo_mini': (contrib.apollo_mini,
                    dict(method='apollo', alpha=128.0, scale_type='tensor',
                         scale_front=True)),
}


@pytest.mark.parametrize('case', sorted(LOW_RANK_CASES))
def test_low_rank_matches_reference(case):
  build, kwargs = LOW_RANK_CASES[case]
  rank = 1 if case == 'apollo_mini' else RANK
  tx = build(LR, rank=rank, update_gap=GAP, weight_decay=WD)
  grads = _grads(seed=1)
  start, history = _run_library(tx, grads)
  p = {k: _torch(v) for k, v in _flat(start).items()}
  states = {k: {} for k in p}
  for t, (g, (got, lib_state)) in enumerate(zip(grads, history), start=1):
    q = _flat(_core_state(lib_state).basis)
    g = {k: _torch(v) for k, v in _flat(g).items()}
    if case in ('galore', 'fira') and (t - 1) % GAP == 0:
      _check_svd_basis(q, g, t)
    for name in p:
      if not _is_low_rank(name):
        p[name] = ref.adamw(p[name], g[name], states[name], LR, WD)
        continue
      right = p[name].shape[0] >= p[name].shape[1]
      # Torch's projector from the library's Q: right [r, in] = Q^T, left Q.
      basis = lambda _, q=q[name], right=right: q.T if right else q
      p[name] = ref.low_rank(kwargs['method'], p[name], g[name], states[name],
                             LR, WD, basis, gap=GAP,
                             **{k: v for k, v in kwargs.items()
                                if k != 'method'})
    _assert_close(got, p, _flat(start), f'{case} step {t}')


def test_apollo_basis_is_gaussian_reproducible_and_redrawn():
  tx = contrib.apollo(LR, rank=RANK, update_gap=GAP, seed=7)
  grads = _grads(seed=3)
  _, one = _run_library(tx, grads[:3])
  _, two = _run_library(tx, grads[:3])
  b = [_flat(_core_state(s).basis) for _, s in one]
  for name in b[0]:
    np.testing.assert_array_equal(b[0][name], _flat(
        _core_state(two[0][1]).basis)[name])
    np.testing.assert_array_equal(b[0][name], b[1][name])   # Within a period.
    assert np.abs(b[2][name] - b[1][name]).min() > 0         # Redrawn.
  square = [b[0][n] for n in b[0] if n.endswith(('q_proj/kernel',
                                                   'down_proj/kernel'))]
  assert np.abs(square[0] - square[1]).min() > 0   # Each leaf its own draw.
  allq = np.concatenate([x.ravel() for x in b[0].values()])
  assert abs(allq.var() * RANK - 1) < 0.15, allq.var() * RANK   # N(0, 1/r).
  # Random bases are not truncated: rank may exceed the compressed axis.
  big = contrib.apollo(LR, rank=20).init(tu.make_params(SHAPES))
  assert _flat(big.inner_states['low_rank'].inner_state[0].basis)[
      'layers/0/attn/q_proj/kernel'].shape == (16, 20)


def test_projection_side_in_flax_layout():
  state = contrib.galore(LR, rank=RANK).init(tu.make_params(SHAPES))
  core = _core_state(state)
  mu, basis = _flat(core.mu), _flat(core.basis)
  layer = 'layers/0/'
  # Square and wide kernels compress their input axis, down_proj its output.
  assert mu[layer + 'attn/q_proj/kernel'].shape == (RANK, 16)
  assert mu[layer + 'mlp/gate_proj/kernel'].shape == (RANK, 24)
  assert mu[layer + 'mlp/down_proj/kernel'].shape == (24, RANK)
  assert basis[layer + 'mlp/down_proj/kernel'].shape == (16, RANK)
  assert 'embed/embedding' not in mu and 'lm_head/kernel' not in mu


def test_stable_spam_matches_authors_code_across_resets():
  params = tu.make_params(SHAPES, seed=3)
  grads = _grads(seed=4) + _grads(seed=5)
  # A zero gradient still takes the Adam step in the authors' code.
  grads[4] = jax.tree.map(jnp.zeros_like, grads[4])
  tx = contrib.stable_spam(1e-3, t_max=12, reset_interval=3, weight_decay=0.1,
                           gamma1=0.7, gamma2=0.9)
  reference = ref.StableSpam(1e-3, t_max=12, gap=3, wd=0.1, gamma1=0.7,
                             gamma2=0.9)
  state, update = tx.init(params), jax.jit(tx.update)
  start = _flat(params)
  p = {k: _torch(v) for k, v in start.items()}
  for t, g in enumerate(grads, start=1):
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    p = reference.step(p, {k: _torch(v) for k, v in _flat(g).items()})
    _assert_close(_flat(params), p, start, f'step {t}')


def test_stable_spam_adaclip_scales_spikes_by_threshold_over_max():
  """Step 1 clips nothing (tau = M); at step 2 the entries above
  tau = (0.999 * 0.001 * 1 + 0.001 * 100) / (1 - 0.999^2) = 50.52 are scaled
  by tau / 100: the max becomes -tau and 80 becomes 0.8 tau (a clamp would
  give tau)."""
  theta = 0.999
  g1 = jnp.ones(4)
  g2 = jnp.array([0.1, -0.1, 80.0, -100.0])
  clipped, max_mean = ada_clip(g1, jnp.zeros([]), jnp.ones([]), theta)
  np.testing.assert_array_equal(clipped, g1)
  clipped, max_mean = ada_clip(g2, max_mean, 2 * jnp.ones([]), theta)
  tau = (theta * (1 - theta) * 1.0 + (1 - theta) * 100.0) / (1 - theta**2)
  # float32's 1 - 0.999^2 is good to about 1e-4.
  assert float(max_mean) == pytest.approx(tau * (1 - theta**2), rel=1e-5)
  np.testing.assert_allclose(clipped, [0.1, -0.1, 0.8 * tau, -tau],
                             rtol=1e-4)


def test_swan_matches_reference():
  params = tu.make_params(SHAPES, seed=3)
  grads = _grads(seed=6)[:3]
  tx = contrib.swan(0.02, adam_learning_rate=1e-3)
  state, update = tx.init(params), jax.jit(tx.update)
  start = _flat(params)
  p = {k: _torch(v) for k, v in start.items()}
  adam_states = {k: {} for k in p}
  for t, g in enumerate(grads, start=1):
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    for name, gn in _flat(g).items():
      if _is_low_rank(name):
        p[name] = p[name] - 0.02 * ref.swan_direction(_torch(gn))
      else:
        p[name] = ref.torch_adam(p[name], _torch(gn), adam_states[name], 1e-3)
    _assert_close(_flat(params), p, start, f'step {t}')
