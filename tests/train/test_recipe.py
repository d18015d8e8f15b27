"""The llama_* configs are the official release's recipe, value for value."""

import pytest

from train import recipe
from train.config import load_config


@pytest.mark.parametrize('size', recipe.SIZES)
def test_config_matches_the_authors(size):
  config = load_config(recipe.config_path(size))
  assert recipe.differences(config, size) == {}
  assert config.optimizer.name == 'scale'
  assert config.model.dtype == 'bfloat16'


def test_authors_values_per_size():
  """The per-size facts of the authors' scripts/<size>_scale.sh."""
  got = {s: (v['optimizer.learning_rate'], v['optimizer.vector_learning_rate'],
             v['train.steps']) for s, v in recipe.AUTHORS.items()}
  assert got == {'60m': (1e-3, 2e-2, 11000), '130m': (1e-3, 2e-2, 20000),
                 '350m': (1e-3, 2e-2, 60000), '1b': (2e-4, 1e-3, 100000),
                 '7b': (1e-4, 1e-3, 150000)}
  assert {k for k, _, _ in recipe.KEYS} == set(recipe.AUTHORS['60m'])


def test_table_marks_a_departure():
  table = recipe.markdown_table()
  assert table.count('| llama_') == len(recipe.SIZES)
  assert '(authors' not in table  # every config follows the authors
  config = load_config(recipe.config_path('1b'),
                       ['optimizer.learning_rate=1e-3'])
  assert recipe.differences(config, '1b') == {
      'optimizer.learning_rate': (1e-3, 2e-4)}
  lines = recipe.describe(config, 'configs/llama_1b.yaml').splitlines()
  assert lines[0].startswith("recipe (against the official release's 1b")
  assert any('AUTHORS: 0.0002' in l and 'learning_rate' in l for l in lines)
  assert recipe.describe(config, 'configs/tiny.yaml').startswith('recipe:\n')
