"""Property tests of the column normalization C (hypothesis)."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax.numpy as jnp
import optax
import numpy as np

import scale_optax

EPS = 1e-8
PROPS = settings(max_examples=30, deadline=None, database=None)


@st.composite
def matrices(draw, min_exp=-30, max_exp=15):
  """[fan_in, fan_out] float32 matrices, each column its own magnitude.

  Entries are sign * u * 10**e_j with u in [0.5, 2]: the column's RMS is
  within [0.5, 2] * 10**e_j. Some columns are exactly zero and some contain
  zeros, and magnitudes span 1e-30 (whose squares underflow float32) to 1e15.
  """
  rows = draw(st.integers(1, 9))
  cols = draw(st.integers(1, 6))
  exps = draw(st.lists(st.integers(min_exp, max_exp), min_size=cols,
                       max_size=cols))
  zero_cols = draw(st.lists(st.booleans(), min_size=cols, max_size=cols))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  u = rng.uniform(0.5, 2.0, (rows, cols)) * rng.choice([-1.0, 1.0],
                                                        (rows, cols))
  u *= rng.random((rows, cols)) > 0.2      # Scattered exact zeros.
  g = u * 10.0 ** np.asarray(exps, np.float64)
  g[:, np.asarray(zero_cols)] = 0.0
  return g.astype(np.float32)


def _normalize(g):
  tx = scale_optax.column_normalize(eps=EPS)
  u, _ = tx.update(jnp.asarray(g), optax.EmptyState())
  return np.asarray(u)


def _rms(x):
  return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=0))


@PROPS
@given(matrices())
def test_unit_rms_or_zero_and_finite(g):
  u = _normalize(g)
  assert u.shape == g.shape and u.dtype == np.float32
  assert np.isfinite(u).all()
  rms_in = _rms(g)
  rms_out = _rms(u)
  for j in range(g.shape[1]):
    if rms_in[j] == 0.0:
      # An all-zero unit stays exactly zero.
      assert (u[:, j] == 0.0).all(), j
    elif rms_in[j] >= EPS:
      np.testing.assert_allclose(rms_out[j], 1.0, rtol=1e-5, err_msg=str(j))
    else:
      # Below the clamp (the paper's max(rms, 1e-8)): divided by eps, so the
      # unit shrinks to rms/eps < 1 rather than blowing up.
      np.testing.assert_allclose(u[:, j], g[:, j] / np.float32(EPS),
                                 rtol=1e-6)
      assert rms_out[j] < 1.0
    # Zeros stay zeros and signs are kept.
    np.testing.assert_array_equal(np.sign(u[:, j]), np.sign(g[:, j]))


@PROPS
@given(matrices())
def test_matches_formula(g):
  g64 = g.astype(np.float64)
  want = g64 / np.maximum(np.sqrt(np.mean(g64 * g64, axis=0)), EPS)
  np.testing.assert_allclose(_normalize(g), want, rtol=1e-5, atol=0)


@PROPS
@given(matrices(min_exp=-4, max_exp=4),
       st.lists(st.floats(1e-3, 1e3), min_size=6, max_size=6))
def test_invariant_to_positive_per_unit_rescaling(g, factors):
  c = np.asarray(factors[:g.shape[1]], np.float32)
  u = _normalize(g)
  u_scaled = _normalize(g * c)
  np.testing.assert_allclose(u_scaled, u, rtol=1e-5, atol=1e-6)


@PROPS
@given(matrices(min_exp=-4, max_exp=4),
       st.lists(st.floats(1e-3, 1e3), min_size=9, max_size=9))
def test_row_normalize_invariant_to_per_input_rescaling(g, factors):
  r = np.asarray(factors[:g.shape[0]], np.float32)[:, None]
  tx = scale_optax.row_normalize(eps=EPS)
  u, _ = tx.update(jnp.asarray(g), optax.EmptyState())
  u_scaled, _ = tx.update(jnp.asarray(g * r), optax.EmptyState())
  u = np.asarray(u)
  np.testing.assert_allclose(np.asarray(u_scaled), u, rtol=1e-5, atol=1e-6)
  nonzero = np.abs(g).sum(axis=1) > 0
  rms_rows = np.sqrt(np.mean(np.square(u.astype(np.float64)), axis=1))
  np.testing.assert_allclose(rms_rows[nonzero], 1.0, rtol=1e-5)
