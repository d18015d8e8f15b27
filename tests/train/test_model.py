"""Tests for train/model.py: the LLaMA model, its annotations and the loss."""

import math

import chex

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train.config import MeshConfig, ModelConfig
from train.model import Llama, loss_fn, param_count, rope

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                   max_seq_len=16)
SEQ = 16

# Param path -> logical axes, for layer i of the 2-layer model.
_LAYER = {
    'attn_norm/scale': ('norm',),
    'attn/q_proj/kernel': ('embed', 'heads'),
    'attn/k_proj/kernel': ('embed', 'heads'),
    'attn/v_proj/kernel': ('embed', 'heads'),
    'attn/o_proj/kernel': ('heads', 'embed'),
    'mlp_norm/scale': ('norm',),
    'mlp/gate_proj/kernel': ('embed', 'mlp'),
    'mlp/up_proj/kernel': ('embed', 'mlp'),
    'mlp/down_proj/kernel': ('mlp', 'embed'),
}
EXPECTED_AXES = {
    'embed/embedding': ('vocab', 'embed'),
    **{f'layers/{i}/{k}': v for i in range(2) for k, v in _LAYER.items()},
    'final_norm/scale': ('norm',),
    'lm_head/kernel': ('embed', 'vocab'),
}


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


@nnx.jit
def _loss(model, batch):
  return loss_fn(model, batch)


def _tokens(seed=0, batch=2, seq=SEQ, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab,
                            dtype=jnp.int32)


def _flat(state):
  return {'/'.join(map(str, path)): var
          for path, var in nnx.to_flat_state(state)}


@pytest.fixture(scope='module')
def model():
  return Llama(TINY, rngs=nnx.Rngs(0))


def test_output_shape_and_dtype(model):
  logits = _forward(model, _tokens())
  assert logits.shape == (2, SEQ, TINY.vocab_size)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_causal(model):
  tokens = _tokens(1)
  k = 7
  changed = tokens.at[:, k].set((tokens[:, k] + 1) % TINY.vocab_size)
  a, b = _forward(model, tokens), _forward(model, changed)
  np.testing.assert_allclose(a[:, :k], b[:, :k], rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, k:] - b[:, k:]))) > 1e-4


def test_sequence_longer_than_max_seq_len_rejected(model):
  with pytest.raises(ValueError, match='max_seq_len'):
    jax.eval_shape(lambda t: model(t), jax.ShapeDtypeStruct((1, SEQ + 1),
                                                            jnp.int32))


def test_rope_is_relative():
  head, theta = 8, 10000.0
  q = jax.random.normal(jax.random.key(0), (1, 1, head))  # [T, N, H]
  k = jax.random.normal(jax.random.key(1), (1, 1, head))

  def score(m, n):
    return float(jnp.sum(rope(q, jnp.array([m]), theta) *
                         rope(k, jnp.array([n]), theta)))

  for m, n in [(0, 0), (3, 1), (1, 3), (5, 12)]:
    for shift in (1, 7, 100):
      np.testing.assert_allclose(score(m + shift, n + shift), score(m, n),
                                 rtol=1e-4, atol=1e-4)
  # Depends on the offset: different differences give different scores.
  assert abs(score(3, 1) - score(1, 3)) > 1e-3


def test_rope_half_split_layout():
  head, theta, pos = 8, 500.0, 3.0
  x = jax.random.normal(jax.random.key(2), (1, 1, head))
  half = head // 2
  z = x[..., :half] + 1j * x[..., half:]  # Pairs (j, j + H/2).
  freq = theta ** (-np.arange(half) * 2.0 / head)
  rotated = z * np.exp(1j * pos * freq)
  expected = jnp.concatenate([rotated.real, rotated.imag], axis=-1)
  np.testing.assert_allclose(rope(x, jnp.array([pos]), theta), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rope(x, jnp.array([0]), theta), x, atol=1e-7)
  assert rope(x.astype(jnp.bfloat16), jnp.array([1]), theta).dtype == (
      jnp.bfloat16)


def test_param_paths_and_annotations(model):
  flat = _flat(nnx.state(model, nnx.Param))
  assert set(flat) == set(EXPECTED_AXES)
  assert set(_flat(nnx.state(model))) == set(EXPECTED_AXES)  # Params only.
  specs = _flat(nnx.get_partition_spec(nnx.state(model)))
  for path, var in flat.items():
    axes = var.out_sharding
    assert tuple(axes) == EXPECTED_AXES[path], path
    assert len(axes) == var.get_value().ndim, path
    assert specs[path].get_value() == jax.sharding.PartitionSpec(*axes), path
  d, v, f = TINY.d_model, TINY.vocab_size, TINY.d_ff
  assert flat['embed/embedding'].get_value().shape == (v, d)
  assert flat['lm_head/kernel'].get_value().shape == (d, v)
  assert flat['layers/1/attn/q_proj/kernel'].get_value().shape == (d, d)
  assert flat['layers/1/mlp/up_proj/kernel'].get_value().shape == (d, f)
  assert flat['layers/1/mlp/down_proj/kernel'].get_value().shape == (f, d)
  np.testing.assert_array_equal(flat['final_norm/scale'].get_value(),
                                np.ones(d))
  emb = flat['embed/embedding'].get_value()
  assert abs(float(jnp.std(emb)) - TINY.init_std) < 0.2 * TINY.init_std


