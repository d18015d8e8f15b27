"""Config loading: YAML + dotted overrides, typed and frozen, clear errors."""

import dataclasses
import pathlib

import pytest

from train.__main__ import resolve_config_path
from train.config import Config, ConfigError, load_config

CONFIGS = sorted(  # Trainer configs; study*.yaml are studies (test_study.py).
    p for p in (pathlib.Path(__file__).parents[2] / 'configs').glob('*.yaml')
    if not p.stem.startswith('study'))
PAPER_SHAPES = {  # d_model, d_ff, heads, layers, steps (scripts/<size>_scale.sh).
    'llama_60m': (512, 1376, 8, 8, 11_000),
    'llama_130m': (768, 2048, 12, 12, 20_000),
    'llama_350m': (1024, 2736, 16, 24, 60_000),
    'llama_1b': (2048, 5461, 32, 24, 100_000),
    'llama_7b': (4096, 11008, 32, 32, 150_000),
}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
  config = load_config(path)
  assert isinstance(config, Config)


@pytest.mark.parametrize('name', sorted(PAPER_SHAPES))
def test_paper_configs_have_the_papers_shapes_and_recipe(name):
  c = load_config(resolve_config_path(name))
  m = c.model
  assert (m.d_model, m.d_ff, m.n_heads, m.n_layers, c.train.steps) == \
      PAPER_SHAPES[name]
  assert (m.vocab_size, c.data.seq_len, c.data.batch_size) == (32000, 256, 512)
  assert (c.optimizer.warmup_ratio, c.optimizer.min_lr_ratio) == (0.1, 0.1)
  assert m.dtype == 'bfloat16' and c.data.name.startswith('c4/en')


def test_overrides_use_dotted_keys_and_yaml_values():
  c = load_config(resolve_config_path('tiny'),
                  ['optimizer.learning_rate=3e-3', 'optimizer.grad_clip=null',
                   'train.steps=7', 'optimizer.name=adamw'])
  assert c.optimizer.learning_rate == pytest.approx(3e-3)
  assert c.optimizer.grad_clip is None
  assert c.train.steps == 7 and c.optimizer.name == 'adamw'


def test_config_is_frozen():
  c = load_config(None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize('overrides, culprit', [
    (['optimizer.lernin_rate=1'], 'optimizer.lernin_rate'),
    (['modle.d_model=64'], 'modle'),
    (['model.d_model=abc'], 'model.d_model'),
    (['train.steps=1.5'], 'train.steps'),
    (['data.seq_len=4096'], 'data.seq_len'),
    (['model.n_heads=5'], 'model.n_heads'),
    (['optimizer.momentum=1.0'], 'optimizer.momentum'),
    (['optimizer.learning_rate=-1'], 'optimizer.learning_rate'),
    (['model.dtype=float64'], 'model.dtype'),
    (['mesh.rules={embed: pipeline}'], 'mesh.rules.embed'),
    (['mesh.data=-1', 'mesh.fsdp=-1'], 'mesh'),
    (['train.steps'], 'train.steps'),
])
def test_bad_values_name_the_key(overrides, culprit):
  with pytest.raises(ConfigError) as e:
    load_config(resolve_config_path('tiny'), overrides)
  assert str(e.value).startswith(culprit)


def test_unparsable_file_names_the_file(tmp_path):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('model: [unclosed\n')
  with pytest.raises(ConfigError, match='bad.yaml'):
    load_config(bad)
  with pytest.raises(ConfigError, match='missing.yaml'):
    load_config(tmp_path / 'missing.yaml')
