"""End-to-end runs of the real trainer on a small model and the embedded data."""

import json
import math
import shutil

import jax

import numpy as np
import orbax.checkpoint as ocp
import pytest

import harness
from test_pinned import np_cross_entropy, np_llama_logits
from train import data as data_lib
from train.config import load_config
from train.loop import train

# The harness's small model, evaluated on more tokens and logged every 10 steps.
SMALL = [*harness.SMALL_ARGS, 'train.eval_tokens=2048', 'train.log_every=10']

# A learning rate per optimizer that trains this model in 80 steps (from a
# small sweep; see the README's optimizer table).
LEARNING_RATES = {
    'scale': 3e-3, 'sgd_column_norm': 3e-3, 'sgd_row_norm': 3e-3,
    'scale_row_norm': 3e-3, 'scale_sign': 1e-3, 'scale_first_last': 3e-3,
    'adamw': 1e-2, 'sgd': 1.0, 'sgd_momentum': 0.3, 'muon': 0.02,
    'adafactor': 0.2, 'lion': 1e-3,
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def unigram(data_dir):
  config = load_config(None, SMALL + [f'data.data_dir={data_dir}'])
  return data_lib.unigram_perplexity(data_lib.prepare(config.data, 512))


def small_config(data_dir, run_dir, *overrides):
  return load_config(None, SMALL + [f'data.data_dir={data_dir}',
                                    f'train.run_dir={run_dir}', *overrides])


def direct_eval_loss(config, params) -> float:
  """The eval loss by definition: every target token of the eval batches
  scored by a NumPy LLaMA on ``params``, averaged over the tokens."""
  dataset = data_lib.prepare(config.data, config.model.vocab_size)
  batches = dataset.eval_batches(config.data.batch_size, config.data.seq_len,
                                 config.train.eval_tokens)
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  total = sum(np_cross_entropy(np_llama_logits(params, b['inputs'],
                                               config.model),
                               b['targets']).sum() for b in batches)
  return float(total) / sum(b['targets'].size for b in batches)


def test_every_optimizer_has_a_learning_rate():
  from train.optim import OPTIMIZERS  # pylint: disable=g-import-not-at-top
  assert set(LEARNING_RATES) == set(OPTIMIZERS)


# SCALE and AdamW in the default suite; the others are the same loop with
# another tx (every optimizer's routing and first update are pinned in
# test_pinned.py).
_DEFAULT_E2E = ('scale',)


@pytest.mark.parametrize('name', [
    n if n in _DEFAULT_E2E else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(LEARNING_RATES)])
def test_each_optimizer_trains_below_the_unigram_baseline(
    name, data_dir, unigram, tmp_path):
  config = small_config(data_dir, tmp_path, f'optimizer.name={name}',
                        f'optimizer.learning_rate={LEARNING_RATES[name]}',
                        'train.steps=80', 'train.eval_every=80',
                        'train.checkpoint_every=80', 'train.log_every=10')
  summary = train(config, resume=False)
  losses = [r['loss'] for r in harness.records(tmp_path, 'train')]
  assert len(losses) == 8
  assert np.mean(losses[-2:]) < math.log(512) - 0.5, losses  # Init: log V.
  assert math.isfinite(summary['eval_perplexity'])
  assert summary['eval_perplexity'] < unigram, (summary, unigram)
  assert summary['steps'] == 80 and summary['tokens'] == 80 * 8 * 64
  # Beside the baseline (which a wrong eval passes too): the reported value
  # is the eval loss of the final parameters, computed directly.
  want = direct_eval_loss(config, _restore_params(tmp_path, 80))
  np.testing.assert_allclose(summary['eval_loss'], want, rtol=1e-4)
  np.testing.assert_allclose(summary['eval_perplexity'], math.exp(want),
                             rtol=2e-4)


# The rate each step's update used, by hand: lr 1e-3, 20 steps, warmup 2
# steps from 0, then cosine over 18 steps to 1e-4; step s uses the schedule
# at s - 1 (the first update has rate 0).
LOGGED_RATES = {1: 0.0, 2: 5e-4, 3: 1e-3, 12: 5.5e-4,
                20: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 17 / 18))}


