"""What the trainer computes, pinned to values worked out independently.

Every expectation here is computed by hand or by a direct NumPy computation
written from the definitions, never by comparing the trainer with itself: the
learning-rate schedules (against closed forms and the authors' recipe in
docs/sources.md), gradient clipping's place in the chain, the
first update's rate per leaf, which parameters each named optimizer keeps
which state for, the LLaMA forward pass, and the eval loss and perplexity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import scale_optax
from train import mesh as mesh_lib
from train.config import ModelConfig, OptimizerConfig, load_config
from train.loop import evaluate
from train.model import Llama
from train.optim import OPTIMIZERS, make_optimizer, make_schedule
from train.state import make_setup
from train.step import make_eval_step

# ------------------------------------------------------------ schedules ----

# lr 1e-3, 1-D AdamW lr 2e-2 (the authors' 60M-350M peaks), 10% warmup,
# cosine to 10%, 1000 steps: warmup ends at step 100, the decay spans 900.
RECIPE = OptimizerConfig(learning_rate=1e-3, vector_learning_rate=2e-2,
                         warmup_ratio=0.1, min_lr_ratio=0.1)
# cos(pi * 899 / 900) = -cos(pi / 900): the last step is 0.5 * 9e-4 *
# (1 - cos(pi / 900)) = 2.7416e-9 above the floor 1e-4.
HAND = {  # step: (matrix rate, vector rate)
    0: (0.0, 0.0),                    # the first update has rate 0
    50: (5e-4, 1e-2),                 # halfway through the warmup
    100: (1e-3, 2e-2),                # end of warmup: the peaks
    550: (5.5e-4, 1.1e-2),            # halfway through the decay
    999: (1.0000274155e-4, 2.000054831e-3),  # the last step of the run
    1000: (1e-4, 2e-3),               # min_lr_ratio * peak
}


@pytest.mark.parametrize('step', sorted(HAND))
def test_matrix_and_vector_schedules_by_hand(step):
  matrix = make_schedule(RECIPE, 1000)
  vector = make_schedule(RECIPE, 1000, peak=RECIPE.vector_learning_rate)
  want_matrix, want_vector = HAND[step]
  np.testing.assert_allclose(float(matrix(step)), want_matrix, rtol=1e-6,
                             atol=1e-12)
  np.testing.assert_allclose(float(vector(step)), want_vector, rtol=1e-6,
                             atol=1e-12)


@pytest.mark.parametrize('steps,lr,adam_lr', [
    (11000, 1e-3, 2e-2),    # 60M
    (20000, 1e-3, 2e-2),    # 130M
    (100000, 2e-4, 1e-3),   # 1B
    (150000, 1e-4, 1e-3),   # 7B
])
def test_schedules_follow_the_authors_recipe(steps, lr, adam_lr):
  """Warmup over 10% of the steps from rate 0, cosine to 10% of the peak;
  the 1-D rate is ``adam_lr * lr_t / lr_max`` at every step."""
  config = OptimizerConfig(learning_rate=lr, vector_learning_rate=adam_lr,
                           warmup_ratio=0.1, min_lr_ratio=0.1)
  matrix = make_schedule(config, steps)
  vector = make_schedule(config, steps, peak=adam_lr)
  warmup = steps // 10
  assert float(matrix(0)) == 0.0
  np.testing.assert_allclose(float(matrix(warmup // 2)), lr / 2, rtol=1e-5)
  np.testing.assert_allclose(float(matrix(warmup)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(matrix(steps)), lr / 10, rtol=1e-5)
  for t in (warmup // 4, warmup - 1, warmup + 1, (warmup + steps) // 2,
            steps - 1):
    cosine = 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
    want = lr * t / warmup if t < warmup else lr * (0.1 + 0.9 * cosine)
    np.testing.assert_allclose(float(matrix(t)), want, rtol=1e-4)
    np.testing.assert_allclose(float(vector(t)), adam_lr * want / lr,
                               rtol=1e-4)


# ------------------------------------------------------- small trees ----

TINY = ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                   max_seq_len=8)


def _abstract_params(config: ModelConfig = TINY) -> dict:
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _group(path: str) -> str:
  """embed / lm_head / hidden (attention and MLP kernels) / norm."""
  if path.startswith('embed/'):
    return 'embed'
  if path.startswith('lm_head/'):
    return 'lm_head'
  return 'norm' if path.endswith('/scale') else 'hidden'


def _paths(tree) -> dict[str, jax.Array]:
  return {scale_optax.path_str(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -------------------------------------------------------------- clipping ----


def test_clipping_comes_before_the_optimizer():
  """A gradient of norm 10 x clip through plain SGD moves the params by
  exactly lr x clip (clipping after SGD would move them by min(10 lr, 1)
  x clip)."""
  lr, clip = 0.5, 2.0
  config = OptimizerConfig(name='sgd', learning_rate=lr, warmup_ratio=0.0,
                           min_lr_ratio=1.0, grad_clip=clip)
  tx, schedule = make_optimizer(config, 10)
  assert float(schedule(0)) == lr
  params = {'a': jnp.zeros((3, 4)), 'b': jnp.zeros((5,))}
  rng = np.random.default_rng(0)
  grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
           for k, v in params.items()}
  norm = float(optax.tree.norm(grads))
  grads = jax.tree.map(lambda g: g * (10 * clip / norm), grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  np.testing.assert_allclose(float(optax.tree.norm(moved)), lr * clip,
                             rtol=1e-5)
  for k in params:  # Along the gradient: - lr * clip * g / |g|.
    np.testing.assert_allclose(moved[k], -lr * clip * grads[k] / (10 * clip),
                               rtol=1e-5, atol=1e-7)


def test_no_clipping_when_grad_clip_is_null():
  """``grad_clip: null`` (the authors' recipe): the full gradient goes
  through."""
  config = OptimizerConfig(name='sgd', learning_rate=0.5, warmup_ratio=0.0,
                           min_lr_ratio=1.0, grad_clip=None)
  tx, _ = make_optimizer(config, 10)
  params = {'a': jnp.zeros((3, 4))}
  grads = {'a': jnp.full((3, 4), 100.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], -50.0, rtol=1e-6)


# ------------------------------------------------- the first update ----


def _unit_gradients(params) -> dict:
  """Gradients of magnitude in [0.5, 1.5] with random signs, per leaf."""
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape)
                            * rng.choice([-1.0, 1.0], x.shape), jnp.float32),
      params)


def _first_update(name: str, lr: float, vector_lr: float) -> dict:
  config = OptimizerConfig(name=name, learning_rate=lr,
                           vector_learning_rate=vector_lr, warmup_ratio=0.0,
                           min_lr_ratio=1.0, grad_clip=None)
  tx, _ = make_optimizer(config, 10)
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.1, x.dtype),
                        _abstract_params())
  updates, _ = jax.jit(tx.update)(_unit_gradients(params), tx.init(params),
                                  params)
  return _paths(updates)


@pytest.mark.parametrize('name', ['scale', 'sgd_column_norm', 'scale_row_norm',
                                  'scale_first_last', 'muon'])
def test_first_update_rates_per_leaf(name):
  """AdamW's first step is ``-rate * g / |g|`` (bias-corrected): the 1-D
  leaves move by exactly the vector rate; SCALE's matrices move with RMS
  exactly the matrix rate per column (row for the row-norm ablation). Muon's
  AdamW (embedding, head, vectors) is Nesterov's: its first step is
  ``1 + b1 (1 - b1) / (1 - b1^2) = 28/19`` times the rate."""
  lr, vector_lr = 1e-3, 2e-2
  updates = _first_update(name, lr, vector_lr)
  adam_groups = {'norm', 'embed', 'lm_head'} if name == 'muon' else {'norm'}
  adam_step = vector_lr * (28 / 19 if name == 'muon' else 1.0)
  for path, u in updates.items():
    u = np.asarray(u, np.float64)
    group = _group(path)
    if group in adam_groups:
      np.testing.assert_allclose(np.abs(u), adam_step, rtol=1e-5,
                                 err_msg=path)
    elif name != 'muon':
      axis = 1 if name == 'scale_row_norm' else 0
      rms = np.sqrt(np.mean(u * u, axis=axis))
      np.testing.assert_allclose(rms, lr, rtol=1e-5, err_msg=path)


# ---------------------------------------------------------- routing ----

NONE: frozenset = frozenset()
ADAM = frozenset({'mu', 'nu'})
SCALE_ROUTES = {'embed': NONE, 'lm_head': {'ema'}, 'hidden': NONE,
                'norm': ADAM}
NO_MOMENTUM_ROUTES = {'embed': NONE, 'lm_head': NONE, 'hidden': NONE,
                      'norm': ADAM}


def _everywhere(kinds):
  return {g: kinds for g in ('embed', 'lm_head', 'hidden', 'norm')}


# Which state each parameter group holds, per optimizer: the name of the
# state field holding a param-shaped array for that leaf ('ema': SCALE's
# LM-head momentum; 'mu', 'nu': Adam's moments; 'trace': SGD momentum; 'v':
# Adafactor's unfactored second moment, the tiny model's leaves being under
# its factoring size). Muon orthogonalizes the hidden matrices with its
# momentum 'mu' and leaves embedding, head and vectors to AdamW.
ROUTES = {
    'scale': SCALE_ROUTES,
    'scale_row_norm': SCALE_ROUTES,
    'scale_sign': SCALE_ROUTES,
    'sgd_column_norm': NO_MOMENTUM_ROUTES,
    'sgd_row_norm': NO_MOMENTUM_ROUTES,
    'scale_first_last': {'embed': {'ema'}, 'lm_head': {'ema'},
                         'hidden': NONE, 'norm': ADAM},
    'adamw': _everywhere(ADAM),
    'sgd': _everywhere(NONE),
    'sgd_momentum': _everywhere({'trace'}),
    'muon': {'embed': ADAM, 'lm_head': ADAM, 'hidden': {'mu'}, 'norm': ADAM},
    'adafactor': _everywhere({'v'}),
    'lion': _everywhere({'mu'}),
}


def test_every_named_optimizer_has_a_route():
  assert set(ROUTES) == set(OPTIMIZERS), (
      'add the new optimizers\' routing to ROUTES: '
      f'{sorted(set(OPTIMIZERS) - set(ROUTES))}')


def _state_kinds(state, params) -> dict[str, set[str]]:
  """Param path -> names of the state fields holding an array of its shape."""
  param_paths = _paths(params)
  kinds = {p: set() for p in param_paths}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    path = scale_optax.path_str(key_path)
    for param_path, param in param_paths.items():
      if path.endswith('/' + param_path) and leaf.shape == param.shape:
        field = next(k.name for k in reversed(key_path)
                     if isinstance(k, jax.tree_util.GetAttrKey))
        kinds[param_path].add(field)
  return kinds


@pytest.mark.parametrize('name', sorted(ROUTES))
def test_optimizer_routing_on_the_state(name):
  tx, _ = make_optimizer(OptimizerConfig(name=name), 10)
  params = _abstract_params()
  kinds = _state_kinds(jax.eval_shape(tx.init, params), params)
  want = {p: set(ROUTES[name][_group(p)]) for p in kinds}
  assert kinds == want


# ------------------------------------------------------- the model ----


def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, theta):
  """x [B, T, N, H]: pairs (j, j + H/2) rotated by t * theta^(-2j/H)."""
  t, head = x.shape[1], x.shape[-1]
  half = head // 2
  angle = np.arange(t)[:, None] * theta ** (-2.0 * np.arange(half) / head)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def np_llama_logits(p: dict, tokens: np.ndarray, cfg: ModelConfig
                    ) -> np.ndarray:
  """LLaMA's forward pass in float64 NumPy, from the definitions."""
  b, t = tokens.shape
  n, h = cfg.n_heads, cfg.d_model // cfg.n_heads
  x = p['embed']['embedding'][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.n_layers):
    layers = p['layers']  # Restored checkpoints key the layers by str.
    layer = layers[i] if i in layers else layers[str(i)]
    a = _np_rms_norm(x, layer['attn_norm']['scale'], cfg.norm_eps)
    proj = lambda name: (a @ layer['attn'][name]['kernel']).reshape(b, t, n, h)
    q = _np_rope(proj('q_proj'), cfg.rope_theta)
    k = _np_rope(proj('k_proj'), cfg.rope_theta)
    v = proj('v_proj')
    scores = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(h)
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum('bnqk,bknh->bqnh', weights, v).reshape(b, t, n * h)
    x = x + attended @ layer['attn']['o_proj']['kernel']
    m = _np_rms_norm(x, layer['mlp_norm']['scale'], cfg.norm_eps)
    gate = m @ layer['mlp']['gate_proj']['kernel']
    up = m @ layer['mlp']['up_proj']['kernel']
    silu = gate / (1 + np.exp(-gate))
    x = x + (silu * up) @ layer['mlp']['down_proj']['kernel']
  x = _np_rms_norm(x, p['final_norm']['scale'], cfg.norm_eps)
  return x @ p['lm_head']['kernel']


def _random_params(cfg: ModelConfig, seed: int) -> dict:
  """Weights large enough that every part shows in the logits; norm scales
  away from 1 so that a dropped scale shows too."""
  rng = np.random.default_rng(seed)
  def draw(x):
    if x.ndim == 1:
      return rng.uniform(0.5, 1.5, x.shape)
    return rng.standard_normal(x.shape) * 0.5
  return jax.tree.map(draw, _abstract_params(cfg))


def test_forward_matches_numpy_llama():
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24,
                    max_seq_len=8, rope_theta=100.0)
  params = _random_params(cfg, seed=0)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(
      state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
  nnx.update(model, state)
  tokens = np.random.default_rng(1).integers(0, 32, (2, 8))
  got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)),
                   np.float64)
  want = np_llama_logits(params, tokens, cfg)
  assert np.abs(want).max() > 1.0  # Not a near-zero output.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- eval ----


