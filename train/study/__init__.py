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
import json
import time
from typing import Any, Optional, Sequence

from ..config import to_dict
from ..errors import UsageError, cli

# The package's API, from one module per stage (see each module).
from .config import (DEFAULT_CONFIG, QUICK_CONFIG, RunSpec,
                                Study, StudyConfigError, load_study, lr_tag,
                                parse_study, run_config, run_dir, sweep_specs)
from .plots import (plot_all, plot_gradient_variance,
                               plot_loss_curves, plot_lr_sensitivity,
                               plot_memory)
from .report import (RESULT_COLUMNS, RUN_COLUMNS, VARIANCE_COLUMNS,
                                markdown_table, read_csv, setting,
                                variance_markdown, variance_rows, write_csv,
                                write_report)
from .results import (aggregate, all_specs, best_learning_rates,
                                 collect_run, finalist_specs, select_finalists)
from .runner import (_read_json, _Runner, config_matches,
                                execute_run, run_state)

__all__ = ['DEFAULT_CONFIG', 'QUICK_CONFIG', 'StudyConfigError',
           'Study', 'RunSpec', 'parse_study', 'load_study', 'lr_tag',
           'run_dir', 'run_config', 'sweep_specs', 'run_state',
           'config_matches', 'execute_run', 'collect_run', 'aggregate',
           'best_learning_rates', 'select_finalists', 'finalist_specs',
           'all_specs', 'RUN_COLUMNS', 'RESULT_COLUMNS', 'write_csv',
           'read_csv', 'setting', 'markdown_table', 'VARIANCE_COLUMNS',
           'variance_rows', 'variance_markdown', 'write_report',
           'plot_loss_curves', 'plot_memory', 'plot_lr_sensitivity',
           'plot_gradient_variance', 'plot_all', 'run_study', 'parse_args',
           'main']

# The whole study.


def _prepare_data(study: Study, say) -> None:
  """Builds the data set and tokenizer once, before any run (workers race
  otherwise), and records the unigram baseline."""
  from .. import data as data_lib  # pylint: disable=g-import-not-at-top
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
                      help=f'study YAML (default: configs/{DEFAULT_CONFIG.name})')
  parser.add_argument('--quick', action='store_true',
                      help=f'the few-minute variant '
                      f'(configs/{QUICK_CONFIG.name})')
  parser.add_argument('--jobs', type=int, default=1,
                      help='parallel trainer processes (default 1: in '
                      'sequence, in this process)')
  parser.add_argument('--report-only', action='store_true',
                      help='only rewrite the table and plots from the '
                      'finished runs')
  return parser.parse_args(argv)


@cli
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.quick and args.config:
    raise UsageError('give either --quick or --config')
  if args.jobs < 1:
    raise UsageError(f'--jobs must be >= 1, got {args.jobs}')
  path = QUICK_CONFIG if args.quick else (args.config or DEFAULT_CONFIG)
  say = lambda *a: print(time.strftime('%H:%M:%S'), *a, flush=True)
  study = load_study(path)
  if args.report_only:
    write_report(study, say=say)
    return 0
  outcome = run_study(study, jobs=args.jobs, say=say)
  return 1 if outcome['errors'] or outcome['stopped'] else 0
