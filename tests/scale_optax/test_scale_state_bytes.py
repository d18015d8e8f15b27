"""state_bytes: SCALE's memory in closed form, on abstract (unallocated) trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax
import scale_test_util as tu

VOCAB, D, D_FF, LAYERS = 48, 16, 40, 3
SHAPES = tu.llama_shapes(VOCAB, D, D_FF, LAYERS)


def _int32_scalars(state):
  return [x for x in jax.tree.leaves(state)
          if x.dtype == jnp.int32 and x.shape == ()]


def _n_vector():
  flat = tu.flatten_dict(SHAPES)
  return sum(int(np.prod(s)) for s in flat.values() if len(s) == 1)


def _n_params():
  return sum(int(np.prod(s)) for s in tu.flatten_dict(SHAPES).values())


def test_abstract_params_hold_no_buffers():
  params = tu.abstract_params(SHAPES)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  assert scale_optax.state_bytes(params) == 4 * _n_params()


@pytest.mark.parametrize('schedule', [False, True])
def test_scale_state_bytes_closed_form(schedule):
  params = tu.abstract_params(SHAPES)
  lr = optax.cosine_decay_schedule(1e-3, 100) if schedule else 1e-3
  state = jax.eval_shape(scale_optax.scale(lr, weight_decay=0.1).init, params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))

  # Counters, read from the structure: the head EMA's count and AdamW's count;
  # with a schedule, also scale_by_schedule's count in each of the two parts.
  ema_count = state[0].inner_state.count
  parts = state[1].inner_states
  adam_count = parts['vector'].inner_state[0].count
  counters = [ema_count, adam_count]
  if schedule:
    counters += [parts['matrix'].inner_state[2].count,
                 parts['vector'].inner_state[2].count]
  assert all(c.dtype == jnp.int32 and c.shape == () for c in counters)
  assert len(_int32_scalars(state)) == len(counters) == (4 if schedule else 2)

  head = VOCAB * D * 4                       # lm_head momentum, float32
  adam = 2 * 4 * _n_vector()                 # mu and nu of every 1-D leaf
  assert scale_optax.state_bytes(state) == head + adam + 4 * len(counters)
  # Nothing else: no state for the other matrices.
  floats = [x for x in jax.tree.leaves(state) if x.dtype == jnp.float32]
  assert sorted(x.shape for x in floats if len(x.shape) == 2) == [(D, VOCAB)]


def test_adamw_state_bytes_is_twice_params():
  params = tu.abstract_params(SHAPES)
  state = jax.eval_shape(optax.adamw(1e-3, weight_decay=0.1).init, params)
  assert len(_int32_scalars(state)) == 1
  assert (scale_optax.state_bytes(state)
          == 2 * scale_optax.state_bytes(params) + 4)


def test_state_bytes_counts_dtypes_and_ignores_non_arrays():
  tree = {'a': jax.ShapeDtypeStruct((3, 5), jnp.bfloat16),
          'b': jnp.zeros((7,), jnp.float32), 'c': 1.5, 'd': None,
          'e': optax.MaskedNode(), 'f': np.zeros((2,), np.int64)}
  assert scale_optax.state_bytes(tree) == 3 * 5 * 2 + 7 * 4 + 2 * 8


def test_bf16_momentum_halves_head_bytes():
  params = tu.abstract_params(SHAPES)
  s32 = jax.eval_shape(scale_optax.scale(1e-3).init, params)
  s16 = jax.eval_shape(
      scale_optax.scale(1e-3, mu_dtype=jnp.bfloat16).init, params)
  assert (scale_optax.state_bytes(s32) - scale_optax.state_bytes(s16)
          == VOCAB * D * 2)
