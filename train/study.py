"""``python -m train.study``: the paper's comparison at small scale.

A study is a grid of trainer runs (optimizers x learning rates x seeds) with a
fixed token budget, described by a YAML file (``configs/study.yaml``)::

  output_dir: runs/study     # one folder per run: <optimizer>/lr_<lr>/seed_<s>
  docs_dir: docs             # table (Markdown, CSV) and plots
  base: {model: ..., data: ..., optimizer: ..., train: ...}  # trainer config
  optimizers:                # name: the learning rates of its sweep
    adamw: [1.0e-3, 3.0e-3, 1.0e-2]
    scale: [1.0e-3, 3.0e-3, 1.0e-2]
  seeds: [0]                 # seeds of the sweep
  finalists:                 # re-run at their best learning rate
    always: [scale, adamw]   # these ...
    top: 2                   # ... and the best 2 others (lowest eval loss)
    seeds: [1]               # with these extra seeds
  diagnostics:               # the gradient-variance diagnostic (Figure 4)
    optimizers: [sgd_column_norm]
    every: 10
    microbatches: 4
  prune_checkpoints: true    # delete a run's checkpoints once it finished

Phase 1 runs the sweep, phase 2 the finalists' extra seeds; the best learning
rate of an optimizer is the one with the lowest mean final eval loss over the
sweep seeds. Runs go in sequence (default) or in ``--jobs N`` processes. A run
whose ``summary.json`` exists and whose ``config.yaml`` (written by the
trainer) equals the run's config is finished and skipped; a run stopped by
divergence (``train.loop.TrainingError``) is recorded in ``failed.json`` and
also skipped; a half-finished run resumes from its checkpoint; a run whose
config changed starts again from scratch. The report (``results_table.md``,
``results.csv``, ``runs.csv``, ``setting.json`` and four PNG plots) is
written from whatever runs are finished, so it can be regenerated at any time
with ``--report-only``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import signal
import statistics
import sys
import time
import traceback
from concurrent import futures
from typing import Any, Optional, Sequence

import yaml

from train.config import (Config, ConfigError, _build, read_yaml_file, to_dict,
                          validate)

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / 'configs' / 'study.yaml'
QUICK_CONFIG = REPO / 'configs' / 'study_quick.yaml'

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


# --------------------------------------------------------------------------
# The study config.


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
  from train.optim import OPTIMIZERS  # pylint: disable=g-import-not-at-top
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
    if name not in OPTIMIZERS:
      raise _err(key, f'unknown optimizer (known: {", ".join(sorted(OPTIMIZERS))}).')
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


# --------------------------------------------------------------------------
# Run state on disk and running.


def run_state(spec: RunSpec) -> str:
  """``'done'``, ``'diverged'``, ``'partial'`` (resume) or ``'new'``.

  ``'new'`` also covers a folder left by a run with a different config (it
  starts again from scratch: :func:`_clear_stale` empties it first).
  """
  d = spec.run_dir
  try:
    saved = yaml.safe_load((d / 'config.yaml').read_text())
  except (OSError, yaml.YAMLError):
    return 'new'
  if not config_matches(saved, spec.config):
    return 'new'
  summary = _read_json(d / 'summary.json')
  if (summary and summary.get('steps') == spec.config.train.steps
      and not summary.get('stopped_by')
      and summary.get('eval_loss') is not None):
    return 'done'
  if _read_json(d / 'failed.json'):
    return 'diverged'
  return 'partial'


def config_matches(saved: Any, config: Config) -> bool:
  """Whether a run's saved ``config.yaml`` describes ``config``.

  Keys the saved config lacks (added to the trainer after the run) match when
  ``config`` has their default; keys it has that the trainer no longer knows
  are ignored. Every other value must be equal.
  """
  if not isinstance(saved, dict):
    return False
  current, default = to_dict(config), to_dict(Config())
  for section, values in current.items():
    old = saved.get(section)
    if not isinstance(old, dict):
      return False
    for key, value in values.items():
      if (old[key] if key in old else default[section][key]) != value:
        return False
  return True


def _read_json(path: pathlib.Path) -> Optional[dict[str, Any]]:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _clear_stale(d: pathlib.Path) -> None:
  """Removes a previous run's outputs (a different config) from ``d``."""
  for name in ('summary.json', 'failed.json', 'metrics.jsonl', 'loss.png',
               'config.yaml', 'train.log'):
    (d / name).unlink(missing_ok=True)
  for name in ('checkpoints', 'tensorboard'):
    shutil.rmtree(d / name, ignore_errors=True)


_STOP_REQUESTED: list[str] = []


def _worker_init() -> None:
  """In a pool worker: SIGTERM / SIGINT between runs only set a flag
  (during a run the trainer's own handler saves a checkpoint and returns)."""
  def request_stop(signum, frame):
    del frame
    _STOP_REQUESTED.append(signal.Signals(signum).name)
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, request_stop)


