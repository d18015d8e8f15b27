"""SCALE's arithmetic on hand-worked numbers (the authors' release, read line
by line; docs/sources.md): the fan-in axis, the RMS, and eps as
a lower clamp of the RMS, not an added term."""

import jax.numpy as jnp
import numpy as np

import scale_optax


def _normalize(g, eps=1e-8):
  tx = scale_optax.column_normalize(eps=eps)
  updates, _ = tx.update({'w': jnp.asarray(g, jnp.float32)},
                         tx.init({'w': jnp.zeros(np.shape(g))}))
  return np.asarray(updates['w'], np.float64)


def test_column_rms_over_the_fan_in_by_hand():
  # Column 0: RMS sqrt((9 + 16) / 2) = 3.5355; column 1: sqrt(1 / 2) = 0.7071.
  g = [[3.0, 0.0],
       [4.0, 1.0]]
  want = [[3 / 12.5 ** 0.5, 0.0],
          [4 / 12.5 ** 0.5, 2 ** 0.5]]
  np.testing.assert_allclose(_normalize(g), want, rtol=1e-6)


def test_eps_clamps_the_rms():
  """``u = g / max(rms, eps)``: a column with RMS 1e-6 gets unit RMS exactly
  (an added eps would give 0.990), one with RMS 1e-9 is divided by eps."""
  g = np.zeros((4, 2))
  g[:, 0] = [1e-6, -1e-6, 1e-6, -1e-6]
  g[:, 1] = [1e-9, 1e-9, -1e-9, 1e-9]
  u = _normalize(g)
  np.testing.assert_allclose(u[:, 0], [1, -1, 1, -1], rtol=1e-5)
  np.testing.assert_allclose(u[:, 1], [0.1, 0.1, -0.1, 0.1], rtol=1e-5)


def test_scale_first_update_by_hand():
  """One SCALE step, lr 0.1, weight decay 0.5, from W = 1: matrices
  ``W (1 - lr wd) - lr C(G)``; the LM head's momentum is ``(1 - beta) G``
  (no debias), which C scales away; the vector's AdamW step is ``-lr``."""
  params = {'lm_head': {'kernel': jnp.ones((2, 2))},
            'dense': {'kernel': jnp.ones((2, 2))},
            'norm': {'scale': jnp.ones((2,))}}
  g = jnp.asarray([[3.0, 0.0], [4.0, 1.0]])
  grads = {'lm_head': {'kernel': g}, 'dense': {'kernel': g},
           'norm': {'scale': jnp.asarray([2.0, -0.5])}}
  tx = scale_optax.scale(0.1, weight_decay=0.5)
  updates, _ = tx.update(grads, tx.init(params), params)
  c = np.array([[3 / 12.5 ** 0.5, 0.0], [4 / 12.5 ** 0.5, 2 ** 0.5]])
  for name in ('lm_head', 'dense'):
    np.testing.assert_allclose(updates[name]['kernel'], -0.05 - 0.1 * c,
                               rtol=1e-5)
  # AdamW: -lr (g / |g| + wd * w) = -0.1 * (+-1 + 0.5).
  np.testing.assert_allclose(updates['norm']['scale'], [-0.15, 0.05],
                             rtol=1e-4)


def test_output_layer_momentum_is_not_debiased():
  """The first two updates of the LM head are ``(1 - b) G1`` and
  ``b (1 - b) G1 + (1 - b) G2`` (the authors' ``lerp``, no debias); other
  leaves pass through."""
  params = {'lm_head': {'kernel': jnp.zeros((2, 2))},
            'dense': {'kernel': jnp.zeros((2, 2))}}
  g1 = {'lm_head': {'kernel': jnp.full((2, 2), 1.0)},
        'dense': {'kernel': jnp.full((2, 2), 3.0)}}
  g2 = {'lm_head': {'kernel': jnp.full((2, 2), 2.0)},
        'dense': {'kernel': jnp.full((2, 2), 5.0)}}
  tx = scale_optax.output_layer_momentum(0.9)
  state = tx.init(params)
  first, state = tx.update(g1, state, params)
  second, _ = tx.update(g2, state, params)
  np.testing.assert_allclose(first['lm_head']['kernel'], 0.1, rtol=1e-6)
  np.testing.assert_allclose(second['lm_head']['kernel'], 0.09 + 0.2,
                             rtol=1e-6)
  np.testing.assert_allclose(first['dense']['kernel'], 3.0)
  np.testing.assert_allclose(second['dense']['kernel'], 5.0)
