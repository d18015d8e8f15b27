"""The study config: parsing and validating it, and each run's trainer config."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from typing import Any, Optional, Sequence

from ..config import (CONFIG_DIR, Config, ConfigError, _build,
                      read_yaml_file, validate)


DEFAULT_CONFIG = CONFIG_DIR / 'study.yaml'
QUICK_CONFIG = CONFIG_DIR / 'study_quick.yaml'

# Keys of the trainer config the study sets per run (not allowed in `base`).
_STUDY_OWNED = {
    ('optimizer', 'name'): 'optimizers',
    ('optimizer', 'learning_rate'): 'optimizers',
    ('train', 'seed'): 'seeds',
    ('train', 'run_dir'): 'output_dir',
    ('train', 'diagnostics_every'): 'diagnostics.every',
    ('train', 'diagnostics_microbatches'): 'diagnostics.microbatches',
}
_TOP_KEYS = ('title', 'output_dir', 'docs_dir', 'base', 'optimizers', 'seeds',
             'finalists', 'diagnostics', 'prune_checkpoints')


class StudyConfigError(ConfigError):
  """A bad study config: the message names the key."""


@dataclasses.dataclass(frozen=True)
class Study:
  """A validated study config (see the module docstring)."""
  output_dir: pathlib.Path
  docs_dir: pathlib.Path
  base: dict[str, Any]
  optimizers: dict[str, tuple[float, ...]]
  seeds: tuple[int, ...]
  finalists_always: tuple[str, ...] = ()
  finalists_top: int = 0
  finalist_seeds: tuple[int, ...] = ()
  diagnostics_optimizers: tuple[str, ...] = ()
  diagnostics_every: int = 10
  diagnostics_microbatches: int = 4
  prune_checkpoints: bool = True
  title: str = 'study'
  source: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One trainer run of the grid."""
  optimizer: str
  learning_rate: float
  seed: int
  run_dir: pathlib.Path
  config: Config

  @property
  def label(self) -> str:
    return f'{self.optimizer} lr={self.learning_rate:g} seed={self.seed}'


def _err(key: str, message: str) -> StudyConfigError:
  return StudyConfigError(f'{key}: {message}')


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _number(key: str, value: Any) -> float:
  if isinstance(value, str):  # YAML 1.1 reads '3e-3' as a string.
    try:
      value = float(value)
    except ValueError:
      pass
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _err(key, f'expected a number, got {value!r}.')
  value = float(value)
  if not (math.isfinite(value) and value > 0):
    raise _err(key, f'must be a positive learning rate, got {value!r}.')
  return value