def np_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits).sum(-1))
  return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_eval_loss_and_perplexity_are_token_weighted():
  """Batches with 128, 5 and 37 weighted tokens: the eval loss is the mean
  over all weighted tokens (not the mean of the batch means)."""
  config = load_config(None, ['model.vocab_size=32', 'model.d_model=16',
                              'model.n_layers=1', 'model.n_heads=2',
                              'model.d_ff=24', 'model.init_std=0.5',
                              'data.seq_len=16', 'data.batch_size=8'])
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.optimizer, 10)
  setup = make_setup(config, mesh, tx, schedule)
  params = setup.init_params(0)
  rng = np.random.default_rng(0)
  counts = [128, 5, 37]
  batches = []
  for count in counts:
    tokens = rng.integers(0, 32, (8, 17), dtype=np.int32)
    weights = np.zeros(8 * 16, np.float32)
    weights[rng.choice(8 * 16, count, replace=False)] = 1.0
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                    'weights': weights.reshape(8, 16)})
  with jax.set_mesh(mesh):
    got = evaluate(setup, make_eval_step(setup), params, batches)

  np_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ce = [np_cross_entropy(np_llama_logits(np_params, b['inputs'],
                                          config.model), b['targets'])
        for b in batches]
  loss_sum = sum(float((c * b['weights']).sum()) for c, b in zip(ce, batches))
  want = loss_sum / sum(counts)
  batch_means = [float((c * b['weights']).sum()) / n
                 for c, b, n in zip(ce, batches, counts)]
  assert abs(np.mean(batch_means) - want) > 0.01  # The batches do differ.
  np.testing.assert_allclose(got['loss'], want, rtol=1e-4)
  np.testing.assert_allclose(got['perplexity'], math.exp(want), rtol=2e-4)
  assert got['eval_tokens'] == sum(counts)