def execute_run(run_dir_str: str, config_values: dict[str, Any], state: str,
                prune: bool) -> dict[str, Any]:
  """Trains one run (in this process or a worker); output goes to train.log.

  Returns ``{'status': 'done'|'diverged'|'stopped'|'error', ...}``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from train.loop import TrainingError, train  # pylint: disable=g-import-not-at-top
  if _STOP_REQUESTED:  # Stopped before this run began: leave it as it is.
    return {'status': 'stopped', 'error': _STOP_REQUESTED[0], 'wall_s': 0.0}
  config = _build(Config, config_values, '')
  d = pathlib.Path(run_dir_str)
  if state == 'new':
    _clear_stale(d)
  (d / 'summary.json').unlink(missing_ok=True)
  (d / 'failed.json').unlink(missing_ok=True)
  d.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  result: dict[str, Any]
  with open(d / 'train.log', 'a') as log, contextlib.redirect_stdout(log), \
      contextlib.redirect_stderr(log):
    print(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} study run '
          f'({"resume" if state == "partial" else "fresh"})', flush=True)
    try:
      summary = train(config, resume=state == 'partial')
      status = 'stopped' if summary.get('stopped_by') else 'done'
      result = {'status': status, 'summary': summary}
    except TrainingError as e:
      failure = {'status': 'diverged', 'error': str(e)}
      (d / 'failed.json').write_text(json.dumps(failure, indent=2))
      result = failure
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      result = {'status': 'error', 'error': f'{type(e).__name__}: {e}'}
  jax.clear_caches()  # Each run compiles its own steps; free the old ones.
  if prune and result['status'] in ('done', 'diverged'):
    shutil.rmtree(d / 'checkpoints', ignore_errors=True)
  result['wall_s'] = time.time() - t0
  return result


class _Runner:
  """Runs specs in this process (jobs=1) or in a pool of spawned workers."""

  def __init__(self, study: Study, jobs: int, say):
    self.study, self.jobs, self.say = study, jobs, say
    self.results: dict[pathlib.Path, dict[str, Any]] = {}
    self.stopped = False

  def run(self, specs: list[RunSpec], phase: str) -> None:
    todo = []
    for spec in specs:
      state = run_state(spec)
      if state in ('done', 'diverged'):
        self.results[spec.run_dir] = {'status': 'skipped', 'state': state}
        self.say(f'[{phase}] {spec.label}: {state}, skipped')
      else:
        todo.append((spec, state))
    if not todo or self.stopped:
      return
    self.say(f'[{phase}] {len(todo)} run(s) to train'
             f'{f" in {self.jobs} processes" if self.jobs > 1 else ""}')
    args = lambda spec, state: (str(spec.run_dir), to_dict(spec.config), state,
                                self.study.prune_checkpoints)
    if self.jobs == 1:
      for i, (spec, state) in enumerate(todo):
        if self.stopped:
          break
        self._record(spec, state, execute_run(*args(spec, state)), i, len(todo),
                     phase)
      return
    # At most `jobs` runs are submitted at a time, so a stop leaves nothing
    # queued in the pool.
    ctx = multiprocessing.get_context('spawn')
    queue, running, count = list(todo), {}, 0
    with futures.ProcessPoolExecutor(self.jobs, mp_context=ctx,
                                     initializer=_worker_init) as pool:

      def stop(signum, frame):
        # SIGTERM / Ctrl-C: no new runs; each running trainer gets SIGTERM,
        # saves a checkpoint and returns (the run resumes next time).
        del frame
        if not self.stopped:
          self.say(f'{signal.Signals(signum).name}: stopping the running '
                   f'runs (checkpoints are saved)')
        self.stopped = True
        for process in list(getattr(pool, '_processes', {}).values()):
          with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)

      handlers = {s: signal.signal(s, stop)
                  for s in (signal.SIGTERM, signal.SIGINT)}
      try:
        while queue or running:
          while queue and len(running) < self.jobs and not self.stopped:
            spec, state = queue.pop(0)
            running[pool.submit(execute_run, *args(spec, state))] = (spec,
                                                                    state)
          if not running:
            break
          done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
          for future in done:
            spec, state = running.pop(future)
            try:
              result = future.result()
            except Exception as e:  # pylint: disable=broad-except
              result = {'status': 'stopped' if self.stopped else 'error',
                        'error': f'{type(e).__name__}: {e}', 'wall_s': 0.0}
            self._record(spec, state, result, count, len(todo), phase)
            count += 1
      finally:
        for s, handler in handlers.items():
          signal.signal(s, handler)

  def _record(self, spec, state, result, i, n, phase) -> None:
    self.results[spec.run_dir] = {**result, 'state': state}
    status = result['status']
    detail = ''
    if status in ('done', 'stopped') and (result.get('summary') or {}).get(
        'eval_loss') is not None:
      s = result['summary']
      detail = (f', eval loss {s["eval_loss"]:.4f}, perplexity '
                f'{s["eval_perplexity"]:.2f}')
    elif status in ('diverged', 'error'):
      detail = f': {result["error"].splitlines()[0]}'
    verb = 'resumed, ' if state == 'partial' else ''
    self.say(f'[{phase} {i + 1}/{n}] {spec.label}: {verb}{status}{detail} '
             f'({result["wall_s"]:.0f} s; log {spec.run_dir / "train.log"})')
    if status == 'stopped':
      self.stopped = True


# --------------------------------------------------------------------------
# Collecting results.


def _records(run_dir_path: pathlib.Path) -> list[dict[str, Any]]:
  path = run_dir_path / 'metrics.jsonl'
  out = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return out


def collect_run(spec: RunSpec) -> dict[str, Any]:
  """One row of ``runs.csv`` (plus the run's curves under ``'records'``)."""
  state = run_state(spec)
  row: dict[str, Any] = {
      'optimizer': spec.optimizer, 'learning_rate': spec.learning_rate,
      'seed': spec.seed, 'status': state if state in ('done', 'diverged')
      else 'missing'}
  summary = _read_json(spec.run_dir / 'summary.json') if state == 'done' else None
  records = _records(spec.run_dir) if state in ('done', 'diverged') else []
  train_losses = [r['loss'] for r in records if r.get('kind') == 'train'
                  and not r.get('skipped')]
  row.update(
      steps=summary['steps'] if summary else None,
      tokens=summary['tokens'] if summary else None,
      eval_loss=summary['eval_loss'] if summary else None,
      eval_perplexity=summary['eval_perplexity'] if summary else None,
      final_train_loss=train_losses[-1] if train_losses else None,
      opt_state_bytes=summary['opt_state_bytes'] if summary else None,
      param_bytes=summary['param_bytes'] if summary else None,
      tokens_per_s=summary['tokens_per_s'] if summary else None,
      wall_s=summary['wall_s'] if summary else None,
      run_dir=str(spec.run_dir))
  row['records'] = records
  return row


def _mean(xs):
  return statistics.fmean(xs) if xs else None


def _std(xs):
  return statistics.stdev(xs) if len(xs) > 1 else None


def aggregate(rows: list[dict[str, Any]], study: Study
              ) -> list[dict[str, Any]]:
  """One row per (optimizer, learning rate): statistics over seeds."""
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault((row['optimizer'], row['learning_rate']), []).append(row)
  best = best_learning_rates(rows, study)
  finalists = select_finalists(rows, study)
  out = []
  for name, rates in study.optimizers.items():
    for lr in rates:
      runs = groups.get((name, lr), [])
      done = [r for r in runs if r['status'] == 'done']
      diverged = [r for r in runs if r['status'] == 'diverged']
      losses = [r['eval_loss'] for r in done]
      ppls = [r['eval_perplexity'] for r in done]
      ref = done[0] if done else {}
      out.append({
          'optimizer': name, 'learning_rate': lr,
          'seeds': ' '.join(str(r['seed']) for r in done),
          'n_runs': len(done), 'n_diverged': len(diverged),
          'n_missing': len(runs) - len(done) - len(diverged),
          'eval_loss_mean': _mean(losses), 'eval_loss_std': _std(losses),
          'eval_ppl_mean': _mean(ppls), 'eval_ppl_std': _std(ppls),
          'eval_ppl_min': min(ppls) if ppls else None,
          'eval_ppl_max': max(ppls) if ppls else None,
          'opt_state_bytes': ref.get('opt_state_bytes'),
          'param_bytes': ref.get('param_bytes'),
          'state_over_params': (ref['opt_state_bytes'] / ref['param_bytes']
                                if ref else None),
          'steps': ref.get('steps'), 'tokens': ref.get('tokens'),
          'tokens_per_s_mean': _mean([r['tokens_per_s'] for r in done
                                      if r['tokens_per_s']]),
          'best_lr': best.get(name) == lr,
          'finalist': name in finalists and best.get(name) == lr,
      })
  return out


def best_learning_rates(rows: list[dict[str, Any]], study: Study
                        ) -> dict[str, float]:
  """Per optimizer, the sweep learning rate with the lowest mean final eval
  loss over the sweep seeds (diverged runs count as infinitely bad)."""
  best: dict[str, float] = {}
  for name, rates in study.optimizers.items():
    scores = {}
    for lr in rates:
      runs = [r for r in rows if r['optimizer'] == name
              and r['learning_rate'] == lr and r['seed'] in study.seeds]
      if not runs or any(r['status'] == 'missing' for r in runs):
        continue
      scores[lr] = statistics.fmean(
          r['eval_loss'] if r['status'] == 'done' and
          math.isfinite(r['eval_loss']) else math.inf for r in runs)
    finite = {lr: s for lr, s in scores.items() if s < math.inf}
    if finite:
      best[name] = min(finite, key=lambda lr: (finite[lr], lr))
  return best


def select_finalists(rows: list[dict[str, Any]], study: Study) -> list[str]:
  """``finalists.always`` plus the ``top`` best others by best-LR eval loss."""
  best = best_learning_rates(rows, study)

  def score(name):
    runs = [r['eval_loss'] for r in rows if r['optimizer'] == name
            and r['learning_rate'] == best[name] and r['seed'] in study.seeds
            and r['status'] == 'done']
    return statistics.fmean(runs)

  others = sorted((n for n in best if n not in study.finalists_always),
                  key=score)
  return [n for n in study.finalists_always if n in best] + \
      others[:study.finalists_top]


def finalist_specs(study: Study, rows: list[dict[str, Any]]) -> list[RunSpec]:
  """Phase 2: the finalists' extra seeds at their best learning rate."""
  best = best_learning_rates(rows, study)
  return [_spec(study, name, best[name], seed)
          for name in select_finalists(rows, study)
          for seed in study.finalist_seeds if seed not in study.seeds]


def all_specs(study: Study, rows: Optional[list[dict[str, Any]]] = None
              ) -> list[RunSpec]:
  sweep = sweep_specs(study)
  if rows is None:
    rows = [collect_run(s) for s in sweep]
  return sweep + finalist_specs(study, rows)


# --------------------------------------------------------------------------
# The report: CSV, Markdown, plots.

RUN_COLUMNS = ('optimizer', 'learning_rate', 'seed', 'status', 'steps',
               'tokens', 'eval_loss', 'eval_perplexity', 'final_train_loss',
               'opt_state_bytes', 'param_bytes', 'tokens_per_s', 'wall_s',
               'run_dir')
RESULT_COLUMNS = ('optimizer', 'learning_rate', 'seeds', 'n_runs',
                  'n_diverged', 'n_missing', 'eval_loss_mean', 'eval_loss_std',
                  'eval_ppl_mean', 'eval_ppl_std', 'eval_ppl_min',
                  'eval_ppl_max', 'opt_state_bytes', 'param_bytes',
                  'state_over_params', 'steps', 'tokens', 'tokens_per_s_mean',
                  'best_lr', 'finalist')


def _csv_value(v: Any) -> Any:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.6g}' if abs(v) < 1e6 else f'{v:.0f}'
  return v