def test_layer_index_is_int(model):
  paths = [p for p, _ in nnx.to_flat_state(nnx.state(model))]
  assert ('layers', 0, 'attn', 'q_proj', 'kernel') in paths
  assert ('lm_head', 'kernel') in paths


def test_rules_map_logical_names_to_mesh_axes():
  rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                for k, v in MeshConfig().rules.items())
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abstract = nnx.get_abstract_model(
        lambda: Llama(TINY, rngs=nnx.Rngs(0)), mesh)
    specs = _flat(nnx.get_partition_spec(abstract))
  P = jax.sharding.PartitionSpec
  assert specs['layers/0/attn/q_proj/kernel'].get_value() == P('fsdp',
                                                               'tensor')
  assert specs['layers/0/mlp/down_proj/kernel'].get_value() == P('tensor',
                                                                 'fsdp')
  assert specs['embed/embedding'].get_value() == P('tensor', 'fsdp')
  assert specs['final_norm/scale'].get_value() == P(None)
  lm_head = _flat(abstract)['lm_head/kernel'].get_value()
  assert lm_head.sharding.spec == P('fsdp', 'tensor')


LLAMA_60M = ModelConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8,
                        d_ff=1376, max_seq_len=256)


@pytest.mark.parametrize('config', [
    TINY,
    ModelConfig(vocab_size=100, d_model=48, n_layers=3, n_heads=4, d_ff=80),
    LLAMA_60M,
], ids=['tiny', 'odd', 'llama_60m'])
def test_param_count_closed_form(config):
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  real = sum(math.prod(v.get_value().shape)
             for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert param_count(config) == real


def test_param_count_llama_60m():
  # 2 * 32000 * 512 + 8 * (4 * 512^2 + 3 * 512 * 1376 + 2 * 512) + 512.
  assert param_count(LLAMA_60M) == 58_073_600


def test_param_dtype_is_storage_dtype():
  cfg = ModelConfig(**{**TINY.__dict__, 'param_dtype': 'bfloat16',
                       'dtype': 'bfloat16'})
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  dtypes = {v.get_value().dtype for _, v in
            nnx.to_flat_state(nnx.state(abstract))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  logits = jax.eval_shape(lambda t: Llama(cfg, rngs=nnx.Rngs(0))(t),
                          jax.ShapeDtypeStruct((1, SEQ), jnp.int32))
  assert logits.dtype == jnp.float32


def test_bf16_compute_matches_f32(model):
  cfg = ModelConfig(**{**TINY.__dict__, 'dtype': 'bfloat16'})
  mixed = Llama(cfg, rngs=nnx.Rngs(0))  # Same seed: same f32 params.
  for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(mixed)),
                            nnx.to_flat_state(nnx.state(model))):
    assert a.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(a.get_value(), b.get_value())
  tokens = _tokens(2)
  low, ref = _forward(mixed, tokens), _forward(model, tokens)
  assert low.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(low)))
  rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


def test_loss_at_init_and_weights(model):
  inputs = _tokens(3, batch=4)
  targets = jnp.roll(inputs, -1, axis=1)
  loss, aux = _loss(model, {'inputs': inputs, 'targets': targets})
  assert loss.dtype == jnp.float32
  assert abs(float(loss) - math.log(TINY.vocab_size)) < 0.1
  assert float(aux['tokens']) == inputs.size
  np.testing.assert_allclose(aux['loss_sum'], loss * inputs.size, rtol=1e-5)
  # Masked tokens drop out: weights on the first half equal slicing the CE.
  weights = jnp.zeros(inputs.shape, jnp.float32).at[:2].set(1.0)
  masked, aux_m = _loss(model, {'inputs': inputs, 'targets': targets,
                                'weights': weights})
  first, _ = _loss(model, {'inputs': inputs[:2], 'targets': targets[:2]})
  np.testing.assert_allclose(masked, first, rtol=1e-5)
  assert float(aux_m['tokens']) == 2 * SEQ


def test_packed_segments_are_independent(model):
  tokens = _tokens(4, batch=1)
  cut = 6
  segment_ids = jnp.where(jnp.arange(SEQ) < cut, 1, 2)[None]
  positions = jnp.where(jnp.arange(SEQ) < cut, jnp.arange(SEQ),
                        jnp.arange(SEQ) - cut)[None]
  packed = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))(
      model, tokens, positions, segment_ids)
  alone = _forward(model, tokens[:, cut:])
  np.testing.assert_allclose(packed[:, cut:], alone, rtol=1e-5, atol=1e-5)


def test_adam_reduces_loss():
  model = Llama(TINY, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  inputs = _tokens(5, batch=4)
  batch = {'inputs': inputs, 'targets': jnp.roll(inputs, -1, axis=1)}

  @nnx.jit
  def step(model, optimizer, batch):
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, batch)) for _ in range(10)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
              max_seq_len=16)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1)}
  results = []
  for remat in (False, True):
    model = Llama(ModelConfig(**base, remat=remat), rngs=nnx.Rngs(0))
    grads_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch)[0])
    results.append(grads_fn(model))
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads_a),
                              nnx.to_pure_dict(grads_b), rtol=1e-5, atol=1e-7)
