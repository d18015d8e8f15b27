"""Rank >= 3 leaves (DenseGeneral kernels): their fan-in axes must be named."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax

D, H, K, V = 8, 2, 3, 16


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
      'attn': {'qkv': {'kernel': f(D, H, K)}},   # fan-in axis 0, out (H, K)
      'o': {'kernel': f(H, K, D)},               # fan-in axes (0, 1), out D
      'w': f(D, 5),
      'b': f(5),
      'lm_head': {'kernel': f(D, V)},
  }


def _as_2d(tree):
  """The same parameters with every rank-3 leaf reshaped to [fan_in, fan_out]."""
  return {
      'attn': {'qkv': {'kernel': tree['attn']['qkv']['kernel'].reshape(D, H * K)}},
      'o': {'kernel': tree['o']['kernel'].reshape(H * K, D)},
      'w': tree['w'], 'b': tree['b'], 'lm_head': tree['lm_head'],
  }


def _from_2d(tree):
  out = dict(tree)
  out['attn'] = {'qkv': {'kernel': tree['attn']['qkv']['kernel'].reshape(D, H, K)}}
  out['o'] = {'kernel': tree['o']['kernel'].reshape(H, K, D)}
  return out


AXES_PYTREE = {'attn': {'qkv': {'kernel': 0}}, 'o': {'kernel': (0, 1)},
               'w': None, 'b': None, 'lm_head': {'kernel': None}}
AXES_PREFIX = {'attn': 0, 'o': (-3, -2), 'w': 0, 'b': None, 'lm_head': None}


def _axes_fn(path, leaf):
  assert isinstance(path, str) and hasattr(leaf, 'ndim')
  return {'attn/qkv/kernel': 0, 'o/kernel': (0, 1)}.get(path)


SPECS = pytest.mark.parametrize('axes', [AXES_PYTREE, AXES_PREFIX, _axes_fn],
                                ids=['pytree', 'prefix_pytree', 'callable'])


@SPECS
@pytest.mark.parametrize('factory', [scale_optax.column_normalize,
                                     scale_optax.row_normalize],
                         ids=['column', 'row'])
def test_normalize_equals_reshaped_2d(axes, factory):
  grads = _params(1)
  tx = factory(reduction_axes=axes)
  u, _ = tx.update(grads, tx.init(grads))
  tx2 = factory()
  u2, _ = tx2.update(_as_2d(grads), tx2.init(_as_2d(grads)))
  chex.assert_trees_all_close(u, _from_2d(u2), rtol=1e-6, atol=1e-6)
  # And it really normalized (the qkv kernel is not a pass-through).
  assert not np.allclose(u['attn']['qkv']['kernel'],
                         grads['attn']['qkv']['kernel'])


@SPECS
def test_scale_equals_reshaped_2d(axes):
  params, params2 = _params(0), _as_2d(_params(0))
  tx = scale_optax.scale(0.05, weight_decay=0.1, reduction_axes=axes)
  tx2 = scale_optax.scale(0.05, weight_decay=0.1)
  s, s2 = tx.init(params), tx2.init(params2)
  for t in range(3):
    g = jax.tree.map(lambda p: p + 0.1 * t, _params(10 + t))
    u, s = tx.update(g, s, params)
    u2, s2 = tx2.update(_as_2d(g), s2, params2)
    params = optax.apply_updates(params, u)
    params2 = optax.apply_updates(params2, u2)
  chex.assert_trees_all_close(params, _from_2d(params2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('make', [
    scale_optax.column_normalize,
    scale_optax.row_normalize,
    lambda: scale_optax.scale(0.1),
    lambda: scale_optax.column_normalized_sgd(0.1),
    lambda: scale_optax.first_last_momentum(0.1),
    # A callable answering None for the leaf falls back to the default: error.
    lambda: scale_optax.column_normalize(
        reduction_axes=lambda p, x: 0 if p == 'o/kernel' else None),
], ids=['column', 'row', 'scale', 'sgd', 'first_last', 'callable_none'])
def test_rank3_without_axes_raises_naming_path(make):
  with pytest.raises(ValueError, match=r"'attn/qkv/kernel'.*rank 3"):
    make().init(_params())


@pytest.mark.parametrize('bad', [(0, 1, 2), 3, (0, 0), (-4,)])
def test_invalid_axes_raise_naming_path(bad):
  axes = lambda p, x: bad if p == 'attn/qkv/kernel' else (0, 1) if x.ndim == 3 else None
  with pytest.raises(ValueError, match=r"reduction_axes.*'attn/qkv/kernel'"):
    scale_optax.column_normalize(reduction_axes=axes).init(_params())


def test_spec_pytree_missing_leaf_raises_naming_path():
  axes = {'attn': 0, 'w': None, 'b': None, 'lm_head': None}   # No 'o'.
  with pytest.raises(ValueError, match=r"reduction_axes.*'o/kernel'"):
    scale_optax.column_normalize(reduction_axes=axes).init(_params())
