"""Collecting results: one row per run, statistics per learning rate, the
best rates, the long runs and the finalists."""

from __future__ import annotations

import math
import pathlib
import statistics
from typing import Any, Optional

from ..metrics import read_records
from .config import LONG, SWEEP, RunSpec, Study, spec, sweep_specs
from .runner import FINISHED, locate, read_json


def records(run_dir_path: pathlib.Path) -> list[dict[str, Any]]:
  """The run's ``metrics.jsonl`` records ([] without the file)."""
  return read_records(run_dir_path / 'metrics.jsonl')


def run_row(run: RunSpec) -> dict[str, Any]:
  """The run's status and ``summary.json`` figures (None before it is done):
  what the plan needs, without reading its curves. A finished run reads from
  its folder, else from its copy in the ledger."""
  return _row(run, *locate(run))


def _row(run: RunSpec, state: str, where: Optional[pathlib.Path]
         ) -> dict[str, Any]:
  row: dict[str, Any] = {
      'phase': run.phase, 'optimizer': run.optimizer,
      'learning_rate': run.learning_rate, 'seed': run.seed,
      'status': state if state in FINISHED else 'missing'}
  summary = read_json(where / 'summary.json') if state == 'done' else None
  for key in ('steps', 'tokens', 'eval_loss', 'eval_perplexity',
              'opt_state_bytes', 'param_bytes', 'tokens_per_s', 'wall_s'):
    row[key] = summary[key] if summary else None
  # Set in runs restored from an earlier report's tables (the ledger's).
  row['restored_from'] = (summary or {}).get('restored_from')
  row['run_dir'] = str(run.run_dir)
  return row


def expected_seconds(spec: RunSpec, rows: list[dict[str, Any]]
                     ) -> Optional[float]:
  """How long ``spec`` is expected to take: the longest wall time of a
  finished run of its phase, else the longest wall time per step of any
  finished run times its steps; None before any run has finished.

  Measured as those runs ran (the same ``--jobs`` keeps it a fair guess); a
  resumed run's summary counts only its last part, which the maximum
  discounts.
  """
  done = [r for r in rows if r['status'] == 'done' and r['wall_s']]
  same = [r['wall_s'] for r in done if r['phase'] == spec.phase]
  if same:
    return max(same)
  if done:
    return max(r['wall_s'] / r['steps'] for r in done) * spec.config.train.steps
  return None


def memory_mb(row: dict[str, Any]) -> float:
  """Weights + optimizer state of a run (or aggregated) row, in MB (1e6
  bytes): the paper's memory column."""
  return (row['param_bytes'] + row['opt_state_bytes']) / 1e6


def collect_run(run: RunSpec) -> dict[str, Any]:
  """One row of ``runs.csv``: :func:`run_row` plus the last train loss (and
  the run's curves under ``'records'``)."""
  state, where = locate(run)
  row = _row(run, state, where)
  recs = records(where) if where else []
  train_losses = [r['loss'] for r in recs if r.get('kind') == 'train'
                  and not r.get('skipped')]
  row.update(final_train_loss=train_losses[-1] if train_losses else None,
             records=recs)
  return row


def _mean(xs):
  return statistics.fmean(xs) if xs else None


def _std(xs):
  return statistics.stdev(xs) if len(xs) > 1 else None


def _phase_rows(rows, phase):
  return [r for r in rows if r.get('phase', SWEEP) == phase]


def phase_rates(rows: list[dict[str, Any]], study: Study, phase: str
                ) -> dict[str, list[float]]:
  """Per optimizer, the learning rates of ``phase`` (the sweep's grid, or
  the rates that have long runs), in increasing order."""
  if phase == SWEEP:
    return {n: sorted(r) for n, r in study.optimizers.items()}
  out = {n: set() for n in study.optimizers}
  for r in _phase_rows(rows, phase):
    out[r['optimizer']].add(r['learning_rate'])
  return {n: sorted(r) for n, r in out.items()}


def aggregate(rows: list[dict[str, Any]], study: Study
              ) -> list[dict[str, Any]]:
  """One row per (phase, optimizer, learning rate): statistics over seeds."""
  groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
  for row in rows:
    key = (row.get('phase', SWEEP), row['optimizer'], row['learning_rate'])
    groups.setdefault(key, []).append(row)
  finalists = select_finalists(rows, study)
  out = []
  for phase in study.phases:
    best = best_learning_rates(rows, study, phase)
    for name, rates in phase_rates(rows, study, phase).items():
      for lr in rates:
        runs = groups.get((phase, name, lr), [])
        done = [r for r in runs if r['status'] == 'done']
        diverged = [r for r in runs if r['status'] == 'diverged']
        losses = [r['eval_loss'] for r in done]
        ppls = [r['eval_perplexity'] for r in done]
        ref = done[0] if done else {}
        out.append({
            'phase': phase, 'optimizer': name, 'learning_rate': lr,
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
            'grid_end': lr in (min(study.optimizers[name]),
                               max(study.optimizers[name])),
            'finalist': (phase == study.final_phase and name in finalists
                         and best.get(name) == lr),
        })
  return out


