"""Stacked kernels (``[layers, in, out]``, as a scanned model has them).

Each matrix of a stack gets its own projection, statistics and limiter: a
stacked tree must update exactly as the same layers given one by one.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scale_optax import contrib
from optimizer_steps import apply_steps

LAYERS = 2
KERNELS = {('attn', 'q_proj'): (16, 16), ('mlp', 'down_proj'): (24, 16),
           ('mlp', 'up_proj'): (16, 24)}


def _layer(rng):
  return {group: {name: {'kernel': rng.standard_normal(shape)}
                  for (g, name), shape in KERNELS.items() if g == group}
          for group in ('attn', 'mlp')}


def _trees(seed):
  """The same values as one stacked tree and as per-layer trees."""
  rng = np.random.default_rng(seed)
  layers = [_layer(rng) for _ in range(LAYERS)]
  norm = rng.standard_normal(16)
  as_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  stacked = {'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers),
             'norm': norm}
  separate = {'layers': {str(i): l for i, l in enumerate(layers)},
              'norm': norm}
  return as_f32(stacked), as_f32(separate)


@pytest.mark.parametrize('build', [
    functools.partial(contrib.galore, rank=4, update_gap=2),
    functools.partial(contrib.fira, rank=4, update_gap=2),
    contrib.swan,
], ids=['galore', 'fira', 'swan'])
def test_stacked_kernels_update_as_separate_layers(build):
  tx = build(0.01)
  stacked, separate = _trees(0)
  grads = [_trees(seed) for seed in (1, 2, 3)]
  got, _ = apply_steps(tx, stacked, [g[0] for g in grads])
  want, _ = apply_steps(tx, separate, [g[1] for g in grads])
  for i in range(LAYERS):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i],
                                                 got['layers'])),
                    jax.tree.leaves(want['layers'][str(i)])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['norm'], want['norm'], rtol=1e-6)


def test_stacked_apollo_keeps_one_basis_and_limiter_norm_per_matrix():
  stacked, _ = _trees(0)
  tx = contrib.apollo(0.01, rank=4, update_gap=2)
  params, _ = apply_steps(tx, stacked, [_trees(s)[0] for s in (1, 2)])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  state = tx.init(stacked)
  low_rank = state.inner_states['low_rank'].inner_state
  assert low_rank[0].basis['layers']['mlp']['down_proj']['kernel'].shape == (
      LAYERS, 16, 4)
  assert low_rank[1].norm['layers']['attn']['q_proj']['kernel'].shape == (
      LAYERS,)


def test_limiter_takes_a_tree_with_every_leaf_masked_out():
  # optax.partition hands each part the whole tree with the other parts'
  # leaves as MaskedNode: a part may have no leaf at all.
  params = {'embed': jnp.ones((4, 2)), 'norm': jnp.ones(2)}
  tx = optax.masked(contrib.scale_by_norm_growth_limiter(1.01),
                    {'embed': False, 'norm': False})
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(params, state)
  chex.assert_trees_all_equal(updates, params)
