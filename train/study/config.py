"""The study config: parsing and validating it, and each run's trainer config."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from typing import Any, Optional, Sequence

from ..config import (CONFIG_DIR, Config, ConfigError, build_config,
                      read_yaml_file)


DEFAULT_CONFIG = CONFIG_DIR / 'study.yaml'
QUICK_CONFIG = CONFIG_DIR / 'study_quick.yaml'
SWEEP, LONG = 'sweep', 'long'  # The phases: short runs, then long ones.

# Keys of the trainer config the study sets per run (not allowed in `base`).
_STUDY_OWNED = {
    ('optimizer', 'name'): 'optimizers',
    ('optimizer', 'learning_rate'): 'optimizers',
    ('train', 'seed'): 'seeds',
    ('train', 'run_dir'): 'output_dir',
    ('train', 'diagnostics_every'): 'diagnostics.every',
    ('train', 'diagnostics_microbatches'): 'diagnostics.microbatches',
}
_TOP_KEYS = ('title', 'output_dir', 'docs_dir', 'base', 'overrides',
             'optimizers', 'seeds', 'sweep', 'long', 'finalists',
             'diagnostics', 'prune_checkpoints', 'priority')


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
  overrides: dict[str, dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  sweep_train: dict[str, Any] = dataclasses.field(default_factory=dict)
  long_train: Optional[dict[str, Any]] = None
  long_neighbours: int = 1
  finalists_always: tuple[str, ...] = ()
  finalists_top: int = 0
  finalist_seeds: tuple[int, ...] = ()
  diagnostics_optimizers: tuple[str, ...] = ()
  diagnostics_every: int = 10
  diagnostics_microbatches: int = 4
  prune_checkpoints: bool = True
  priority: tuple[str, ...] = ()
  title: str = 'study'

  @property
  def phases(self) -> tuple[str, ...]:
    return (SWEEP, LONG) if self.long_train is not None else (SWEEP,)

  @property
  def order(self) -> tuple[str, ...]:
    """The optimizers in the order the study trains them: ``priority``
    first, then the others in the order of ``optimizers``."""
    return self.priority + tuple(n for n in self.optimizers
                                 if n not in self.priority)

  @property
  def ledger_dir(self) -> pathlib.Path:
    """Where each finished run's small files are kept, in git
    (:mod:`train.study.ledger`)."""
    return self.docs_dir / 'ledger'

  @property
  def final_phase(self) -> str:
    """The phase whose runs make the table (and get the finalist seeds)."""
    return self.phases[-1]


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One trainer run of the grid."""
  phase: str
  optimizer: str
  learning_rate: float
  seed: int
  run_dir: pathlib.Path
  config: Config
  kept_dir: pathlib.Path  # Its copy in the ledger, once finished.

  @property
  def label(self) -> str:
    return (f'{self.phase} {self.optimizer} lr={self.learning_rate:g} '
            f'seed={self.seed}')


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
  _check_sections('base', base)

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
    if len({lr_tag(r) for r in rates}) != len(rates):  # One folder a rate.
      raise _err(key, f'has duplicate learning rates (to 6 significant '
                 f'digits, as run folders name them): {lrs!r}.')
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
  priority = _names('priority', values.get('priority', []), optimizers)
  prune = values.get('prune_checkpoints', True)
  if not isinstance(prune, bool):
    raise _err('prune_checkpoints', f'expected true or false, got {prune!r}.')
  sweep = _train_section('sweep', values.get('sweep'), ())
  long = None
  neighbours = 1
  if values.get('long') is not None:
    long = _train_section('long', values['long'], ('neighbours',))
    neighbours = long.pop('neighbours', 1)
    if not _is_int(neighbours) or neighbours < 0:
      raise _err('long.neighbours', f'expected an integer >= 0, got '
                 f'{neighbours!r}.')
  overrides = _mapping('overrides', values.get('overrides'), list(optimizers))
  for name, sections in overrides.items():
    _check_sections(f'overrides.{name}', sections)

  study = Study(output_dir=pathlib.Path(output_dir),
                docs_dir=pathlib.Path(docs_dir), base=copy.deepcopy(base),
                optimizers=optimizers, seeds=seeds,
                overrides=copy.deepcopy(overrides), sweep_train=sweep,
                long_train=long, long_neighbours=neighbours,
                finalists_always=always,
                finalists_top=top, finalist_seeds=fseeds,
                diagnostics_optimizers=diag_opts, diagnostics_every=every,
                diagnostics_microbatches=micro, prune_checkpoints=prune,
                priority=priority, title=title)
  # The trainer's own validation, once per optimizer and phase (names
  # `base.<key>`).
  for name, rates in optimizers.items():
    for phase in study.phases:
      run_config(study, phase, name, rates[0], seeds[0])
  return study


