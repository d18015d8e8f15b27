"""The ``Examples:`` of scale_optax's docstrings run, and every public function has one."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import scale_optax


def _modules():
  return sorted(m.name for m in pkgutil.walk_packages(
      scale_optax.__path__, prefix='scale_optax.'))


@pytest.mark.parametrize('name', _modules())
def test_doctests_pass(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f'{result.failed} doctest(s) failed in {name}'


@pytest.mark.parametrize('name', [n for n in scale_optax.__all__
                                  if inspect.isfunction(getattr(scale_optax, n))])
def test_public_function_has_examples(name):
  doc = inspect.getdoc(getattr(scale_optax, name)) or ''
  assert 'Examples:' in doc and '>>>' in doc, name
