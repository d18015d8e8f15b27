"""State sizes of the contrib optimizers against the torch optimizers' tensors.

The expected numbers are the float values the released torch optimizers hold
after a real step on LLaMA-60M and (from shapes) LLaMA-1B, projectors and
limiter/statistics scalars included (docs/sources.md);
ours come from ``jax.eval_shape`` of ``init``: nothing is allocated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scale_test_util as tu
from scale_optax import contrib

SIZES = {'60m': dict(vocab=32000, d=512, d_ff=1376, n_layers=8),
         '1b': dict(vocab=32000, d=2048, d_ff=5461, n_layers=24)}
WEIGHTS = {'60m': 58_073_600, '1b': 1_339_082_752}
# (size, method, rank) -> torch's state values; 1B ranks as the released
# scripts (GaLore 1024, APOLLO 256) and Fira's 512.
TORCH_VALUES = {
    ('60m', 'galore', 128): 81_871_872,
    ('60m', 'fira', 128): 81_871_928,
    ('60m', 'apollo', 128): 81_871_928,
    ('60m', 'apollo_mini', 1): 65_680_952,
    ('60m', 'stable_spam', None): 116_147_425,
    ('60m', 'swan', None): 65_553_408,
    ('1b', 'galore', 1024): 1_822_576_640,
    ('1b', 'fira', 512): 1_042_460_840,
    ('1b', 'apollo', 256): 652_402_856,
    ('1b', 'apollo_mini', 1): 263_868_536,
    ('1b', 'stable_spam', None): 2_678_166_161,
    ('1b', 'swan', None): 262_344_704,
}


def _build(method, rank):
  fn = getattr(contrib, method)
  return fn(1e-3) if rank is None else fn(1e-3, rank=rank)


def _values(tree, kind):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, kind))


@pytest.mark.parametrize('size, method, rank', sorted(
    TORCH_VALUES, key=str))
def test_state_values_match_the_torch_optimizers(size, method, rank):
  params = tu.abstract_params(tu.llama_shapes(**SIZES[size]))
  assert _values(params, jnp.floating) == WEIGHTS[size]
  state = jax.eval_shape(_build(method, rank).init, params)
  assert _values(state, jnp.floating) == TORCH_VALUES[size, method, rank]
  # Beside the floats: step counters and, for APOLLO, the projection key.
  ints = [x for x in jax.tree.leaves(state)
          if jnp.issubdtype(x.dtype, jnp.integer)]
  assert all(x.shape == () for x in ints if x.dtype == jnp.int32)
  keys = [x for x in ints if x.dtype == jnp.uint32]
  assert [k.shape for k in keys] == ([(2,)] if 'apollo' in method else [])


@pytest.mark.parametrize('method', ['galore', 'apollo', 'stable_spam'])
def test_state_follows_the_parameter_dtype(method):
  params = tu.abstract_params(tu.llama_shapes(vocab=64, d=16, d_ff=24,
                                              n_layers=1), dtype=jnp.bfloat16)
  state = jax.eval_shape(_build(method, 4 if method != 'stable_spam'
                                else None).init, params)
  floats = {jnp.dtype(x.dtype) for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating)}
  # Stable-SPAM's three 0-d norm statistics are float32 scalars.
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert floats == ({bf16, f32} if method == 'stable_spam' else {bf16})
