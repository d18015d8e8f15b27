"""A run sharded over 4 devices, exported, then a new run started from the
export (``train.init_from``) evaluates to the same loss."""

import json

import pytest

import harness
from train import export


@pytest.mark.slow
def test_sharded_run_exports_and_a_new_run_starts_from_it(tmp_path_factory,
                                                          tmp_path):
  data_dir = harness.shared_data_dir(tmp_path_factory)
  cache_dir = harness.compile_cache_dir(tmp_path_factory)
  first, second, hf = tmp_path / 'first', tmp_path / 'second', tmp_path / 'hf'
  harness.run_train(harness.small_args(
      first, data_dir, 'train.steps=8', 'train.eval_every=8',
      'train.checkpoint_every=4'), devices=4, jax_cache=cache_dir).check()
  # Gathered on one device here from the 4-device (fsdp=4) checkpoint.
  assert export.main(['--run-dir', str(first), '--out', str(hf),
                      '--max-shard-size', '200KB']) == 0
  assert (hf / 'model.safetensors.index.json').is_file()
  # One step with a learning rate too small to change a float32 weight: the
  # eval after it sees exactly the exported weights.
  output = harness.run_train(harness.small_args(
      second, data_dir, f'train.init_from={hf}', 'train.steps=1',
      'optimizer.learning_rate=1e-30'), devices=4, jax_cache=cache_dir).check()
  assert f'initialized from the Hugging Face model {hf}' in output
  summary = lambda run: json.loads((run / 'summary.json').read_text())
  assert summary(second)['eval_loss'] == summary(first)['eval_loss']


def test_init_from_a_mismatching_model_stops_with_one_line(tmp_path_factory,
                                                           tmp_path):
  data_dir = harness.shared_data_dir(tmp_path_factory)
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text(json.dumps({
      'architectures': ['LlamaForCausalLM'], 'vocab_size': 512,
      'hidden_size': 64, 'intermediate_size': 172, 'num_hidden_layers': 2,
      'num_attention_heads': 2, 'rms_norm_eps': 1e-6, 'rope_theta': 10000.0}))
  res = harness.run_train(harness.small_args(
      tmp_path / 'run', data_dir, f'train.init_from={hf}', 'train.steps=1'))
  assert res.rc == 1
  assert ('error: Hugging Face model ' in res.stderr and
          'intermediate_size=172 (expected 176: model.d_ff)' in res.stderr)
