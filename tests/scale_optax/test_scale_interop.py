"""SCALE composed with Optax wrappers and used through flax.nnx."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax
import scale_test_util as tu
from optimizer_steps import apply_steps

SHAPES = tu.llama_shapes(vocab=16, d=8, d_ff=12, n_layers=1)


def _grads(seed, scale=1.0):
  return jax.tree.map(lambda x: x * scale, tu.make_params(SHAPES, seed=seed))


def test_chained_after_clip_by_global_norm():
  params = tu.make_params(SHAPES)
  grads = [_grads(s, scale=10.0) for s in (1, 2, 3)]
  norms = [float(optax.tree.norm(g)) for g in grads]
  assert min(norms) > 1.0   # The clip is active.
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   scale_optax.scale(0.05, weight_decay=0.1))
  got, _ = apply_steps(tx, params, grads)
  clipped = [jax.tree.map(lambda x, n=n: x / n, g) for g, n in zip(grads, norms)]
  want, _ = apply_steps(scale_optax.scale(0.05, weight_decay=0.1), params,
                        clipped)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # The clip matters: unclipped grads change the head's EMA mixture.
  unclipped, _ = apply_steps(scale_optax.scale(0.05, weight_decay=0.1),
                             params, [grads[0], _grads(2, 0.1), grads[2]])
  assert not np.allclose(unclipped['lm_head']['kernel'],
                         got['lm_head']['kernel'], atol=1e-4)


def test_inject_hyperparams():
  params = tu.make_params(SHAPES)
  grads = [_grads(s) for s in (1, 2, 3, 4)]
  tx = optax.inject_hyperparams(scale_optax.scale)(learning_rate=0.1,
                                                   weight_decay=0.01)
  state = tx.init(params)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.1)

  plain = scale_optax.scale(0.1, weight_decay=0.01)
  got, state = apply_steps(tx, params, grads[:2], state)
  want, plain_state = apply_steps(plain, params, grads[:2])
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # (1 - b2) is rounded differently for an injected float32 b2: rtol 1e-4.
  chex.assert_trees_all_close(state.inner_state, plain_state, rtol=1e-4)

  # Change the learning rate in the state: same as plain scale at 0.05 from
  # the same optimizer state.
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  got2, state = apply_steps(tx, got, grads[2:], state)
  want2, _ = apply_steps(scale_optax.scale(0.05, weight_decay=0.01), want,
                         grads[2:], plain_state)
  chex.assert_trees_all_close(got2, want2, rtol=1e-5, atol=1e-5)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.05)
  # And it is not what lr 0.1 would have given.
  want_01, _ = apply_steps(plain, want, grads[2:], plain_state)
  assert not np.allclose(got2['layers']['0']['attn']['q_proj']['kernel'],
                         want_01['layers']['0']['attn']['q_proj']['kernel'])


def test_inject_hyperparams_with_schedule():
  params = tu.make_params(SHAPES)
  sched = optax.linear_schedule(0.1, 0.0, 4)
  tx = optax.inject_hyperparams(scale_optax.scale)(learning_rate=sched)
  grads = [_grads(s) for s in (1, 2, 3)]
  got, state = apply_steps(tx, params, grads)
  want, _ = apply_steps(scale_optax.scale(sched), params, grads)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(
      float(sched(2)))


@pytest.mark.parametrize('k', [2, 3])
def test_multi_steps_equals_one_step_on_mean_gradient(k):
  params = tu.make_params(SHAPES)
  inner = lambda: scale_optax.scale(0.05, weight_decay=0.1)
  tx = optax.MultiSteps(inner(), every_k_schedule=k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = params
  means = []
  for rnd in range(2):
    micro = [_grads(10 * rnd + i) for i in range(k)]
    means.append(jax.tree.map(lambda *g: sum(g) / k, *micro))
    for i, g in enumerate(micro):
      u, state = update(g, state, p)
      if i < k - 1:
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
      p = optax.apply_updates(p, u)
  want, _ = apply_steps(inner(), params, means)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_skips_nan_step():
  params = tu.make_params(SHAPES)
  tx = optax.apply_if_finite(scale_optax.scale(0.05, weight_decay=0.1),
                             max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  g1, g3 = _grads(1), _grads(3)
  u, state = update(g1, state, params)
  params1 = optax.apply_updates(params, u)

  bad = jax.tree.map(lambda x: x, _grads(2))
  bad['layers']['0']['mlp']['up_proj']['kernel'] = (
      bad['layers']['0']['mlp']['up_proj']['kernel'].at[0, 0].set(jnp.nan))
  u, state2 = update(bad, state, params1)
  params2 = optax.apply_updates(params1, u)
  chex.assert_trees_all_equal(params2, params1)
  chex.assert_trees_all_equal(state2.inner_state, state.inner_state)
  assert int(state2.notfinite_count) == 1
  assert not bool(state2.last_finite)

  u, state3 = update(g3, state2, params2)
  params3 = optax.apply_updates(params2, u)
  want, _ = apply_steps(scale_optax.scale(0.05, weight_decay=0.1), params,
                        [g1, g3])
  chex.assert_trees_all_close(params3, want, rtol=1e-6, atol=1e-6)
  chex.assert_tree_all_finite(params3)


@pytest.mark.parametrize('make', [
    lambda: scale_optax.scale(optax.cosine_decay_schedule(0.1, 10), weight_decay=0.1),
    lambda: scale_optax.column_normalized_sgd(0.1),
    lambda: scale_optax.first_last_momentum(0.1),
    lambda: scale_optax.scale(0.1, normalization='sign'),
], ids=['scale_schedule', 'sgd', 'first_last', 'sign'])
def test_init_accepts_shape_dtype_structs(make):
  tx = make()
  abstract = tu.abstract_params(SHAPES)
  abstract_state = jax.eval_shape(tx.init, abstract)
  real_state = tx.init(tu.make_params(SHAPES))
  assert (jax.tree.structure(abstract_state)
          == jax.tree.structure(real_state))
  for a, r in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(real_state)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
  # init also runs directly on ShapeDtypeStruct leaves (no tracing).
  direct = jax.eval_shape(lambda: tx.init(abstract))
  assert jax.tree.structure(direct) == jax.tree.structure(real_state)


# ------------------------------------------------------------ flax.nnx ----

def test_flax_nnx_optimizer():
  from flax import nnx

  class TinyLM(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(16, 8, rngs=rngs)
      self.mlp = nnx.Linear(8, 8, rngs=rngs)
      self.norm = nnx.RMSNorm(8, rngs=rngs)
      self.lm_head = nnx.Linear(8, 16, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
      h = self.embed(tokens)
      h = self.norm(h + jax.nn.gelu(self.mlp(h)))
      return self.lm_head(h)

  model = TinyLM(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, scale_optax.scale(0.05, weight_decay=0.1),
                            wrt=nnx.Param)

  # Momentum only for lm_head: one EMA leaf of the head's shape.
  ema_leaves = jax.tree_util.tree_flatten_with_path(
      optimizer.opt_state[0].inner_state.ema)[0]
  ema_paths = [scale_optax.path_str(p) for p, _ in ema_leaves]
  assert len(ema_paths) == 1 and ema_paths[0].startswith('lm_head/kernel'), (
      ema_paths)
  assert ema_leaves[0][1].shape == (8, 16)
  # AdamW moments only for the vectors (mlp bias, norm scale).
  mu = optimizer.opt_state[1].inner_states['vector'].inner_state[0].mu
  mu_paths = sorted(scale_optax.path_str(p).removesuffix('/value') for p, _ in
                    jax.tree_util.tree_flatten_with_path(mu)[0])
  assert mu_paths == ['mlp/bias', 'norm/scale'], mu_paths

  tokens = jnp.arange(12).reshape(2, 6) % 16
  targets = (tokens + 1) % 16

  def loss_fn(model):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  loss0, grads = train_step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(jnp.any(a != b)), before, after))
  assert changed and all(changed)
  assert int(optimizer.step[...]) == 1
  # The head momentum is (1 - 0.9) * its first gradient.
  head_m = optimizer.opt_state[0].inner_state.ema['lm_head']['kernel']
  np.testing.assert_allclose(np.asarray(head_m[...]),
                             0.1 * np.asarray(grads['lm_head']['kernel'][...]),
                             rtol=1e-5, atol=1e-8)
  losses = [float(loss0)] + [float(train_step(model, optimizer)[0])
                             for _ in range(4)]
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0]