def write_csv(path: pathlib.Path, rows: list[dict[str, Any]],
              columns: Sequence[str]) -> None:
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_csv_value(row.get(c)) for c in columns])


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with path.open(newline='') as f:
    return list(csv.DictReader(f))


def _fmt_ppl(mean, std) -> str:
  if mean is None:
    return '—'
  return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


def _fmt_bytes(n) -> str:
  if n is None:
    return '—'
  return f'{n:,}'


def setting(study: Study) -> dict[str, Any]:
  """The experimental setting, for the report."""
  from train.model import param_count  # pylint: disable=g-import-not-at-top
  config = run_config(study, next(iter(study.optimizers)),
                      next(iter(study.optimizers.values()))[0], study.seeds[0])
  m, d, o, t = config.model, config.data, config.optimizer, config.train
  return {
      'params': param_count(m), 'vocab_size': m.vocab_size,
      'd_model': m.d_model, 'n_layers': m.n_layers, 'n_heads': m.n_heads,
      'd_ff': m.d_ff, 'seq_len': d.seq_len, 'batch_size': d.batch_size,
      'steps': t.steps, 'tokens': t.steps * d.batch_size * d.seq_len,
      'warmup_steps': int(o.warmup_ratio * t.steps),
      'min_lr_ratio': o.min_lr_ratio, 'grad_clip': o.grad_clip,
      'weight_decay': o.weight_decay, 'momentum': o.momentum,
      'eval_every': t.eval_every,
      'eval_tokens': t.eval_batches * d.batch_size * d.seq_len,
      'data': d.name, 'dtype': m.param_dtype,
      'seeds': list(study.seeds), 'finalist_seeds': list(study.finalist_seeds),
  }


