"""SCALE on Flax models it was not written for: nnx and linen, attention.

Covers the paths nnx.Optimizer shows (boxed at init, plain at update), biases
of rank 2 (Flax attention), tied embeddings, and a linen model that trains.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scale_optax

VOCAB, D, HEADS = 16, 8, 2


class NnxLM(nnx.Module):
  """Embed -> MultiHeadAttention -> LayerNorm -> a head named 'decoder'."""

  def __init__(self, rngs, tied=False):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D,
                                       qkv_features=D, decode=False, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.tied = tied
    if not tied:
      self.decoder = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = self.norm(h + self.attn(h))
    return self.embed.attend(h) if self.tied else self.decoder(h)


def attention_axes(path, leaf):
  """Fan-in axes of Flax attention kernels: q/k/v [in, H, K], out [H, K, out]."""
  if path.endswith('attn/out/kernel'):
    return (0, 1)
  return 0 if leaf.ndim == 3 else None


TOKENS = jnp.arange(24).reshape(3, 8) % VOCAB
TARGETS = (TOKENS * 3 + 1) % VOCAB


def _loss(model):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(TOKENS), TARGETS).mean()


@nnx.jit
def _nnx_step(model, optimizer):
  loss, grads = nnx.value_and_grad(_loss)(model)
  optimizer.update(model, grads)
  return loss, grads


def _leaf_paths(tree):
  return sorted(scale_optax.path_str(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(tree)[0])


def _ema(opt_state):
  return opt_state[0].inner_state.ema


def _adam_mu(opt_state):
  return opt_state[1].inner_states['vector'].inner_state[0].mu


# ----------------------------------------------- 1. nnx paths, init = update --

@pytest.mark.parametrize('output_layer', [
    r'^decoder/kernel$',
    lambda path, leaf: path == 'decoder/kernel',
    {'embed': False, 'attn': False, 'norm': False, 'decoder': True},
    lambda params: {'embed': False, 'attn': False, 'norm': False,
                    'decoder': True},
], ids=['anchored_regex', 'path_callable', 'prefix_pytree', 'optax_callable'])
def test_nnx_exact_paths_work_at_init_and_update(output_layer):
  model = NnxLM(nnx.Rngs(0))
  tx = scale_optax.scale(0.05, output_layer=output_layer,
                         reduction_axes=lambda p, x: attention_axes(p, x))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert _leaf_paths(_ema(optimizer.opt_state)) == ['decoder/kernel']
  loss0, grads = _nnx_step(model, optimizer)
  head_m = _ema(optimizer.opt_state)['decoder']['kernel'][...]
  np.testing.assert_allclose(np.asarray(head_m),
                             0.1 * np.asarray(grads['decoder']['kernel'][...]),
                             rtol=1e-5, atol=1e-8)
  losses = [float(loss0)] + [float(_nnx_step(model, optimizer)[0])
                             for _ in range(2)]
  assert losses[-1] < losses[0], losses


def test_nnx_reduction_axes_pytree_with_exact_paths():
  model = NnxLM(nnx.Rngs(0))
  axes = {'attn': {'query': {'kernel': 0}, 'key': {'kernel': 0},
                   'value': {'kernel': 0}, 'out': {'kernel': (0, 1)}}}
  params = nnx.state(model, nnx.Param)
  full = jax.tree.map(lambda _: None, nnx.to_pure_dict(params))
  for name, spec in axes['attn'].items():
    full['attn'][name]['kernel'] = spec['kernel']
  tx = scale_optax.scale(0.05, output_layer='decoder', reduction_axes=full)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss0, _ = _nnx_step(model, optimizer)
  assert np.isfinite(float(loss0))


def test_nnx_error_lists_writable_paths():
  model = NnxLM(nnx.Rngs(0))
  tx = scale_optax.scale(0.05, output_layer=r'^lm_head/kernel$',
                         reduction_axes=attention_axes)
  with pytest.raises(ValueError, match='output_layer') as err:
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  msg = str(err.value)
  assert "'decoder/kernel'" in msg and "'attn/out/kernel'" in msg, msg
  assert '/value' not in msg.replace('attn/value/', ''), msg
  assert 'bias' not in msg, msg   # Biases are vectors, not candidates.


def test_nnx_rank3_error_names_path_without_value_suffix():
  model = NnxLM(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'attn/key/kernel' has rank 3"):
    nnx.Optimizer(model, scale_optax.scale(0.05, output_layer='decoder'),
                  wrt=nnx.Param)


def test_path_str_drops_box_value_only():
  boxed = nn.LogicallyPartitioned(jnp.ones((2, 3)), names=('a', 'b'))
  tree = {'decoder': {'kernel': boxed}, 'attn': {'value': {'kernel': 1.0}}}
  assert _leaf_paths(tree) == ['attn/value/kernel', 'decoder/kernel']


# --------------------------------------- 2. rank-2 biases are vectors ---------

def test_nnx_attention_biases_take_adamw():
  model = NnxLM(nnx.Rngs(0))
  tx = scale_optax.scale(0.05, output_layer='decoder',
                         reduction_axes=attention_axes,
                         vector_learning_rate=0.01)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert _leaf_paths(_adam_mu(optimizer.opt_state)) == [
      'attn/key/bias', 'attn/out/bias', 'attn/query/bias', 'attn/value/bias',
      'decoder/bias', 'norm/bias', 'norm/scale']
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _, grads = _nnx_step(model, optimizer)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  g = np.asarray(grads['attn']['query']['bias'][...])
  delta = after['attn']['query']['bias'] - before['attn']['query']['bias']
  assert g.shape == (HEADS, D // HEADS)
  # AdamW's first step: -lr * g / (|g| + eps), i.e. -lr * sign(g).
  np.testing.assert_allclose(np.asarray(delta), -0.01 * np.sign(g),
                             rtol=1e-3, atol=1e-6)


def test_vector_mask_false_routes_by_rank_only():
  params = nnx.to_pure_dict(nnx.state(NnxLM(nnx.Rngs(0)), nnx.Param))
  labels = scale_optax.matrix_or_vector(params, vector_mask=False)
  assert labels['attn']['query']['bias'] == 'matrix'
  assert labels['attn']['out']['bias'] == 'vector'
  assert scale_optax.matrix_or_vector(params)['attn']['query']['bias'] == (
      'vector')


@pytest.mark.parametrize('vector_mask', [
    lambda params: jax.tree.map(lambda x: x.ndim == 2 and x.shape != (D, D),
                                params),
    lambda path, leaf: path.endswith('/bias'),
    {'params': {'query': {'bias': True, 'kernel': False},
                'key': {'bias': True, 'kernel': False},
                'value': {'bias': True, 'kernel': False},
                'out': False}},
], ids=['optax_callable', 'path_callable', 'pytree'])
def test_linen_attention_vector_mask_forms(vector_mask):
  attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
  params = attn.init(jax.random.key(0), jnp.ones((1, 3, D)))
  for mask in (vector_mask, scale_optax.DEFAULT_VECTOR_MASK):
    labels = scale_optax.matrix_or_vector(params, vector_mask=mask)['params']
    for name in ('query', 'key', 'value'):
      assert labels[name]['bias'] == 'vector', (mask, name)
      assert labels[name]['kernel'] == 'matrix', (mask, name)
    assert labels['out'] == {'bias': 'vector', 'kernel': 'matrix'}


def test_vector_mask_bad_pytree_names_path():
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"vector_mask.*'b'"):
    scale_optax.scale(0.1, output_layer='w',
                      vector_mask={'w': False}).init(params)


# ---------------------------------------------- 4. tied embeddings -------------

def _tied_reference_delta(table_grad, lr):
  """One SCALE step on a tied table: EMA (0.1 g) normalized over d (axis 1)."""
  m = 0.1 * np.asarray(table_grad, np.float64)
  rms = np.sqrt(np.mean(m * m, axis=1, keepdims=True))
  return -lr * m / np.maximum(rms, 1e-8)


@pytest.mark.parametrize('tied_embedding', [
    'embed/embedding', {'embed': True, 'attn': False, 'norm': False}],
    ids=['regex', 'prefix_pytree'])
def test_nnx_tied_embedding_gets_momentum_and_per_token_scale(tied_embedding):
  model = NnxLM(nnx.Rngs(0), tied=True)
  tx = scale_optax.scale(0.05, tied_embedding=tied_embedding,
                         reduction_axes=attention_axes)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert _leaf_paths(_ema(optimizer.opt_state)) == ['embed/embedding']
  before = np.asarray(model.embed.embedding[...])
  _, grads = _nnx_step(model, optimizer)
  delta = np.asarray(model.embed.embedding[...]) - before
  want = _tied_reference_delta(grads['embed']['embedding'][...], 0.05)
  np.testing.assert_allclose(delta, want, rtol=1e-4, atol=1e-7)
  # One scale per vocabulary entry: each row of the update has RMS lr.
  rows = np.sqrt(np.mean(delta ** 2, axis=1))
  np.testing.assert_allclose(rows, 0.05, rtol=1e-4)


def test_tied_embedding_without_momentum_still_per_token():
  table = jnp.asarray(np.random.default_rng(0).standard_normal((VOCAB, D)))
  params = {'embed': {'embedding': table}, 'mlp': {'kernel': jnp.ones((D, D))}}
  grads = jax.tree.map(lambda x: x * jnp.arange(1, x.shape[-1] + 1), params)
  tx = scale_optax.column_normalized_sgd(1.0, tied_embedding='embed')
  u, _ = tx.update(grads, tx.init(params), params)
  rms = np.sqrt(np.mean(np.square(np.asarray(u['embed']['embedding'])), 1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-5)


def test_default_output_layer_on_tied_model_suggests_tied_embedding():
  model = NnxLM(nnx.Rngs(0), tied=True)
  with pytest.raises(ValueError, match='tied_embedding') as err:
    nnx.Optimizer(model, scale_optax.scale(0.05, reduction_axes=attention_axes),
                  wrt=nnx.Param)
  assert "'embed/embedding'" in str(err.value)


@pytest.mark.parametrize('kwargs, match', [
    (dict(tied_embedding='wte'), r"tied_embedding='wte' selects no matrix.*"
     r"'embed/embedding'"),
    (dict(tied_embedding='embed',
          reduction_axes=lambda p, x: 0 if p == 'embed/embedding'
          else attention_axes(p, x)),
     r"reduction_axes 0 for 'embed/embedding' conflict with tied_embedding"),
    (dict(tied_embedding='attn/query/kernel', reduction_axes=attention_axes),
     r"tied_embedding selects 'attn/query/kernel' of shape \(8, 2, 4\)"),
], ids=['selects_nothing', 'conflicting_axes', 'not_a_table'])
def test_tied_embedding_mistakes_name_the_leaf(kwargs, match):
  model = NnxLM(nnx.Rngs(0), tied=True)
  with pytest.raises(ValueError, match=match):
    nnx.Optimizer(model, scale_optax.scale(0.05, **kwargs), wrt=nnx.Param)


# ------------------------------------------- linen, end to end -----------------

class LinenLM(nn.Module):
  """Embed -> causal self-attention -> MLP with biases -> head 'logits'."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(VOCAB, 32, name='embed')(tokens)
    mask = nn.make_causal_mask(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=4, name='attn')(
        nn.LayerNorm(name='ln1')(h), mask=mask)
    h = h + nn.Dense(32, name='mlp_out')(
        nn.gelu(nn.Dense(64, name='mlp_in')(nn.LayerNorm(name='ln2')(h))))
    return nn.Dense(VOCAB, name='logits')(nn.LayerNorm(name='ln_f')(h))


def test_linen_model_trains_with_scale():
  """Learn 'next token = previous token + 1 (mod VOCAB)'; the loss falls."""
  model = LinenLM()
  starts = jax.random.randint(jax.random.key(1), (16, 1), 0, VOCAB)
  seqs = (starts + jnp.arange(9)) % VOCAB
  inputs, targets = seqs[:, :-1], seqs[:, 1:]
  params = model.init(jax.random.key(0), inputs)
  tx = scale_optax.scale(
      optax.warmup_cosine_decay_schedule(0.0, 0.02, 5, 60, 0.002),
      output_layer='logits', vector_learning_rate=0.01,
      reduction_axes=attention_axes)
  opt_state = tx.init(params)
  labels = scale_optax.matrix_or_vector(params)['params']
  assert labels['attn']['query']['bias'] == 'vector'
  assert labels['attn']['query']['kernel'] == 'matrix'

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, inputs), targets).mean()

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(60):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[0] > 2.0, losses[0]     # About log(16) = 2.77 at the start.
  assert np.mean(losses[-5:]) < 0.3 * losses[0], losses
