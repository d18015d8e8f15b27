"""SCALE against an independent NumPy implementation of Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax
import scale_test_util as tu

STEPS = 5
SHAPES = tu.llama_shapes(vocab=24, d=8, d_ff=12, n_layers=2)


def _gradient_oracle(seed):
  """g_t(W) = (W - target) + noise_t, the same function for both sides."""
  flat = tu.flatten_dict(SHAPES)
  rng = np.random.default_rng(seed)
  target = {k: rng.standard_normal(s) for k, s in flat.items()}
  noise = [{k: rng.standard_normal(s) for k, s in flat.items()}
           for _ in range(STEPS)]

  def grads(flat_params, t):
    return {k: (np.asarray(w, np.float64) - target[k]) + noise[t][k]
            for k, w in flat_params.items()}

  return grads


def _run_both(tx, ref, params, grad_fn):
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t in range(STEPS):
    flat = tu.flatten_dict(jax.device_get(params))
    g = grad_fn(flat, t)
    grads = tu.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in g.items()})
    params, opt_state = step(params, opt_state, grads)
    ref.step(grad_fn(ref.params, t))
  return tu.flatten_dict(jax.device_get(params)), ref.params


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
@pytest.mark.parametrize('schedule', [False, True])
def test_scale_matches_numpy_algorithm_1(weight_decay, schedule):
  params = tu.make_params(SHAPES, seed=1)
  if schedule:
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=0.05, warmup_steps=2, decay_steps=6,
        end_value=0.005)
    lr_fn = tu.np_warmup_cosine(0.05, warmup=2, total=6, final_frac=0.1)
  else:
    lr = 0.05
    lr_fn = lambda t: 0.05
  tx = scale_optax.scale(lr, weight_decay=weight_decay)
  ref = tu.NumpyScale(tu.flatten_dict(params), lr_fn, weight_decay=weight_decay)
  got, want = _run_both(tx, ref, params, _gradient_oracle(seed=2))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5,
                               err_msg=k)
  # The run must have moved every leaf (a no-op optimizer would fail above
  # only if the reference moved; check that it did).
  init = tu.flatten_dict(jax.device_get(params))
  for k in want:
    assert np.abs(want[k] - init[k]).max() > 1e-3, k


def test_separate_vector_learning_rate_schedule():
  """Vectors use adam_lr * eta_t / eta_max when given that schedule."""
  params = tu.make_params(SHAPES, seed=3)
  peak, adam_peak = 0.05, 0.002
  lr = optax.linear_schedule(peak, 0.0, 10)
  vlr = optax.linear_schedule(adam_peak, 0.0, 10)
  tx = scale_optax.scale(lr, weight_decay=0.05, vector_learning_rate=vlr)
  lr_fn = lambda t: peak * (1 - t / 10)
  vlr_fn = lambda t: adam_peak * lr_fn(t) / peak
  ref = tu.NumpyScale(tu.flatten_dict(params), lr_fn, vector_lr_fn=vlr_fn,
                      weight_decay=0.05)
  got, want = _run_both(tx, ref, params, _gradient_oracle(seed=4))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5,
                               err_msg=k)


def test_momentum_is_on_lm_head_only():
  """Swapping the reference's momentum set to 'all matrices' must disagree."""
  params = tu.make_params(SHAPES, seed=5)
  tx = scale_optax.scale(0.05)
  ref = tu.NumpyScale(tu.flatten_dict(params), lambda t: 0.05,
                      has_momentum=lambda p: True)
  got, want = _run_both(tx, ref, params, _gradient_oracle(seed=6))
  assert not np.allclose(got['layers/0/attn/q_proj/kernel'],
                         want['layers/0/attn/q_proj/kernel'], atol=1e-4)
  np.testing.assert_allclose(got['lm_head/kernel'], want['lm_head/kernel'],
                             rtol=2e-5, atol=2e-5)