def markdown_table(study: Study, results: list[dict[str, Any]],
                   info: dict[str, Any]) -> str:
  """``results_table.md``: the setting, the best-LR table and the sweep."""
  s = info
  lines = [
      f'# {study.title}: results table',
      '',
      'Generated by `python -m train.study` from `results.csv` (one row per '
      'optimizer and learning rate; statistics over seeds) and `runs.csv` '
      '(one row per run).',
      '',
      f'Setting: LLaMA with {s["params"]:,} parameters (vocab {s["vocab_size"]}, '
      f'd_model {s["d_model"]}, {s["n_layers"]} layers, {s["n_heads"]} heads, '
      f'd_ff {s["d_ff"]}, untied LM head, {s["dtype"]}); data set '
      f'`{s["data"]}`; batch {s["batch_size"]} x {s["seq_len"]} tokens, '
      f'{s["steps"]} steps = {s["tokens"]:,} tokens per run; linear warmup '
      f'over {s["warmup_steps"]} steps, cosine decay to {s["min_lr_ratio"]:g} '
      f'of the peak; gradient clipping {s["grad_clip"]}; weight decay '
      f'{s["weight_decay"]:g}; eval on the same {s["eval_tokens"]:,} held-out '
      f'tokens for every run. Sweep seeds {s["seeds"]}; finalists add seeds '
      f'{s["finalist_seeds"]} at their best learning rate.',
      '',
  ]
  if s.get('unigram_perplexity'):
    lines += [f'Unigram baseline (token frequencies only): eval perplexity '
              f'{s["unigram_perplexity"]:.2f}.', '']
  lines += [
      '## Each optimizer at its best learning rate',
      '',
      '| optimizer | best LR | seeds | eval loss | eval perplexity '
      '(mean ± std) | optimizer state (bytes) | state / weights | '
      'weights + state (MB) |',
      '|---|---|---|---|---|---|---|---|',
  ]
  best = [r for r in results if r['best_lr']]
  best.sort(key=lambda r: r['eval_loss_mean'])
  for r in best:
    total = (r['param_bytes'] + r['opt_state_bytes']) / 1e6
    lines.append(
        f'| {r["optimizer"]}{" (finalist)" if r["finalist"] else ""} '
        f'| {r["learning_rate"]:g} | {r["seeds"]} '
        f'| {r["eval_loss_mean"]:.4f} | {_fmt_ppl(r["eval_ppl_mean"], r["eval_ppl_std"])} '
        f'| {_fmt_bytes(r["opt_state_bytes"])} | {r["state_over_params"]:.3f} '
        f'| {total:.2f} |')
  no_best = [n for n in study.optimizers if not any(
      r['optimizer'] == n for r in best)]
  for n in no_best:
    lines.append(f'| {n} | — | — | — | no finished run | — | — | — |')
  lines += [
      '',
      '## Learning-rate sweep',
      '',
      '| optimizer | learning rate | seeds | eval loss | eval perplexity '
      '(mean ± std) | status |',
      '|---|---|---|---|---|---|',
  ]
  for r in results:
    status = []
    if r['best_lr']:
      status.append('**best**')
    if r['n_diverged']:
      status.append(f'{r["n_diverged"]} diverged')
    if r['n_missing']:
      status.append(f'{r["n_missing"]} not run')
    loss = f'{r["eval_loss_mean"]:.4f}' if r['eval_loss_mean'] is not None \
        else '—'
    lines.append(
        f'| {r["optimizer"]} | {r["learning_rate"]:g} | {r["seeds"] or "—"} '
        f'| {loss} | {_fmt_ppl(r["eval_ppl_mean"], r["eval_ppl_std"])} '
        f'| {", ".join(status)} |')
  return '\n'.join(lines) + '\n'


