"""A tiny LLaMA with random weights for the export tests (no data pipeline).

Every parameter, the norm scales included, is random, so a swapped or
mis-transposed tensor changes the logits. Imports only jax, flax and the model
(the Hugging Face test runs where tfds and grain are not installed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scale_optax import path_str
from train.config import ModelConfig
from train.model import Llama

# Head size 8, d_ff and vocab not multiples of d_model: a transposed matrix
# has another shape.
TINY = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=80,
                   max_seq_len=64, rope_theta=500.0, norm_eps=1e-5)


def tiny_config(**overrides) -> ModelConfig:
  return dataclasses.replace(TINY, **overrides)


def random_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """``path -> array`` in ``config.param_dtype``: matrices N(0, 0.2), norm
  scales 1 + N(0, 0.2)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      abstract_params(config))[0]:
    values = rng.normal(0.0, 0.2, leaf.shape) + (leaf.ndim == 1)
    out[path_str(path)] = values.astype(jnp.dtype(config.param_dtype))
  return out


def model_with(config: ModelConfig, params: dict[str, np.ndarray]) -> Llama:
  """A :class:`Llama` holding ``params`` (``path -> array``)."""
  model = _abstract_model(config)
  state = nnx.state(model, nnx.Param)
  pure = jax.tree_util.tree_map_with_path(
      lambda p, _: jnp.asarray(params[path_str(p)]), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def abstract_params(config: ModelConfig) -> dict:
  """The pure-dict tree of the model's params as one-device abstract leaves."""
  model = _abstract_model(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _abstract_model(config: ModelConfig) -> Llama:
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


@nnx.jit
def _forward(model: Llama, tokens: jax.Array) -> jax.Array:
  return model(tokens)


def logits(model: Llama, tokens: np.ndarray) -> np.ndarray:
  # Full float32 matmuls also on GPUs (whose default may be TF32), so the
  # comparison with torch on the CPU holds to float32 rounding anywhere.
  with jax.default_matmul_precision('highest'):
    return np.asarray(_forward(model, jnp.asarray(tokens)))


def tokens(config: ModelConfig, batch: int = 2, length: int = 24,
           seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(
      0, config.vocab_size, (batch, length)).astype(np.int32)


TEXT = [
    'In the beginning God created the heaven and the earth.',
    'And the earth was without form, and void; and darkness was upon the '
    'face of the deep.',
    'The quick brown fox jumps over the lazy dog while the cat sleeps.',
    'def square(x): return x * x  # numbers, strings and lists in Python',
] * 20


def tiny_tokenizer(vocab_size: int = 90) -> bytes:
  """A SentencePiece BPE model with the trainer's special ids (pad 0, eos 1,
  unk 2, no BOS), trained on a few sentences."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT), model_writer=out, model_type='bpe',
      vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
      minloglevel=2)
  return out.getvalue()