def _check_sections(key: str, sections: Any) -> None:
  """``sections`` is a partial trainer config without the study's keys."""
  if not isinstance(sections, dict):
    raise _err(key, f'expected a mapping of trainer config sections, got '
               f'{sections!r}.')
  for (section, name), owner in _STUDY_OWNED.items():
    if isinstance(sections.get(section), dict) and name in sections[section]:
      raise _err(f'{key}.{section}.{name}', f'is set by the study per run; '
                 f'use `{owner}` instead.')


def _train_section(key: str, value: Any, extra: Sequence[str]
                   ) -> dict[str, Any]:
  """A phase's ``train`` keys (``steps``, ``eval_every``, ...) plus ``extra``."""
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _err(key, f'expected a mapping of train keys, got {value!r}.')
  value = dict(value)
  for name in value:
    if ('train', name) in _STUDY_OWNED:
      raise _err(f'{key}.{name}', f'is set by the study per run; use '
                 f'`{_STUDY_OWNED["train", name]}` instead.')
  return value


def load_study(path: str | os.PathLike) -> Study:
  """Reads and validates a study YAML file."""
  values = read_yaml_file(path, 'study config', StudyConfigError)
  return parse_study(values, str(path))


def lr_tag(lr: float) -> str:
  """The run folder's name for ``lr`` (6 significant digits)."""
  return f'lr_{lr:g}'


def run_path(phase: str, optimizer: str, lr: float, seed: int
             ) -> pathlib.Path:
  """A run's place in the study: ``<phase>/<optimizer>/lr_<lr>/seed_<seed>``,
  under ``output_dir`` (its folder) and under the ledger (its kept files)."""
  return pathlib.Path(phase, optimizer, lr_tag(lr), f'seed_{seed}')


def run_dir(study: Study, phase: str, optimizer: str, lr: float, seed: int
            ) -> pathlib.Path:
  return study.output_dir / run_path(phase, optimizer, lr, seed)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
  """``base`` with each section of ``override`` merged into its own."""
  out = copy.deepcopy(base)
  for section, values in override.items():
    if isinstance(values, dict) and isinstance(out.get(section), dict):
      out[section] = _merged(out[section], values)
    else:
      out[section] = copy.deepcopy(values)
  return out


def run_config(study: Study, phase: str, optimizer: str, lr: float,
               seed: int) -> Config:
  """The trainer config of one run: ``base``, then the optimizer's
  ``overrides``, then the phase's train keys and the study's keys."""
  values = _merged(study.base, study.overrides.get(optimizer, {}))
  for section in ('optimizer', 'train'):
    if not isinstance(values.setdefault(section, {}), dict):
      raise _err(f'base.{section}', f'expected a mapping, got '
                 f'{values[section]!r}.')
  values['train'].update(study.sweep_train if phase == SWEEP
                         else study.long_train)
  values['optimizer'].update(name=optimizer, learning_rate=lr)
  values['train'].update(
      seed=seed, progress=False,
      run_dir=str(run_dir(study, phase, optimizer, lr, seed)))
  if optimizer in study.diagnostics_optimizers:
    values['train'].update(
        diagnostics_every=study.diagnostics_every,
        diagnostics_microbatches=study.diagnostics_microbatches)
  try:
    return build_config(values)
  except ConfigError as e:
    key, colon, rest = str(e).partition(':')
    if colon and '.' in key and ' ' not in key:
      key = _study_key(study, phase, optimizer, key)
    raise StudyConfigError(key + colon + rest) from None


def _study_key(study: Study, phase: str, optimizer: str, key: str) -> str:
  """Where in the study YAML the trainer key ``key`` (``train.steps``) of a
  run was set: by the study itself (``seeds``...), the phase's section
  (``long.steps``), the optimizer's ``overrides``, or ``base``."""
  section, _, rest = key.partition('.')
  if (section, rest) in _STUDY_OWNED:
    return _STUDY_OWNED[section, rest]
  phase_train = study.sweep_train if phase == SWEEP else study.long_train
  if section == 'train' and rest.split('.')[0] in (phase_train or {}):
    return f'{phase}.{rest}'
  tree: Any = study.overrides.get(optimizer, {})
  for part in key.split('.'):
    tree = tree.get(part) if isinstance(tree, dict) else None
  if tree is not None:
    return f'overrides.{optimizer}.{key}'
  return f'base.{key}'


def spec(study: Study, phase: str, optimizer: str, lr: float, seed: int
         ) -> RunSpec:
  """The run of ``optimizer`` at ``lr`` and ``seed`` in ``phase``."""
  return RunSpec(phase, optimizer, lr, seed,
                 run_dir(study, phase, optimizer, lr, seed),
                 run_config(study, phase, optimizer, lr, seed),
                 study.ledger_dir / run_path(phase, optimizer, lr, seed))


def sweep_specs(study: Study) -> list[RunSpec]:
  """Phase 1: every optimizer at every learning rate of its sweep."""
  return [spec(study, SWEEP, name, lr, seed)
          for name, rates in study.optimizers.items()
          for lr in rates for seed in study.seeds]