VARIANCE_COLUMNS = ('optimizer', 'learning_rate', 'seed', 'step', 'tokens',
                    'group', 'grad_var', 'grad_sq')


def variance_rows(study: Study, rows, results) -> list[dict[str, Any]]:
  """The 'diagnostics' records of each diagnosed optimizer's best-LR run
  (its first seed): one row per step and param group."""
  best = _best_runs(rows, results)
  out = []
  for name in study.diagnostics_optimizers:
    if name not in best:
      continue
    run = best[name][0]
    for r in run['records']:
      if r.get('kind') != 'diagnostics':
        continue
      for key, value in r.items():
        if key.startswith('grad_var/'):
          group = key.split('/', 1)[1]
          out.append({'optimizer': name, 'learning_rate': run['learning_rate'],
                      'seed': run['seed'], 'step': r['step'],
                      'tokens': r.get('tokens'), 'group': group,
                      'grad_var': value, 'grad_sq': r.get(f'grad_sq/{group}')})
  return out


def variance_markdown(vrows: list[dict[str, Any]]) -> str:
  """Per group, the mean over the diagnostic steps of the per-sequence
  gradient variance, with its rank among the groups (1 = largest)."""
  from train.diagnostics import group_order  # pylint: disable=g-import-not-at-top
  if not vrows:
    return ''
  names = list(dict.fromkeys(r['optimizer'] for r in vrows))
  groups = group_order(r['group'] for r in vrows)
  means = {}
  for name in names:
    for g in groups:
      values = [r['grad_var'] for r in vrows
                if r['optimizer'] == name and r['group'] == g]
      means[name, g] = statistics.fmean(values) if values else None
  ranked = [g for g in groups if g in ('embed', 'lm_head') or
            g.startswith('layer_')]  # The figure's groups; not final_norm.
  ranks = {}
  for name in names:
    order = sorted((g for g in ranked if means[name, g] is not None),
                   key=lambda g: -means[name, g])
    ranks.update({(name, g): i + 1 for i, g in enumerate(order)})
  first = {n: next(r for r in vrows if r['optimizer'] == n) for n in names}
  steps = sorted({r['step'] for r in vrows})
  lines = [
      '## Per-layer stochastic-gradient variance (the paper\'s Figure 4)',
      '',
      f'Mean over the {len(steps)} diagnostic steps ({steps[0]} to '
      f'{steps[-1]}) of the per-sequence gradient variance (averaged over the '
      'group\'s elements; train/diagnostics.py), in the best-LR run of each '
      'diagnosed optimizer; in parentheses the rank among the embedding, '
      'the layers and the LM head (1 = largest; a layer\'s group holds its '
      'matrices and its two RMSNorm scales). Every step is in '
      '`grad_variance.csv`.',
      '',
      '| param group | ' + ' | '.join(
          f'{n} (lr {first[n]["learning_rate"]:g}, seed {first[n]["seed"]})'
          for n in names) + ' |',
      '|---|' + '---|' * len(names),
  ]
  for g in groups:
    cells = [('—' if means[n, g] is None else f'{means[n, g]:.3g} '
              f'({ranks[n, g] if (n, g) in ranks else "1-D, not ranked"})')
             for n in names]
    lines.append(f'| {g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_report(study: Study, rows: Optional[list[dict[str, Any]]] = None,
                 say=print) -> dict[str, pathlib.Path]:
  """Writes the CSVs, the Markdown table and the plots into ``docs_dir``."""
  if rows is None:
    rows = [collect_run(s) for s in all_specs(study)]
  results = aggregate(rows, study)
  info = setting(study)
  meta = _read_json(study.output_dir / 'study.json') or {}
  if meta.get('unigram_perplexity'):
    info['unigram_perplexity'] = meta['unigram_perplexity']
  docs = study.docs_dir
  docs.mkdir(parents=True, exist_ok=True)
  paths = {'runs_csv': docs / 'runs.csv', 'results_csv': docs / 'results.csv',
           'table_md': docs / 'results_table.md',
           'setting_json': docs / 'setting.json'}
  write_csv(paths['runs_csv'], rows, RUN_COLUMNS)
  write_csv(paths['results_csv'], results, RESULT_COLUMNS)
  vrows = variance_rows(study, rows, results)
  table = markdown_table(study, results, info)
  if vrows:
    paths['variance_csv'] = docs / 'grad_variance.csv'
    write_csv(paths['variance_csv'], vrows, VARIANCE_COLUMNS)
    table += '\n' + variance_markdown(vrows)
  paths['table_md'].write_text(table)
  paths['setting_json'].write_text(json.dumps(info, indent=2) + '\n')
  paths.update(plot_all(study, rows, results, info, docs))
  say(f'report: {", ".join(str(p) for p in paths.values())}')
  return paths


# --------------------------------------------------------------------------
# Plots (matplotlib, Agg backend, PNG).

