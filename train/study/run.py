"""Running a whole study: data once, then every run as the study decides on
it (each optimizer's sweep, its long runs, the finalists' seeds), then the
report."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from ..config import to_dict
from .config import SWEEP, Study, run_config
from .report import write_report
from .results import (all_specs, best_learning_rates, collect_run,
                      expected_seconds, run_row)
from .runner import Runner, read_json


def prepare_data(study: Study, say: Callable[..., None]) -> dict[str, Any]:
  """Builds the data set and tokenizer once, before any run (workers race
  otherwise); records the unigram baseline, the splits' token counts and
  how many documents the eval tokens come from in the ledger's
  ``study.json``, and says when runs repeat the training data."""
  from .. import data as data_lib  # pylint: disable=g-import-not-at-top
  name, rates = next(iter(study.optimizers.items()))
  config = run_config(study, SWEEP, name, rates[0], study.seeds[0])
  meta_path = study.ledger_dir / 'study.json'
  kept = read_json(meta_path) or {}
  dataset = data_lib.prepare(config.data, config.model.vocab_size)
  key = {'data': to_dict(config)['data'], 'vocab': config.model.vocab_size}
  meta = dict(kept)
  if meta.get('data_key') != key:
    meta = {
        'data_key': key,
        'unigram_perplexity': data_lib.unigram_perplexity(dataset),
        'train_tokens': int(data_lib.token_counts(
            dataset, dataset.train_split, None).sum()),
        'eval_split_tokens': int(data_lib.token_counts(
            dataset, dataset.eval_split, None).sum()),
    }
  eval_tokens = config.train.eval_tokens
  if meta.get('eval_documents', {}).get('tokens') != eval_tokens:
    meta['eval_documents'] = {  # Where the eval tokens come from.
        'tokens': eval_tokens,
        'documents': dataset.documents_holding(dataset.eval_split,
                                               eval_tokens),
        'of': dataset.num_documents(dataset.eval_split)}
  if meta != kept:
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
  say(f'data: {config.data.name} in {config.data.data_dir}, '
      f'{meta["train_tokens"]:,} training tokens, unigram perplexity '
      f'{meta["unigram_perplexity"]:.2f}')
  for phase in study.phases:
    c = run_config(study, phase, name, rates[0], study.seeds[0])
    tokens = c.train.steps * c.data.batch_size * c.data.seq_len
    if tokens > meta['train_tokens']:
      say(f'note: a {phase} run reads {tokens:,} tokens, '
          f'{tokens / meta["train_tokens"]:.2f} passes over the training '
          f'split')
  return meta


def run_study(study: Study, jobs: int = 1,
              say: Callable[..., None] = print,
              hours: Optional[float] = None) -> dict[str, Any]:
  """Runs (or resumes) the study and writes its report.

  With ``hours``, starts only the runs expected to end within that time
  (:func:`results.expected_seconds`) and defers the others to the next call.

  Returns ``{'results': {run_dir: result}, 'report': {name: path},
  'errors': n, 'deferred': n, 'stopped': bool, 'wall_s': seconds}``.
  """
  t0 = time.time()
  if jobs < 1:
    raise ValueError(f'jobs must be >= 1, got {jobs}.')
  if hours is not None and not hours > 0:
    raise ValueError(f'hours must be > 0, got {hours}.')
  say(f'study {study.title}: phases {", ".join(study.phases)}, optimizers in '
      f'the order {", ".join(study.order)}, output in {study.output_dir}, '
      f'report in {study.docs_dir}')
  prepare_data(study, say)
  deadline = t0 + hours * 3600 if hours else None
  if deadline:
    say(f'runs that would end after '
        f'{time.strftime("%H:%M", time.localtime(deadline))} are deferred')
  runner = Runner(study, jobs, say, deadline, lambda spec: expected_seconds(
      spec, [run_row(s) for s in all_specs(study)]))
  runner.run(lambda: all_specs(study))
  rows = [collect_run(s) for s in all_specs(study)]
  best = best_learning_rates(rows, study, study.final_phase)
  say(f'best {study.final_phase} learning rates: ' + ', '.join(
      f'{n} {lr:g}' for n, lr in best.items()))
  report = write_report(study, rows, say)
  errors = sum(r['status'] == 'error' for r in runner.results.values())
  deferred = sum(r['status'] == 'deferred' for r in runner.results.values())
  wall = time.time() - t0
  say(f'study {study.title}: {"stopped" if runner.stopped else "done"} in '
      f'{wall / 60:.1f} min'
      f'{f", {errors} run(s) failed with errors" if errors else ""}'
      f'{f", {deferred} run(s) deferred to the next call" if deferred else ""}')
  return {'results': runner.results, 'report': report, 'errors': errors,
          'deferred': deferred, 'stopped': runner.stopped, 'wall_s': wall}
