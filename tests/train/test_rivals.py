"""The paper's other rows in the trainer: names, config section, runs."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from scale_optax import contrib
from train import rivals_config
from train.config import ConfigError, load_config
from train.loop import train
from train.optim import KNOWN, RIVALS, make_optimizer
from train.study import config as study_config

SMALL = ['model.vocab_size=512', 'model.d_model=64', 'model.n_layers=2',
         'model.n_heads=2', 'model.d_ff=176', 'data.seq_len=64',
         'data.batch_size=8', 'train.eval_tokens=2048', 'train.progress=false']
# The published settings per size (docs/sources.md).
PUBLISHED = {
    'llama_60m': {'galore': (128, 0.25), 'fira': (128, 0.25),
                  'apollo': (128, 1.0), 'apollo_mini': (1, 128.0)},
    'llama_1b': {'galore': (512, 0.25), 'fira': (512, 0.0625),
                 'apollo': (512, 1.0), 'apollo_mini': (1, 128.0)},
}


def test_every_rival_has_a_name_and_a_block():
  assert set(RIVALS) == set(rivals_config.NAMES) == {
      'galore', 'fira', 'apollo', 'apollo_mini', 'stable_spam', 'swan'}
  assert set(RIVALS) <= set(KNOWN)


@pytest.mark.parametrize('size', sorted(PUBLISHED))
def test_configs_carry_the_published_settings(size):
  for name, (rank, scale) in PUBLISHED[size].items():
    config = load_config(f'configs/{size}.yaml', [f'optimizer.name={name}'])
    block = getattr(config.rivals, name)
    assert (block.rank, block.scale, block.update_gap) == (rank, scale, 200)
    assert config.optimizer.learning_rate == 0.01      # Their rate, not SCALE's.
  mini = load_config(f'configs/{size}.yaml').rivals.apollo_mini
  assert mini.scale_front == (size == 'llama_60m')   # As the two scripts.


def test_published_rate_unless_overridden():
  base = load_config('configs/llama_60m.yaml')
  spam = load_config('configs/llama_60m.yaml', ['optimizer.name=stable_spam'])
  assert spam.optimizer.learning_rate == 8e-4
  mine = load_config('configs/llama_60m.yaml', ['optimizer.name=apollo',
                                                'optimizer.learning_rate=3e-3'])
  assert mine.optimizer.learning_rate == 3e-3
  block = load_config('configs/llama_60m.yaml', [
      'optimizer.name=galore', 'rivals.galore.learning_rate=2e-2'])
  assert block.optimizer.learning_rate == 2e-2
  # Other optimizers keep the file's rate.
  assert load_config('configs/llama_60m.yaml', ['optimizer.name=adamw']
                     ).optimizer.learning_rate == base.optimizer.learning_rate


@pytest.mark.parametrize('override, message', [
    ('rivals.galore.rnk=3', 'rivals.galore.rnk: unknown key'),
    ('rivals.apollo.rank=0', 'rivals.apollo.rank: must be >= 1'),
    ('rivals.fira.scale=-1', 'rivals.fira.scale: must be positive'),
    ('rivals.stable_spam.theta=1.0', 'rivals.stable_spam.theta: must be in'),
    ('rivals.lion.rank=2', 'rivals.lion: unknown key'),
])
def test_bad_rival_settings_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config('configs/tiny.yaml', [override])


def test_make_optimizer_uses_the_block():
  config = load_config('configs/tiny.yaml', SMALL + [
      'optimizer.name=galore', 'rivals.galore.rank=8'])
  tx, _ = make_optimizer(config.optimizer, 10, config.rivals)
  params = {'layers': {'0': {'attn': {'q_proj': {'kernel': np.zeros((64, 64))}}}},
            'lm_head': {'kernel': np.zeros((64, 512))}}
  state = jax.eval_shape(tx.init, params)
  is_core = lambda x: isinstance(x, contrib.ProjectedAdamState)
  [core] = [x for x in jax.tree.leaves(state, is_leaf=is_core) if is_core(x)]
  basis = core.basis['layers']['0']['attn']['q_proj']['kernel']
  assert basis.shape == (64, 8)


def test_study_accepts_rivals_by_name():
  study = study_config.parse_study({
      'output_dir': 'runs/x', 'base': {'train': {'steps': 10}},
      'optimizers': {name: [1e-3] for name in RIVALS}, 'seeds': [0]})
  assert set(study.optimizers) == set(RIVALS)
  spec = study_config.sweep_specs(study)[0]
  assert spec.config.optimizer.learning_rate == 1e-3    # The sweep's rate.


def test_study_runs_saved_before_the_rivals_section_stay_valid():
  from train.config import to_dict  # pylint: disable=g-import-not-at-top
  from train.study import runner  # pylint: disable=g-import-not-at-top
  config = load_config('configs/tiny.yaml')
  saved = to_dict(config)
  del saved['rivals']
  assert runner.config_matches(saved, config)
  other = load_config('configs/tiny.yaml', ['rivals.galore.rank=8'])
  assert not runner.config_matches(saved, other)


# A rate per method that trains the small model in 60 steps.
RATES = {'galore': 1e-2, 'fira': 1e-2, 'apollo': 1e-2, 'apollo_mini': 1e-2,
         'stable_spam': 3e-3, 'swan': 3e-3}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


# GaLore by default (the SVD refresh inside the trainer's compiled step); the
# others, about 25 s of CPU each, with -m slow.
@pytest.mark.slow  # Each rival's numerics are pinned in tests/scale_optax.
@pytest.mark.parametrize('name', [
    'galore', 'fira', 'apollo', 'apollo_mini', 'stable_spam', 'swan'])
def test_each_rival_trains(name, data_dir, tmp_path):
  config = load_config(None, SMALL + [
      f'data.data_dir={data_dir}', f'train.run_dir={tmp_path}',
      f'optimizer.name={name}', f'optimizer.learning_rate={RATES[name]}',
      'rivals.galore.update_gap=20', 'rivals.apollo_mini.update_gap=20',
      'train.steps=60', 'train.eval_every=60', 'train.checkpoint_every=60',
      'train.log_every=10'])
  summary = train(config, resume=False)
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  losses = [r['loss'] for r in map(json.loads, lines) if r['kind'] == 'train']
  assert np.mean(losses[-2:]) < math.log(512) - 0.5, losses   # Init: log V.
  assert math.isfinite(summary['eval_perplexity'])