_COLORS = {
    'scale': '#d62728', 'adamw': '#1f77b4', 'muon': '#2ca02c',
    'sgd_column_norm': '#ff7f0e', 'sgd': '#7f7f7f', 'sgd_momentum': '#bcbd22',
    'sgd_row_norm': '#9467bd', 'scale_row_norm': '#8c564b',
    'scale_first_last': '#e377c2', 'scale_sign': '#17becf',
    'adafactor': '#393b79', 'lion': '#637939',
}
_LABELS = {
    'scale': 'SCALE', 'adamw': 'AdamW', 'muon': 'Muon', 'sgd': 'SGD',
    'sgd_column_norm': 'SGD + column-norm', 'sgd_row_norm': 'SGD + row-norm',
    'scale_row_norm': 'SCALE, row-norm', 'sgd_momentum': 'SGD + momentum',
    'scale_first_last': 'SCALE + embedding momentum',
    'scale_sign': 'SCALE, sign', 'adafactor': 'Adafactor', 'lion': 'Lion',
}


def _color(name: str) -> str:
  return _COLORS.get(name, 'black')


def _label(name: str) -> str:
  return _LABELS.get(name, name)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


_NICE = [m * 10 ** e for e in range(-6, 6)
         for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)]


def _plain_log_ticks(ax, axes='xy', xticks=None) -> None:
  """Log-axis ticks at round values labeled as plain numbers (150, 0.003)
  instead of 1.5 x 10^2; ``xticks`` puts the x ticks at given values."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  for name in axes:
    axis = ax.xaxis if name == 'x' else ax.yaxis
    lo, hi = ax.get_xlim() if name == 'x' else ax.get_ylim()
    values = sorted(set(xticks)) if name == 'x' and xticks else [
        v for v in _NICE if lo <= v <= hi]
    step = max(1, len(values) // 8)
    axis.set_major_locator(ticker.FixedLocator(values[::step]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    axis.set_minor_locator(ticker.NullLocator())


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  tmp = path.with_suffix('.tmp.png')
  fig.savefig(tmp, dpi=130)
  tmp.replace(path)
  return path


def _best_runs(rows, results):
  """{optimizer: [rows of its finished runs at its best LR]}, table order."""
  best = {r['optimizer']: r['learning_rate'] for r in results if r['best_lr']}
  out = {}
  for name, lr in best.items():
    runs = [r for r in rows if r['optimizer'] == name
            and r['learning_rate'] == lr and r['status'] == 'done']
    if runs:
      out[name] = sorted(runs, key=lambda r: r['seed'])
  return out


def _eval_curve(row):
  return [(r['tokens'], r['loss']) for r in row['records']
          if r.get('kind') == 'eval' and math.isfinite(r.get('loss', math.nan))]


def plot_loss_curves(rows, results, info, path: pathlib.Path) -> pathlib.Path:
  """Eval loss against tokens, each optimizer at its best learning rate:
  mean over seeds, the band spans the seeds' min and max."""
  plt = _pyplot()
  best = _best_runs(rows, results)
  finalists = {r['optimizer'] for r in results if r['finalist']}
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  lows = []
  for name, runs in best.items():
    curves = [dict(_eval_curve(r)) for r in runs]
    tokens = sorted(set.intersection(*(set(c) for c in curves)))
    if not tokens:
      continue
    mean = [statistics.fmean(c[t] for c in curves) for t in tokens]
    lo = [min(c[t] for c in curves) for t in tokens]
    hi = [max(c[t] for c in curves) for t in tokens]
    lows.append(min(lo))
    is_final = name in finalists
    label = (f'{_label(name)} (lr {runs[0]["learning_rate"]:g}, '
             f'{len(runs)} seed{"s" if len(runs) > 1 else ""})')
    for ax in axes:
      ax.plot(tokens, mean, '-o' if is_final else '--o', color=_color(name),
              lw=2 if is_final else 1.2, ms=3, label=label)
      if len(runs) > 1:
        ax.fill_between(tokens, lo, hi, color=_color(name), alpha=0.2, lw=0)
  unigram = info.get('unigram_perplexity')
  for ax in axes:
    if unigram:
      ax.axhline(math.log(unigram), color='gray', ls=':', lw=1,
                 label='unigram baseline')
    ax.set_xlabel('training tokens')
    ax.set_ylabel('eval loss (nats / token)')
    ax.grid(alpha=0.3)
  axes[0].set_title('Eval loss, each optimizer at its best learning rate '
                    '(solid: finalists; band: min-max over seeds)', fontsize=9)
  half = info['tokens'] * 0.4
  axes[1].set_xlim(half, info['tokens'] * 1.02)
  finals = [statistics.fmean(r['eval_loss'] for r in runs)
            for runs in best.values()]
  if lows and finals:
    top = sorted(finals)[min(len(finals) - 1, max(len(finals) // 2, 3))]
    axes[1].set_ylim(min(lows) - 0.05, top + 0.6)
  axes[1].set_title('Zoom: the last 60% of the tokens', fontsize=9)
  axes[0].legend(fontsize=7, loc='upper right')  # Empty there: curves fall.
  return _save(fig, path)


def plot_memory(results, info, path: pathlib.Path) -> pathlib.Path:
  """Final eval perplexity against weights + optimizer state (the paper's
  Figure 1): each optimizer at its best learning rate."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5.5))
  placed = []  # Labels of points at about the same memory alternate sides.
  for r in sorted(results, key=lambda r: r['eval_ppl_mean'] or 0):
    if not r['best_lr'] or r['eval_ppl_mean'] is None:
      continue
    x = (r['param_bytes'] + r['opt_state_bytes']) / 1e6
    left = sum(abs(math.log(x / px)) < 0.05 for px in placed) % 2 == 1
    placed.append(x)
    ax.errorbar([x], [r['eval_ppl_mean']], yerr=[[r['eval_ppl_std'] or 0],
                                                 [r['eval_ppl_std'] or 0]],
                fmt='o', color=_color(r['optimizer']), ms=8, capsize=3)
    ax.annotate(f'{_label(r["optimizer"])}\nstate '
                f'{r["opt_state_bytes"] / 1e6:.2f} MB',
                (x, r['eval_ppl_mean']), textcoords='offset points',
                xytext=(-7, 4) if left else (7, 4),
                ha='right' if left else 'left', fontsize=8)
  ax.set_xscale('log')
  ax.set_xlabel('weights + optimizer state (MB, float32; log scale)')
  ax.set_ylabel('final eval perplexity (best learning rate)')
  ax.set_title(f'Perplexity vs memory: {info["params"] / 1e6:.1f}M-param '
               f'LLaMA, {info["tokens"] / 1e3:,.0f}K tokens per run\n'
               f'(error bars: std over seeds where several)', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.margins(x=0.25, y=0.15)
  ppls = [r['eval_ppl_mean'] for r in results
          if r['best_lr'] and r['eval_ppl_mean'] is not None]
  if ppls and max(ppls) > 3 * min(ppls):  # E.g. plain SGD far behind.
    ax.set_yscale('log')
    ax.set_ylabel('final eval perplexity (best learning rate; log scale)')
  _plain_log_ticks(ax, 'xy' if ax.get_yscale() == 'log' else 'x')
  return _save(fig, path)


def plot_lr_sensitivity(rows, results, path: pathlib.Path,
                        focus=('scale', 'adamw')) -> pathlib.Path:
  """Final eval perplexity against the learning rate (the paper's Figure 5):
  SCALE and AdamW on the left, every optimizer's sweep on the right. Crosses
  at the top mark diverged runs."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  names = list(dict.fromkeys(r['optimizer'] for r in results))
  finite = [r['eval_ppl_mean'] for r in results if r['eval_ppl_mean']]
  ceiling = max(finite) * 1.5 if finite else 1.0
  for ax, subset in ((axes[0], [n for n in names if n in focus]),
                     (axes[1], names)):
    for name in subset:
      pts = [(r['learning_rate'], r['eval_ppl_mean']) for r in results
             if r['optimizer'] == name and r['eval_ppl_mean'] is not None]
      bad = [r['learning_rate'] for r in results
             if r['optimizer'] == name and r['n_diverged'] and not r['n_runs']]
      if pts:
        ax.plot(*zip(*pts), '-o', color=_color(name), label=_label(name),
                lw=2 if ax is axes[0] else 1.2, ms=5)
      if bad:
        ax.plot(bad, [ceiling] * len(bad), 'x', color=_color(name), ms=9,
                mew=2)
      if ax is axes[0]:
        seeds = [(r['learning_rate'], r['eval_perplexity']) for r in rows
                 if r['optimizer'] == name and r['status'] == 'done']
        if seeds:
          ax.plot(*zip(*seeds), '.', color=_color(name), alpha=0.5)
    ax.set_xscale('log')
    ax.set_yscale('log')
    rates = [r['learning_rate'] for r in results if r['optimizer'] in subset]
    if ax is axes[1]:  # Many optimizers' rates: decades only.
      rates = [10.0 ** e for e in range(-8, 4)
               if min(rates) / 1.01 <= 10.0 ** e <= max(rates) * 1.01]
    _plain_log_ticks(ax, xticks=rates)
    ax.set_xlabel('peak learning rate (log scale)')
    ax.set_ylabel('final eval perplexity (log scale)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  axes[0].set_title('Learning-rate sensitivity: SCALE vs AdamW\n(line: mean '
                    'over seeds; dots: single runs; x: diverged)', fontsize=9)
  axes[1].set_title('Every optimizer\'s sweep (learning rates are not '
                    'comparable across optimizers)', fontsize=9)
  return _save(fig, path)


def plot_gradient_variance(study, rows, results, path: pathlib.Path
                           ) -> Optional[pathlib.Path]:
  """Per-layer stochastic-gradient variance along training (the paper's
  Figure 4), from the 'diagnostics' records of each diagnosed optimizer's
  best-LR run (first seed)."""
  from train.diagnostics import group_order  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  best = _best_runs(rows, results)
  panels = []
  for name in study.diagnostics_optimizers:
    run = best.get(name, [None])[0]
    recs = [r for r in run['records'] if r.get('kind') == 'diagnostics'] \
        if run else []
    if recs:
      panels.append((name, run, recs))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5),
                           sharey=True, squeeze=False)
  cmap = plt.get_cmap('viridis')
  for ax, (name, run, recs) in zip(axes[0], panels):
    groups = group_order(k.split('/', 1)[1] for k in recs[0]
                         if k.startswith('grad_var/'))
    groups = [g for g in groups if g != 'final_norm']
    layers = [g for g in groups if g.startswith('layer_')]
    for g in groups:
      if g == 'lm_head':
        style = dict(color='#d62728', lw=2.5, label='LM head')
      elif g == 'embed':
        style = dict(color='#ff7f0e', lw=2.5, label='embedding')
      else:
        i = layers.index(g)
        style = dict(color=cmap(0.15 + 0.7 * i / max(len(layers) - 1, 1)),
                     lw=1.3, label=f'layer {g[6:]}')
      ax.plot([r['step'] for r in recs], [r[f'grad_var/{g}'] for r in recs],
              **style)
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(f'{_label(name)} (lr {run["learning_rate"]:g}, seed '
                 f'{run["seed"]})', fontsize=10)
    ax.grid(alpha=0.3, which='both')
  axes[0][0].set_ylabel('per-sequence gradient variance\n(mean over the '
                        'group\'s elements)')
  axes[0][-1].legend(fontsize=8)
  return _save(fig, path)


def plot_all(study: Study, rows, results, info, docs: pathlib.Path
             ) -> dict[str, pathlib.Path]:
  """Writes every plot that has data; returns ``{name: path}``."""
  paths = {
      'loss_vs_tokens': plot_loss_curves(rows, results, info,
                                         docs / 'loss_vs_tokens.png'),
      'ppl_vs_memory': plot_memory(results, info, docs / 'ppl_vs_memory.png'),
      'lr_sensitivity': plot_lr_sensitivity(rows, results,
                                            docs / 'lr_sensitivity.png'),
  }
  variance = plot_gradient_variance(study, rows, results,
                                    docs / 'grad_variance.png')
  if variance:
    paths['grad_variance'] = variance
  _pyplot().close('all')
  return paths


# --------------------------------------------------------------------------
# The whole study.


def _prepare_data(study: Study, say) -> None:
  """Builds the data set and tokenizer once, before any run (workers race
  otherwise), and records the unigram baseline."""
  from train import data as data_lib  # pylint: disable=g-import-not-at-top
  config = run_config(study, next(iter(study.optimizers)),
                      next(iter(study.optimizers.values()))[0], study.seeds[0])
  meta_path = study.output_dir / 'study.json'
  meta = _read_json(meta_path) or {}
  dataset = data_lib.prepare(config.data, config.model.vocab_size)
  key = {'data': to_dict(config)['data'], 'vocab': config.model.vocab_size}
  if meta.get('data_key') != key:
    meta = {'data_key': key,
            'unigram_perplexity': data_lib.unigram_perplexity(dataset)}
    study.output_dir.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
  say(f'data: {config.data.name} in {config.data.data_dir}, unigram '
      f'perplexity {meta["unigram_perplexity"]:.2f}')


def run_study(study: Study, jobs: int = 1, say=print) -> dict[str, Any]:
  """Runs (or resumes) the study and writes its report.

  Returns ``{'results': {run_dir: result}, 'report': {name: path},
  'errors': n, 'stopped': bool, 'wall_s': seconds}``.
  """
  t0 = time.time()
  if jobs < 1:
    raise ValueError(f'jobs must be >= 1, got {jobs}.')
  sweep = sweep_specs(study)
  n_final = len(study.finalist_seeds) * (
      len(study.finalists_always) + study.finalists_top)
  say(f'study {study.title}: {len(sweep)} sweep runs + up to {n_final} '
      f'finalist runs, output in {study.output_dir}, report in '
      f'{study.docs_dir}')
  _prepare_data(study, say)
  runner = _Runner(study, jobs, say)
  runner.run(sweep, 'sweep')
  rows = [collect_run(s) for s in sweep]
  if not runner.stopped:
    best = best_learning_rates(rows, study)
    finalists = select_finalists(rows, study)
    say('best learning rates: ' + ', '.join(
        f'{n} {lr:g}' for n, lr in best.items()))
    say(f'finalists: {", ".join(finalists) or "none"}')
    runner.run(finalist_specs(study, rows), 'finalists')
  rows = [collect_run(s) for s in all_specs(study, rows)]
  report = write_report(study, rows, say)
  errors = sum(r['status'] == 'error' for r in runner.results.values())
  wall = time.time() - t0
  say(f'study {study.title}: done in {wall / 60:.1f} min'
      f'{f", {errors} run(s) failed with errors" if errors else ""}'
      f'{" (stopped)" if runner.stopped else ""}')
  return {'results': runner.results, 'report': report, 'errors': errors,
          'stopped': runner.stopped, 'wall_s': wall}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m train.study',
      description='Run a grid of trainer runs (optimizers x learning rates x '
      'seeds), resuming finished runs, and write a results table and plots.')
  parser.add_argument('--config', default=None,
                      help=f'study YAML (default: {DEFAULT_CONFIG.relative_to(REPO)})')
  parser.add_argument('--quick', action='store_true',
                      help=f'the few-minute variant '
                      f'({QUICK_CONFIG.relative_to(REPO)})')
  parser.add_argument('--jobs', type=int, default=1,
                      help='parallel trainer processes (default 1: in '
                      'sequence, in this process)')
  parser.add_argument('--report-only', action='store_true',
                      help='only rewrite the table and plots from the '
                      'finished runs')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.quick and args.config:
    print('error: give either --quick or --config', file=sys.stderr)
    return 2
  if args.jobs < 1:
    print(f'error: --jobs must be >= 1, got {args.jobs}', file=sys.stderr)
    return 2
  path = QUICK_CONFIG if args.quick else (args.config or DEFAULT_CONFIG)
  say = lambda *a: print(time.strftime('%H:%M:%S'), *a, flush=True)
  try:
    study = load_study(path)
    if args.report_only:
      write_report(study, say=say)
      return 0
    outcome = run_study(study, jobs=args.jobs, say=say)
  except ConfigError as e:
    print(f'study config error: {e}', file=sys.stderr)
    return 2
  return 1 if outcome['errors'] or outcome['stopped'] else 0


if __name__ == '__main__':
  sys.exit(main())
