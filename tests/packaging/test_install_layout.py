"""The wheel's layout: the trainer installs as ``scale_optax_train`` with its
configs inside, and every package of the checkout is listed in pyproject."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _setuptools_table() -> dict:
  return tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']


def _checkout_packages() -> set[str]:
  """Import names the checkout's package folders get once installed."""
  names = set()
  for folder, name in (('scale_optax', 'scale_optax'),
                       ('train', 'scale_optax_train')):
    for init in (REPO / folder).rglob('__init__.py'):
      rel = init.parent.relative_to(REPO / folder)
      names.add('.'.join((name, *rel.parts)))
  return names


def test_every_package_is_listed():
  listed = set(_setuptools_table()['packages'])
  assert _checkout_packages() | {'scale_optax_train.configs'} == listed


def test_no_installed_name_can_collide():
  """`train` or `benchmarks` would shadow a user's own modules of that name."""
  tops = {name.split('.')[0] for name in _setuptools_table()['packages']}
  assert tops == {'scale_optax', 'scale_optax_train'}


def test_installed_layout_finds_its_configs(tmp_path):
  """The installed copy (configs inside the package) resolves `tiny` there,
  from a working directory that is not the checkout."""
  site = tmp_path / 'site'
  shutil.copytree(REPO / 'train', site / 'scale_optax_train',
                  ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copytree(REPO / 'configs', site / 'scale_optax_train' / 'configs')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  code = ('from scale_optax_train.config import resolve_config_path, '
          'load_config; p = resolve_config_path("tiny"); '
          'load_config(p); print(p)')
  out = subprocess.run([sys.executable, '-c', code], cwd=elsewhere,
                       env={'PYTHONPATH': str(site), 'PATH': '/usr/bin:/bin'},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert pathlib.Path(out.stdout.strip()) == (
      site / 'scale_optax_train' / 'configs' / 'tiny.yaml')


@pytest.mark.slow  # Builds the wheel (pip with build isolation: fetches setuptools).
def test_wheel_contents(tmp_path):
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '-w', str(tmp_path), str(REPO)], check=True, timeout=600)
  (wheel,) = tmp_path.glob('*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith(
      '.dist-info')}
  assert tops == {'scale_optax', 'scale_optax_train'}
  configs = {pathlib.Path(n).name for n in names
             if n.startswith('scale_optax_train/configs/')}
  assert configs == {p.name for p in (REPO / 'configs').glob('*.yaml')}
