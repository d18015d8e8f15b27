"""``per_layer``: an optimizer on stacked layers (``[L, ...]`` leaves) updates
each layer as it would that layer alone, with one step counter for all of
them, so that its step-dependent branches (basis refreshes) stay branches."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scale_optax import contrib
from train.optim import per_layer
from optimizer_steps import apply_steps

LAYERS = 3
STEPS = 3  # update_gap=2: refreshes on steps 1 and 3.

ROWS = {
    'galore': functools.partial(contrib.galore, 1e-2, rank=2, update_gap=2),
    'fira': functools.partial(contrib.fira, 1e-2, rank=2, update_gap=2),
    'apollo': functools.partial(contrib.apollo, 1e-2, rank=2, update_gap=2,
                                weight_decay=0.1),
    'stable_spam': functools.partial(contrib.stable_spam, 1e-2),
}


def _params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  layer = lambda: {'attn': {'kernel': f32(LAYERS, 6, 8)},
                   'norm': {'scale': f32(LAYERS, 6)}}
  return layer(), [layer() for _ in range(STEPS)]


def _layer(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@pytest.mark.parametrize('name', ROWS)
def test_each_layer_updates_as_it_would_alone(name):
  params, grads = _params_and_grads()
  stacked, _ = apply_steps(per_layer(ROWS[name]()), params, grads)
  for i in range(LAYERS):
    alone, _ = apply_steps(ROWS[name](), _layer(params, i),
                           [_layer(g, i) for g in grads])
    chex.assert_trees_all_close(_layer(stacked, i), alone, rtol=1e-5,
                                atol=1e-6)


def test_step_counters_are_shared_and_the_rest_is_per_layer():
  params, grads = _params_and_grads()
  _, state = apply_steps(per_layer(ROWS['apollo']()), params, grads)
  ints = [x for x in jax.tree.leaves(state)
          if jnp.issubdtype(x.dtype, jnp.integer)]
  floats = [x for x in jax.tree.leaves(state)
            if not jnp.issubdtype(x.dtype, jnp.integer)]
  # The step counts (one per inner transformation) and the PRNG key.
  assert ints and all(x.shape in [(), (2,)] for x in ints), ints
  assert {int(x) for x in ints if x.shape == ()} == {STEPS}
  assert floats and all(x.shape[0] == LAYERS for x in floats)


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if hasattr(sub, 'jaxpr'):  # ClosedJaxpr
          sub = sub.jaxpr
        if hasattr(sub, 'eqns'):
          yield from _primitives(sub)


def test_a_basis_refresh_stays_a_branch():
  """A batched step count would turn GaLore's ``lax.cond`` into a select that
  computes the SVD on every step."""
  params, grads = _params_and_grads()
  tx = per_layer(ROWS['galore']())
  jaxpr = jax.make_jaxpr(tx.update)(grads[0], tx.init(params), params)
  assert 'cond' in set(_primitives(jaxpr.jaxpr))


def test_integer_state_that_depends_on_a_layer_is_refused():
  def update_fn(updates, state, params=None):
    del params
    return updates, jnp.argmax(updates['attn']['kernel']).astype(jnp.int32)

  tx = per_layer(optax.GradientTransformation(
      lambda params: jnp.zeros([], jnp.int32), update_fn))
  params, grads = _params_and_grads()
  with pytest.raises(ValueError, match='out_axes'):
    tx.update(grads[0], tx.init(params), params)