def best_learning_rates(rows: list[dict[str, Any]], study: Study,
                        phase: str = SWEEP) -> dict[str, float]:
  """Per optimizer, the learning rate of ``phase`` with the lowest mean final
  eval loss over the sweep seeds (diverged runs count as infinitely bad; a
  rate with a missing run is not ranked; ties go to the smaller rate)."""
  best: dict[str, float] = {}
  rows = _phase_rows(rows, phase)
  for name, rates in phase_rates(rows, study, phase).items():
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


def long_specs(study: Study, sweep_rows: list[dict[str, Any]]
               ) -> list[RunSpec]:
  """Phase 2: each optimizer's best sweep rate and its ``long.neighbours``
  neighbours on each side of the sweep grid, long, with the sweep seeds.

  Then, once those have ended, a walk: while the best long rate is the
  lowest (highest) rate run long and the grid goes lower (higher), the next
  grid rate on that side runs long too, so that the best long rate ends
  between two worse ones or at the grid's end (no walk from a single long
  rate: ``neighbours: 0`` with nothing to compare). The best sweep rates come
  from ``sweep_rows``; the walk reads each long run's status and summary on
  disk (:func:`run_row`) as it goes.
  """
  if study.long_train is None:
    return []
  best = best_learning_rates(sweep_rows, study, SWEEP)
  out = []
  for name, rates in study.optimizers.items():
    if name not in best:
      continue
    grid = sorted(rates)
    i, n = grid.index(best[name]), study.long_neighbours
    lo, hi = max(0, i - n), min(len(grid) - 1, i + n)
    while hi > lo:
      ran = [run_row(spec(study, LONG, name, lr, seed))
             for lr in grid[lo:hi + 1] for seed in study.seeds]
      if any(r['status'] == 'missing' for r in ran):
        break
      best_long = best_learning_rates(ran, study, LONG).get(name)
      if best_long == grid[lo] and lo > 0:
        lo -= 1
      elif best_long == grid[hi] and hi < len(grid) - 1:
        hi += 1
      else:
        break
    out += [spec(study, LONG, name, lr, seed)
            for lr in grid[lo:hi + 1] for seed in study.seeds]
  return out


def select_finalists(rows: list[dict[str, Any]], study: Study) -> list[str]:
  """``finalists.always`` plus the ``top`` best others, ranked by the eval
  loss of their best rate in the final phase."""
  phase = study.final_phase
  best = best_learning_rates(rows, study, phase)

  def score(name):
    return statistics.fmean(
        r['eval_loss'] for r in _phase_rows(rows, phase)
        if r['optimizer'] == name and r['learning_rate'] == best[name]
        and r['seed'] in study.seeds and r['status'] == 'done')

  others = sorted((n for n in best if n not in study.finalists_always),
                  key=score)
  return [n for n in study.finalists_always if n in best] + \
      others[:study.finalists_top]


def finalist_specs(study: Study, rows: list[dict[str, Any]]) -> list[RunSpec]:
  """The finalists' extra seeds at their best rate of the final phase."""
  phase = study.final_phase
  best = best_learning_rates(rows, study, phase)
  return [spec(study, phase, name, best[name], seed)
          for name in select_finalists(rows, study)
          for seed in study.finalist_seeds if seed not in study.seeds]


def all_specs(study: Study) -> list[RunSpec]:
  """Every run the study has decided on so far, from the finished ones, in
  the order to train them.

  Optimizer by optimizer (``study.order``): its sweep, then, once every
  sweep run of it has finished, its long runs; the finalists' seeds once
  every long run has finished. A study stopped part way thus leaves whole
  rows of the table, the ``priority`` optimizers' first.
  """
  sweep = sweep_specs(study)
  sweep_rows = [run_row(s) for s in sweep]
  out, rows, settled = [], list(sweep_rows), True
  for name in study.order:
    out += [s for s in sweep if s.optimizer == name]
    mine = [r for r in sweep_rows if r['optimizer'] == name]
    if any(r['status'] == 'missing' for r in mine):
      settled = False
      continue
    longs = long_specs(study, mine)
    long_rows = [run_row(s) for s in longs]
    out += longs
    rows += long_rows
    settled = settled and all(r['status'] != 'missing' for r in long_rows)
  if settled:
    out += finalist_specs(study, rows)
  return out
