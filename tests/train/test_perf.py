"""FLOPs per token, chip peaks and MFU (train/perf.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from train import perf
from train.config import ModelConfig


@dataclasses.dataclass
class FakeDevice:
  device_kind: str
  platform: str


LLAMA_60M = ModelConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8,
                        d_ff=1376)


def test_flops_per_token_by_hand():
  # L=8, d=512, f=1376, V=32000, T=256.
  layers = 8 * (4 * 512 * 512 + 3 * 512 * 1376)
  head = 512 * 32000
  expected = 6 * (layers + head) + 6 * 8 * 256 * 512
  assert perf.flops_per_token(LLAMA_60M, 256) == expected


def test_flops_per_token_excludes_embedding_and_norms():
  more_vocab = dataclasses.replace(LLAMA_60M, vocab_size=32001)
  # One more vocabulary entry adds d head weights (the embedding row is free).
  assert (perf.flops_per_token(more_vocab, 256)
          - perf.flops_per_token(LLAMA_60M, 256)) == 6 * 512


def test_attention_flops_grow_with_sequence():
  diff = perf.flops_per_token(LLAMA_60M, 512) - perf.flops_per_token(
      LLAMA_60M, 256)
  assert diff == 6 * 8 * 256 * 512  # 6 L d per extra position (causal).


def test_flops_per_token_rejects_bad_seq_len():
  with pytest.raises(ValueError, match='seq_len'):
    perf.flops_per_token(LLAMA_60M, 0)


@pytest.mark.parametrize('kind, platform, tflops', [
    ('NVIDIA H100 80GB HBM3', 'gpu', 989),
    ('NVIDIA H100 PCIe', 'gpu', 756),
    ('NVIDIA H100 NVL', 'gpu', 835),
    ('NVIDIA H200', 'gpu', 989),
    ('NVIDIA A100-SXM4-80GB', 'gpu', 312),
    ('TPU v4', 'tpu', 275),
    ('TPU v5 lite', 'tpu', 197),
    ('TPU v5p', 'tpu', 459),
    ('TPU v6 lite', 'tpu', 918),
])
def test_peak_of_known_chips(kind, platform, tflops):
  peak = perf.peak_flops_per_device(FakeDevice(kind, platform), jnp.bfloat16,
                                    None)
  assert peak == pytest.approx(tflops * 1e12)


def test_peak_unknown_chip_or_dtype_is_none():
  h100 = FakeDevice('NVIDIA H100 80GB HBM3', 'gpu')
  assert perf.peak_flops_per_device(h100, jnp.float32, None) is None
  assert perf.peak_flops_per_device(
      FakeDevice('NVIDIA GeForce RTX 4090', 'gpu'), 'bfloat16', None) is None
  assert perf.peak_flops_per_device(jax.devices()[0], 'bfloat16', None) is None


def test_peak_override_wins():
  cpu = jax.devices()[0]
  assert perf.peak_flops_per_device(cpu, jnp.float32, 0.5) == 0.5e12
  with pytest.raises(ValueError, match='positive'):
    perf.peak_flops_per_device(cpu, jnp.float32, 0.0)


def test_mfu():
  assert perf.mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
  assert perf.mfu(1000.0, 1e9, None) is None