def test_run_outputs_and_memory_report(data_dir, tmp_path):
  config = small_config(data_dir, tmp_path, 'train.steps=20',
                        'train.eval_every=10', 'train.checkpoint_every=10',
                        'train.log_every=1', 'train.keep_checkpoints=1')
  summary = train(config, resume=False)
  rates = {r['step']: r['learning_rate'] for r in harness.records(tmp_path, 'train')}
  for step, rate in LOGGED_RATES.items():
    np.testing.assert_allclose(rates[step], rate, rtol=1e-5, atol=1e-12,
                               err_msg=f'step {step}')
  evaluation = harness.records(tmp_path, 'eval')[-1]
  want = direct_eval_loss(config, _restore_params(tmp_path, 20))
  np.testing.assert_allclose(evaluation['loss'], want, rtol=1e-4)
  np.testing.assert_allclose(evaluation['perplexity'], math.exp(want),
                             rtol=2e-4)
  assert evaluation['eval_tokens'] == 4 * 8 * 64
  assert (tmp_path / 'loss.png').stat().st_size > 10_000
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert json.loads((tmp_path / 'summary.json').read_text()) == summary
  assert [r['step'] for r in harness.records(tmp_path, 'eval')] == [10, 20]
  assert ocp.CheckpointManager(tmp_path / 'checkpoints').all_steps() == [20]
  # SCALE keeps the LM head's momentum and AdamW moments for the 1-D leaves,
  # plus 4 int32 counters (EMA, Adam, and the two learning-rate schedules).
  d, v, n_layers = 64, 512, 2
  vector_params = (2 * n_layers + 1) * d
  assert summary['opt_state_bytes'] == 4 * (d * v + 2 * vector_params) + 4 * 4
  assert summary['param_bytes'] == 4 * (2 * d * v + n_layers * (
      4 * d * d + 3 * d * 176 + 2 * d) + d)


def _restore_params(run_dir, step):
  manager = ocp.CheckpointManager(run_dir / 'checkpoints')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return restored['state']['params']


def test_resume_continues_exactly(data_dir, tmp_path):
  config = small_config(data_dir, tmp_path, 'train.steps=30',
                        'train.eval_every=100', 'train.checkpoint_every=15',
                        'train.log_every=1', 'train.keep_checkpoints=2')
  train(config, resume=False)
  straight_losses = [r['loss'] for r in harness.records(tmp_path, 'train')]
  straight_params = _restore_params(tmp_path, 30)
  # Lose the last checkpoint, as if the run had died after step 15's save.
  shutil.rmtree(tmp_path / 'checkpoints' / '30')
  summary = train(config)
  assert summary['steps'] == 30
  assert [r['step'] for r in harness.records(tmp_path, 'train')] == list(range(1, 31))
  assert [r['loss'] for r in harness.records(tmp_path, 'train')] == straight_losses
  resumed_params = _restore_params(tmp_path, 30)
  for a, b in zip(jax.tree.leaves(straight_params),
                  jax.tree.leaves(resumed_params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_unpacked_documents_resume_exactly_and_eval_counts_loss_tokens(
    data_dir, tmp_path):
  """data.packing=false (pads weighted 0) through the loop, killed and resumed."""
  config = small_config(data_dir, tmp_path, 'data.packing=false',
                        'train.steps=12', 'train.eval_every=12',
                        'train.checkpoint_every=6', 'train.log_every=1',
                        'train.eval_tokens=1000')
  train(config, resume=False)
  losses = lambda: [(r['step'], r['loss']) for r in harness.records(tmp_path, 'train')]
  straight = losses()
  straight_params = _restore_params(tmp_path, 12)
  shutil.rmtree(tmp_path / 'checkpoints' / '12')
  train(config)
  assert losses() == straight and len(straight) == 12
  for a, b in zip(jax.tree.leaves(straight_params),
                  jax.tree.leaves(_restore_params(tmp_path, 12))):
    np.testing.assert_array_equal(a, b)
  dataset = data_lib.prepare(config.data, 512)
  batches = dataset.eval_batches(8, 64, 1000)
  loss_tokens = sum(int(b['weights'].sum()) for b in batches)
  assert loss_tokens >= 1000 > loss_tokens - int(batches[-1]['weights'].sum())
  assert loss_tokens < len(batches) * 8 * 64  # pads are not counted
  assert harness.records(tmp_path, 'eval')[-1]['eval_tokens'] == loss_tokens


def test_cli_main_command(data_dir, tmp_path):
  result = harness.run_train(
      [*SMALL, f'data.data_dir={data_dir}', f'train.run_dir={tmp_path}',
       'train.steps=10', 'train.eval_every=10'], timeout=300)
  assert result.rc == 0, result.stderr[-2000:]
  assert 'step 10: eval loss' in result.stdout
  assert 'summary: scale | step 10 |' in result.stdout
  assert (tmp_path / 'checkpoints' / '10').is_dir()