def _int_list(key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
  if not isinstance(value, list) or not all(_is_int(v) for v in value):
    raise _err(key, f'expected a list of integers, got {value!r}.')
  if not value and not allow_empty:
    raise _err(key, 'must not be empty.')
  if len(set(value)) != len(value):
    raise _err(key, f'has duplicates: {value!r}.')
  if any(v < 0 for v in value):
    raise _err(key, f'seeds must be >= 0, got {value!r}.')
  return tuple(value)


def _mapping(key: str, value: Any, known: Sequence[str]) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _err(key, f'expected a mapping, got {value!r}.')
  for k in value:
    if k not in known:
      raise _err(f'{key}.{k}', f'unknown key (known: {", ".join(known)}).')
  return value


def _names(key: str, value: Any, optimizers: dict[str, Any]) -> tuple[str, ...]:
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise _err(key, f'expected a list of optimizer names, got {value!r}.')
  for name in value:
    if name not in optimizers:
      raise _err(key, f'{name!r} is not one of the study\'s optimizers '
                 f'({", ".join(optimizers)}).')
  return tuple(dict.fromkeys(value))


def parse_study(values: Any, source: Optional[str] = None) -> Study:
  """Validates a study config (a parsed YAML mapping) into a :class:`Study`."""
  from ..optim import KNOWN  # pylint: disable=g-import-not-at-top
  if not isinstance(values, dict):
    raise StudyConfigError(f'study config {source or ""}: expected a mapping '
                           f'with keys {", ".join(_TOP_KEYS)}.')
  for key in values:
    if key not in _TOP_KEYS:
      raise _err(key, f'unknown key (known: {", ".join(_TOP_KEYS)}).')
  for key in ('output_dir', 'base', 'optimizers', 'seeds'):
    if key not in values:
      raise _err(key, 'missing (required keys: output_dir, base, optimizers, '
                 'seeds).')
  output_dir = values['output_dir']
  if not isinstance(output_dir, str) or not output_dir:
    raise _err('output_dir', f'expected a folder name, got {output_dir!r}.')
  docs_dir = values.get('docs_dir', str(pathlib.Path(output_dir) / 'docs'))
  if not isinstance(docs_dir, str) or not docs_dir:
    raise _err('docs_dir', f'expected a folder name, got {docs_dir!r}.')
  title = values.get('title', pathlib.Path(output_dir).name)
  if not isinstance(title, str):
    raise _err('title', f'expected a string, got {title!r}.')

  base = values['base']
  if not isinstance(base, dict):
    raise _err('base', f'expected a mapping of trainer config sections, got '
               f'{base!r}.')
  for (section, key), owner in _STUDY_OWNED.items():
    if isinstance(base.get(section), dict) and key in base[section]:
      raise _err(f'base.{section}.{key}', f'is set by the study per run; use '
                 f'`{owner}` instead.')

  optimizers_raw = values['optimizers']
  if not isinstance(optimizers_raw, dict) or not optimizers_raw:
    raise _err('optimizers', 'expected a non-empty mapping of optimizer name '
               'to a list of learning rates.')
  optimizers: dict[str, tuple[float, ...]] = {}
  for name, lrs in optimizers_raw.items():
    key = f'optimizers.{name}'
    if name not in KNOWN:
      raise _err(key, f'unknown optimizer (known: {", ".join(KNOWN)}).')
    if not isinstance(lrs, list) or not lrs:
      raise _err(key, f'expected a non-empty list of learning rates, got {lrs!r}.')
    rates = tuple(_number(f'{key}[{i}]', v) for i, v in enumerate(lrs))
    if len(set(rates)) != len(rates):
      raise _err(key, f'has duplicate learning rates: {lrs!r}.')
    optimizers[name] = rates

  seeds = _int_list('seeds', values['seeds'], allow_empty=False)
  fin = _mapping('finalists', values.get('finalists'), ('always', 'top', 'seeds'))
  always = _names('finalists.always', fin.get('always', []), optimizers)
  top = fin.get('top', 0)
  if not _is_int(top) or top < 0:
    raise _err('finalists.top', f'expected an integer >= 0, got {top!r}.')
  fseeds = _int_list('finalists.seeds', fin.get('seeds', []), allow_empty=True)
  if (always or top) and not fseeds:
    raise _err('finalists.seeds', 'must list the finalists\' extra seeds.')
  diag = _mapping('diagnostics', values.get('diagnostics'),
                  ('optimizers', 'every', 'microbatches'))
  diag_opts = _names('diagnostics.optimizers', diag.get('optimizers', []),
                     optimizers)
  every = diag.get('every', 10)
  if not _is_int(every) or every < 1:
    raise _err('diagnostics.every', f'expected an integer >= 1, got {every!r}.')
  micro = diag.get('microbatches', 4)
  if not _is_int(micro) or micro < 2:
    raise _err('diagnostics.microbatches',
               f'expected an integer >= 2, got {micro!r}.')
  prune = values.get('prune_checkpoints', True)
  if not isinstance(prune, bool):
    raise _err('prune_checkpoints', f'expected true or false, got {prune!r}.')

  study = Study(output_dir=pathlib.Path(output_dir),
                docs_dir=pathlib.Path(docs_dir), base=copy.deepcopy(base),
                optimizers=optimizers, seeds=seeds, finalists_always=always,
                finalists_top=top, finalist_seeds=fseeds,
                diagnostics_optimizers=diag_opts, diagnostics_every=every,
                diagnostics_microbatches=micro, prune_checkpoints=prune,
                title=title, source=source)
  # The trainer's own validation, once per optimizer (names `base.<key>`).
  for name, rates in optimizers.items():
    run_config(study, name, rates[0], seeds[0])
  return study


def load_study(path: str | os.PathLike) -> Study:
  """Reads and validates a study YAML file."""
  values = read_yaml_file(path, 'study config', StudyConfigError)
  return parse_study(values, str(path))


def lr_tag(lr: float) -> str:
  return f'lr_{lr:g}'


def run_dir(study: Study, optimizer: str, lr: float, seed: int) -> pathlib.Path:
  return study.output_dir / optimizer / lr_tag(lr) / f'seed_{seed}'


def run_config(study: Study, optimizer: str, lr: float, seed: int) -> Config:
  """The trainer config of one run: ``base`` plus the study's keys."""
  values = copy.deepcopy(study.base)
  for section in ('optimizer', 'train'):
    if not isinstance(values.setdefault(section, {}), dict):
      raise _err(f'base.{section}', f'expected a mapping, got '
                 f'{values[section]!r}.')
  values['optimizer'].update(name=optimizer, learning_rate=lr)
  values['train'].update(seed=seed, progress=False,
                         run_dir=str(run_dir(study, optimizer, lr, seed)))
  if optimizer in study.diagnostics_optimizers:
    values['train'].update(
        diagnostics_every=study.diagnostics_every,
        diagnostics_microbatches=study.diagnostics_microbatches)
  try:
    config = _build(Config, values, 'base.')
    validate(config)
  except StudyConfigError:
    raise
  except ConfigError as e:
    message = str(e)
    for (section, key), owner in _STUDY_OWNED.items():
      if message.startswith(f'{section}.{key}:'):  # A key the study sets.
        message = owner + message[len(section) + len(key) + 1:]
        break
    else:
      if not message.startswith('base.'):
        message = f'base.{message}'
    raise StudyConfigError(message) from None
  return config


def sweep_specs(study: Study) -> list[RunSpec]:
  """Phase 1: every optimizer at every learning rate of its sweep."""
  return [_spec(study, name, lr, seed)
          for name, rates in study.optimizers.items()
          for lr in rates for seed in study.seeds]


def _spec(study: Study, name: str, lr: float, seed: int) -> RunSpec:
  return RunSpec(name, lr, seed, run_dir(study, name, lr, seed),
                 run_config(study, name, lr, seed))
