"""scale_by_authors_adam / authors_adamw against the formula, in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax
from scale_optax.adam import authors_adamw, scale_by_authors_adam


def _numpy_authors_adamw(p, grads, lrs, b1, b2, eps, wd):
  """p *= 1 - lr wd; p -= lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps)."""
  p = p.astype(np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd)
    p = p - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
  return p


@pytest.mark.parametrize('wd', [0.0, 0.1])
def test_authors_adamw_matches_numpy(wd):
  rng = np.random.default_rng(0)
  # Tiny gradients (1e-7) make eps matter, so the two forms differ.
  grads = [1e-7 * rng.standard_normal(6) for _ in range(5)]
  lrs = [0.0, 0.01, 0.02, 0.03, 0.02]
  p0 = 1.0 + 0.1 * rng.standard_normal(6)
  schedule = lambda count: jnp.asarray(lrs)[count]
  kwargs = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
  want = _numpy_authors_adamw(p0, grads, lrs, 0.9, 0.999, 1e-8, wd)

  def run(tx):
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(params, np.float64)

  got = run(authors_adamw(schedule, **kwargs))
  np.testing.assert_allclose(got - p0, want - p0, rtol=1e-4)
  optax_form = run(optax.adamw(schedule, **kwargs))
  assert not np.allclose(optax_form - p0, want - p0, rtol=1e-2)


def test_keeps_the_gradient_dtype_and_mu_dtype():
  params = jnp.ones((4,), jnp.bfloat16)
  tx = scale_by_authors_adam(mu_dtype=jnp.float32)
  state = tx.init(params)
  updates, state = tx.update(jnp.full((4,), 0.5, jnp.bfloat16), state, params)
  assert updates.dtype == jnp.bfloat16
  assert state.mu.dtype == jnp.float32 and state.nu.dtype == jnp.bfloat16
  assert int(state.count) == 1


def test_scale_routes_vectors_to_the_chosen_adam():
  params = {'norm': {'scale': jnp.ones((3,))},
            'lm_head': {'kernel': jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda p: 1e-7 * jnp.arange(p.size, dtype=p.dtype)
                       .reshape(p.shape) + 1e-7, params)

  def step(vector_adam):
    tx = scale_optax.scale(0.1, vector_adam=vector_adam)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  authors, default = step('authors'), step('optax')
  np.testing.assert_array_equal(authors['lm_head']['kernel'],
                                default['lm_head']['kernel'])
  vector, vector_grad = params['norm']['scale'], grads['norm']['scale']
  want, _ = authors_adamw(0.1).update(
      vector_grad, authors_adamw(0.1).init(vector), vector)
  np.testing.assert_allclose(authors['norm']['scale'], want, rtol=1e-6)
  assert not np.allclose(authors['norm']['scale'], default['norm']['scale'],
                         rtol=1e-2)


def test_unknown_vector_adam_is_named():
  with pytest.raises(ValueError, match="vector_adam must be one of.*'adam'"):
    scale_optax.scale(0.1, vector_adam='adam')
