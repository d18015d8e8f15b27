"""Collecting results."""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from typing import Any, Optional

from .config import RunSpec, Study, _spec, sweep_specs
from .runner import _read_json, run_state


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
