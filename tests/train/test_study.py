"""The study runner (train/study/) and the gradient-variance diagnostic."""

import copy
import csv
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from train import data as data_lib
from train import study as study_lib
from train.config import load_config, to_dict
from train.loop import train
from train.study import config as study_config
from train.study import estimate as study_estimate
from train.study import ledger as study_ledger
from train.study import page as study_page
from train.study import paper as study_paper
from train.study import report as study_report
from train.study import results as study_results
from train.study import runner as study_runner

REPO = pathlib.Path(__file__).resolve().parents[2]

BASE = {
    'model': {'vocab_size': 512, 'd_model': 32, 'n_layers': 1, 'n_heads': 2,
              'd_ff': 64, 'max_seq_len': 32},
    'data': {'name': 'embedded', 'seq_len': 32, 'batch_size': 8},
    'train': {'steps': 4, 'eval_every': 2, 'eval_tokens': 512, 'log_every': 1,
              'checkpoint_every': 2, 'keep_checkpoints': 1},
}
SMALL = ['model.vocab_size=512', 'model.d_model=32', 'model.n_layers=2',
         'model.n_heads=2', 'model.d_ff=64', 'model.max_seq_len=32',
         'data.seq_len=32', 'data.batch_size=8', 'train.eval_tokens=512',
         'train.progress=false']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def study_values(data_dir, out, **changes):
  base = copy.deepcopy(BASE)
  base['data']['data_dir'] = data_dir
  values = {
      'title': 'test', 'output_dir': str(out / 'runs'),
      'docs_dir': str(out / 'docs'), 'base': base,
      'optimizers': {'scale': [3e-3], 'adamw': [1e-2]}, 'seeds': [0],
      'diagnostics': {'optimizers': ['scale'], 'every': 2, 'microbatches': 2},
      'prune_checkpoints': False,
  }
  values.update(changes)
  return values


def quiet(*args):
  del args


def mtimes(root):
  return {p: p.stat().st_mtime_ns for p in root.rglob('summary.json')}


@pytest.mark.slow
def test_two_run_grid_runs_resumes_and_reports(data_dir, tmp_path):
  study = study_lib.parse_study(study_values(data_dir, tmp_path))
  out = study_lib.run_study(study, say=quiet)
  statuses = {p.parent.parent.name: r['status']
              for p, r in out['results'].items()}
  assert statuses == {'scale': 'done', 'adamw': 'done'}, out['results']
  assert out['errors'] == 0 and not out['stopped']

  docs = tmp_path / 'docs'
  for name in ('results.csv', 'runs.csv', 'results_table.md', 'setting.json'):
    assert (docs / name).stat().st_size > 100, name
  for name in ('loss_vs_tokens', 'ppl_vs_memory', 'lr_sensitivity',
               'grad_variance'):
    assert (docs / f'{name}.png').stat().st_size > 10_000, name
  with (docs / 'results.csv').open() as f:
    rows = list(csv.DictReader(f))
  assert [(r['optimizer'], r['best_lr']) for r in rows] == [
      ('scale', 'True'), ('adamw', 'True')]
  for r in rows:
    assert math.isfinite(float(r['eval_ppl_mean']))
    assert int(r['tokens']) == 4 * 8 * 32
  scale_row = rows[0]
  assert 0 < int(scale_row['opt_state_bytes']) < int(rows[1]['opt_state_bytes'])
  table = (docs / 'results_table.md').read_text()
  assert f'{float(scale_row["eval_ppl_mean"]):.2f}' in table
  assert '| scale | 0.003 |' in table
  # Where the eval tokens come from, counted on the data and said on the page.
  eval_docs = json.loads((study.ledger_dir / 'study.json').read_text())[
      'eval_documents']
  cfg = study_config.run_config(study, 'sweep', 'scale', 3e-3, 0)
  dataset = data_lib.prepare(cfg.data, cfg.model.vocab_size)
  assert eval_docs == {
      'tokens': cfg.train.eval_tokens,
      'documents': dataset.documents_holding('validation',
                                             cfg.train.eval_tokens),
      'of': dataset.num_documents('validation')}
  phrase = study_page.eval_source({'eval_documents': eval_docs})
  assert f'they come from {phrase})' in (docs / 'results.md').read_text()

  # Second call: both runs are finished and skipped, nothing retrained.
  before = mtimes(tmp_path / 'runs')
  out = study_lib.run_study(study, say=quiet)
  assert {r['status'] for r in out['results'].values()} == {'skipped'}
  assert mtimes(tmp_path / 'runs') == before

  # A half-finished run (no summary, checkpoint kept) resumes, not restarts.
  scale_dir = tmp_path / 'runs' / 'sweep' / 'scale' / 'lr_0.003' / 'seed_0'
  (scale_dir / 'summary.json').unlink()
  shutil.rmtree(study.ledger_dir / 'sweep')  # Else its kept copy counts.
  out = study_lib.run_study(study, say=quiet)
  result = out['results'][scale_dir]
  assert (result['status'], result['state']) == ('done', 'partial')
  assert 'resumed from step 4' in (scale_dir / 'train.log').read_text()
  records = [json.loads(l) for l in
             (scale_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2, 3, 4]
  assert [r['step'] for r in records if r['kind'] == 'diagnostics'] == [2, 4]


def test_run_state_follows_the_files(data_dir, tmp_path):
  study = study_lib.parse_study(study_values(data_dir, tmp_path))
  spec = study_config.sweep_specs(study)[0]
  d = spec.run_dir
  assert study_runner.run_state(spec) == 'new'
  d.mkdir(parents=True)
  (d / 'config.yaml').write_text(yaml.safe_dump(to_dict(spec.config)))
  assert study_runner.run_state(spec) == 'partial'
  summary = {'steps': 4, 'eval_loss': 5.0, 'stopped_by': None}
  (d / 'summary.json').write_text(json.dumps(summary))
  assert study_runner.run_state(spec) == 'done'
  (d / 'summary.json').write_text(json.dumps({**summary, 'steps': 3}))
  assert study_runner.run_state(spec) == 'partial'  # Stopped early: resume.
  (d / 'failed.json').write_text(json.dumps({'status': 'diverged'}))
  assert study_runner.run_state(spec) == 'diverged'
  changed = to_dict(spec.config)
  changed['train']['steps'] = 5
  (d / 'config.yaml').write_text(yaml.safe_dump(changed))
  assert study_runner.run_state(spec) == 'new'  # Another config: start over.


def test_a_key_added_to_the_trainer_later_keeps_runs_valid(data_dir,
                                                          tmp_path):
  study = study_lib.parse_study(study_values(data_dir, tmp_path))
  spec = study_config.sweep_specs(study)[0]  # scale, with diagnostics on.
  assert spec.config.train.diagnostics_microbatches == 2  # Not the default.
  saved = to_dict(spec.config)
  del saved['train']['max_consecutive_skips']  # At its default: matches.
  saved['train']['a_removed_key'] = 1  # Unknown to the trainer: ignored.
  assert study_runner.config_matches(saved, spec.config)
  del saved['train']['diagnostics_microbatches']  # Default 4 != 2.
  assert not study_runner.config_matches(saved, spec.config)
  assert not study_runner.config_matches(None, spec.config)


def test_best_learning_rate_and_finalists(data_dir, tmp_path):
  values = study_values(data_dir, tmp_path, optimizers={
      'scale': [1e-3, 3e-3], 'adamw': [1e-3, 3e-3], 'sgd': [0.1, 1.0],
      'muon': [0.02]}, finalists={'always': ['scale'], 'top': 1,
                                  'seeds': [1, 2]})
  study = study_lib.parse_study(values)
  losses = {('scale', 1e-3): 5.0, ('scale', 3e-3): 4.0,
            ('adamw', 1e-3): 4.5, ('adamw', 3e-3): None,  # Diverged.
            ('sgd', 0.1): 6.0, ('sgd', 1.0): 7.0, ('muon', 0.02): 4.2}
  rows = [{'optimizer': n, 'learning_rate': lr, 'seed': 0,
           'status': 'diverged' if loss is None else 'done',
           'eval_loss': loss} for (n, lr), loss in losses.items()]
  assert study_results.best_learning_rates(rows, study) == {
      'scale': 3e-3, 'adamw': 1e-3, 'sgd': 0.1, 'muon': 0.02}
  assert study_results.select_finalists(rows, study) == ['scale', 'muon']
  specs = study_results.finalist_specs(study, rows)
  assert [(s.optimizer, s.learning_rate, s.seed) for s in specs] == [
      ('scale', 3e-3, 1), ('scale', 3e-3, 2), ('muon', 0.02, 1),
      ('muon', 0.02, 2)]


def _drop(values, *keys):
  node = values
  for k in keys[:-1]:
    node = node[k]
  del node[keys[-1]]
  return values


BAD = {
    'unknown top-level key': (lambda v: {**v, 'optimisers': {}}, 'optimisers'),
    'missing optimizers': (lambda v: _drop(v, 'optimizers'), 'optimizers'),
    'unknown optimizer': (
        lambda v: {**v, 'optimizers': {'adam': [1e-3]}}, 'optimizers.adam'),
    'empty sweep': (lambda v: {**v, 'optimizers': {'scale': []}},
                    'optimizers.scale'),
    'negative lr': (lambda v: {**v, 'optimizers': {'scale': [1e-3, -1.0]}},
                    'optimizers.scale[1]'),
    'lr not a number': (lambda v: {**v, 'optimizers': {'scale': ['fast']}},
                        'optimizers.scale[0]'),
    'seeds not ints': (lambda v: {**v, 'seeds': [0, 'a']}, 'seeds'),
    'empty seeds': (lambda v: {**v, 'seeds': []}, 'seeds'),
    'unknown base key': (
        lambda v: {**v, 'base': {**v['base'], 'model': {'width': 3}}},
        'base.model.width'),
    'bad base value': (
        lambda v: {**v, 'base': {**v['base'], 'data': {
            **v['base']['data'], 'seq_len': 64}}}, 'base.data.seq_len'),
    'base sets the optimizer': (
        lambda v: {**v, 'base': {**v['base'], 'optimizer': {'name': 'sgd'}}},
        'base.optimizer.name'),
    'base sets the seed': (
        lambda v: {**v, 'base': {**v['base'], 'train': {'seed': 3}}},
        'base.train.seed'),
    'finalist not in the study': (
        lambda v: {**v, 'finalists': {'always': ['muon'], 'seeds': [1]}},
        'finalists.always'),
    'finalists without seeds': (
        lambda v: {**v, 'finalists': {'always': ['scale']}},
        'finalists.seeds'),
    'rates one folder apart': (
        lambda v: {**v, 'optimizers': {'scale': [3e-3, 3.0000001e-3],
                                       'adamw': [1e-2]}},
        'optimizers.scale'),
    'diagnostics unknown key': (
        lambda v: {**v, 'diagnostics': {'every': 2, 'often': True}},
        'diagnostics.often'),
    'diagnostics microbatches': (
        lambda v: {**v, 'diagnostics': {'optimizers': ['scale'],
                                        'microbatches': 3}},
        'diagnostics.microbatches'),
    'override of an optimizer not in the study': (
        lambda v: {**v, 'overrides': {'muon': {'optimizer': {}}}},
        'overrides.muon'),
    'override sets the rate': (
        lambda v: {**v, 'overrides': {'scale': {'optimizer': {
            'learning_rate': 1.0}}}}, 'overrides.scale.optimizer.learning_rate'),
    'sweep sets the seed': (lambda v: {**v, 'sweep': {'seed': 1}},
                            'sweep.seed'),
    'long not a mapping': (lambda v: {**v, 'long': 3}, 'long'),
    'priority not in the study': (
        lambda v: {**v, 'priority': ['scale', 'muon']}, 'priority'),
    'negative neighbours': (
        lambda v: {**v, 'long': {'steps': 8, 'neighbours': -1}},
        'long.neighbours'),
    'long with an unknown train key': (
        lambda v: {**v, 'long': {'stepz': 8}}, 'long.stepz'),
    'sweep with zero steps': (
        lambda v: {**v, 'sweep': {'steps': 0}}, 'sweep.steps'),
    'a bad override value': (
        lambda v: {**v, 'overrides': {'scale': {'optimizer': {
            'vector_learning_rate': -1.0}}}},
        'overrides.scale.optimizer.vector_learning_rate'),
    'a bad base value': (
        lambda v: {**v, 'base': {**v['base'], 'model': {
            **v['base']['model'], 'd_model': 30}}}, 'base.model.n_heads'),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_study_config_names_the_key(name, tmp_path):
  change, key = BAD[name]
  values = change(study_values(str(tmp_path / 'data'), tmp_path))
  with pytest.raises(study_lib.StudyConfigError) as info:
    study_lib.parse_study(values)
  assert str(info.value).startswith(f'{key}:'), str(info.value)


def test_cli_reports_a_bad_study_config(tmp_path, capsys):
  path = tmp_path / 'bad.yaml'
  path.write_text('output_dir: x\nbase: {}\noptimizers: {scale: [0]}\n'
                  'seeds: [0]\n')
  assert study_lib.main(['--config', str(path)]) == 2
  assert 'optimizers.scale[0]' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--jobs', '0'], '--jobs must be >= 1'),
    (['--estimate', '0'], '--estimate must time >= 1 steps'),
    (['--hours', '0'], '--hours must be > 0'),
    (['--hours', 'nan'], '--hours must be > 0'),
    (['--quick', '--config', 'x.yaml'], 'give either --quick or --config'),
])
def test_cli_refuses_bad_arguments(args, message, capsys):
  assert study_lib.main(args) == 2
  assert message in capsys.readouterr().err


# --------------------------------------------------------------------------
# Phases, aggregation and the report against hand computations (no training:
# the runs' files are written here as the trainer writes them).

RATES = [1e-3, 3e-3, 1e-2, 3e-2]
SWEEP_LOSS = {('scale', 1e-3): 5.0, ('scale', 3e-3): 4.6, ('scale', 1e-2): 4.4,
              ('scale', 3e-2): 4.9, ('adamw', 1e-3): 4.8, ('adamw', 3e-3): 4.7,
              ('adamw', 1e-2): None, ('adamw', 3e-2): None,  # None: diverged
              ('sgd', 1e-3): 6.0, ('sgd', 3e-3): 5.9, ('sgd', 1e-2): 5.5,
              ('sgd', 3e-2): 5.2}
LONG_LOSS = {'scale': {3e-3: 3.9, 1e-2: 3.7, 3e-2: 4.2},
             'adamw': {1e-3: 3.8, 3e-3: 3.85},
             'sgd': {1e-2: 4.9, 3e-2: 4.6}}
SEED1 = {'scale': 3.75, 'adamw': 3.86, 'sgd': 4.7}  # finalists' second seed


def phased_values(data_dir, out):
  return study_values(
      data_dir, out, optimizers={n: list(RATES)
                                 for n in ('scale', 'adamw', 'sgd')},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4,
                                'neighbours': 1},
      overrides={'scale': {'optimizer': {'vector_learning_rate': 0.02}}},
      finalists={'always': ['scale'], 'top': 1, 'seeds': [1]},
      diagnostics={'optimizers': ['scale'], 'every': 4, 'microbatches': 2})


def fake_run(spec, loss, param_bytes=1000, state_bytes=None):
  """A finished (or diverged, loss None) run's files, as the trainer and
  the runner write them."""
  d = spec.run_dir
  d.mkdir(parents=True, exist_ok=True)
  (d / 'config.yaml').write_text(yaml.safe_dump(to_dict(spec.config)))
  steps = spec.config.train.steps
  tokens = steps * 8 * 32
  if loss is None:
    (d / 'failed.json').write_text(json.dumps({'status': 'diverged'}))
    (d / 'metrics.jsonl').write_text(json.dumps(
        {'kind': 'train', 'step': 1, 'tokens': 0, 'loss': 9.0}) + '\n')
    return
  state = state_bytes or {'scale': 100, 'adamw': 2000, 'sgd': 4}[
      spec.optimizer]
  records = [{'kind': 'train', 'step': s, 'tokens': (s - 1) * 256,
              'loss': loss + 1.0 / s} for s in range(1, steps + 1)]
  records += [{'kind': 'eval', 'step': steps, 'tokens': tokens, 'loss': loss}]
  records += [{'kind': 'diagnostics', 'step': 4, 'tokens': 768,
               'grad_var/embed': 2.0, 'grad_var/layer_0': 1.0,
               'grad_var/lm_head': 3.0, 'grad_sq/embed': 1.0,
               'grad_sq/layer_0': 1.0, 'grad_sq/lm_head': 1.0}]
  (d / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))
  (d / 'summary.json').write_text(json.dumps({
      'optimizer': spec.optimizer, 'steps': steps, 'tokens': tokens,
      'eval_loss': loss, 'eval_perplexity': math.exp(loss),
      'tokens_per_s': 1000.0, 'wall_s': 1.0, 'stopped_by': None,
      'opt_state_bytes': state, 'param_bytes': param_bytes}))


def test_long_runs_are_the_best_rate_and_its_grid_neighbours(data_dir,
                                                             tmp_path):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  assert study.phases == ('sweep', 'long')
  for spec in study_config.sweep_specs(study):
    fake_run(spec, SWEEP_LOSS[spec.optimizer, spec.learning_rate])
  rows = [study_results.collect_run(s)
          for s in study_config.sweep_specs(study)]
  # By hand: scale's lowest sweep loss is at 1e-2; adamw's at 3e-3 (its
  # diverged rates count as infinitely bad); sgd's at the grid's end, 3e-2.
  assert study_results.best_learning_rates(rows, study) == {
      'scale': 1e-2, 'adamw': 3e-3, 'sgd': 3e-2}
  longs = study_results.long_specs(study, rows)
  assert [(s.phase, s.optimizer, s.learning_rate, s.seed) for s in longs] == [
      ('long', 'scale', 3e-3, 0), ('long', 'scale', 1e-2, 0),
      ('long', 'scale', 3e-2, 0), ('long', 'adamw', 1e-3, 0),
      ('long', 'adamw', 3e-3, 0), ('long', 'adamw', 1e-2, 0),
      ('long', 'sgd', 1e-2, 0), ('long', 'sgd', 3e-2, 0)]
  assert all(s.config.train.steps == 8 for s in longs)
  assert all(s.config.train.eval_every == 4 for s in longs)
  assert all(s.config.train.steps == 4
             for s in study_config.sweep_specs(study))
  scale_run = next(s for s in longs if s.optimizer == 'scale')
  assert scale_run.config.optimizer.vector_learning_rate == 0.02
  assert longs[3].config.optimizer.vector_learning_rate is None  # adamw
  assert str(scale_run.run_dir).endswith('long/scale/lr_0.003/seed_0')


def test_long_runs_walk_past_a_best_rate_at_their_edge(data_dir, tmp_path):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  for s in study_config.sweep_specs(study):
    fake_run(s, SWEEP_LOSS[s.optimizer, s.learning_rate])

  def long_rates(name):
    return sorted({s.learning_rate for s in study_results.all_specs(study)
                   if s.phase == 'long' and s.optimizer == name})

  def finish(name, lr, loss):
    fake_run(study_config.spec(study, 'long', name, lr, 0), loss)

  # scale: sweep best 1e-2, so 3e-3, 1e-2 and 3e-2 long; 3e-3 (the lowest)
  # is best, so 1e-3 runs long too, once all three have ended.
  assert long_rates('scale') == [3e-3, 1e-2, 3e-2]
  finish('scale', 3e-3, 3.6)
  finish('scale', 1e-2, 3.7)
  assert long_rates('scale') == [3e-3, 1e-2, 3e-2]
  finish('scale', 3e-2, 4.2)
  assert long_rates('scale') == [1e-3, 3e-3, 1e-2, 3e-2]
  finish('scale', 1e-3, 3.65)  # the grid's bottom: no further.
  assert long_rates('scale') == [1e-3, 3e-3, 1e-2, 3e-2]
  # adamw walks up from 1e-2 to 3e-2, the grid's top (a diverged run).
  for lr, loss in ((1e-3, 3.9), (3e-3, 3.85), (1e-2, 3.8)):
    finish('adamw', lr, loss)
  assert long_rates('adamw') == [1e-3, 3e-3, 1e-2, 3e-2]
  finish('adamw', 3e-2, None)
  assert long_rates('adamw') == [1e-3, 3e-3, 1e-2, 3e-2]
  # sgd's best long rate is the grid's top: no walk beyond it. Every long
  # run has ended now, so the finalists' seeds follow, at the walked rates.
  finish('sgd', 1e-2, 4.9)
  finish('sgd', 3e-2, 4.6)
  assert long_rates('sgd') == [1e-2, 3e-2]
  finals = [(s.optimizer, s.learning_rate) for s in
            study_results.all_specs(study) if s.seed == 1]
  assert finals == [('scale', 3e-3), ('adamw', 1e-2)]


def test_a_walk_takes_several_steps_and_stops_inside_the_grid(data_dir,
                                                              tmp_path):
  grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': grid, 'adamw': grid},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4, 'neighbours': 1},
      finalists={'always': ['scale'], 'top': 0, 'seeds': [1]}))
  sweep = {'scale': 1e-2, 'adamw': 1e-3}  # each one's best sweep rate
  for s in study_config.sweep_specs(study):
    fake_run(s, 4.0 if s.learning_rate == sweep[s.optimizer] else 5.0)
  long_loss = {'scale': {3e-4: 3.7, 1e-3: 3.5, 3e-3: 3.6, 1e-2: 3.8,
                         3e-2: 4.2},
               'adamw': {3e-4: 3.9, 1e-3: 3.8, 3e-3: 3.7, 1e-2: 3.75}}
  # scale's runs all on disk (as if from an earlier call): one call walks
  # two steps down, 1e-3 (better than 3e-3) then 3e-4 (worse than 1e-3).
  for lr, loss in long_loss['scale'].items():
    fake_run(study_config.spec(study, 'long', 'scale', lr, 0), loss)
  for lr in (3e-4, 1e-3, 3e-3):  # adamw's first three: 3e-3 is best
    fake_run(study_config.spec(study, 'long', 'adamw', lr, 0),
             long_loss['adamw'][lr])

  def long_rates(name):
    return sorted({s.learning_rate for s in study_results.all_specs(study)
                   if s.phase == 'long' and s.optimizer == name})

  assert long_rates('scale') == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
  assert long_rates('adamw') == [3e-4, 1e-3, 3e-3, 1e-2]
  fake_run(study_config.spec(study, 'long', 'adamw', 1e-2, 0), 3.75)
  assert long_rates('adamw') == [3e-4, 1e-3, 3e-3, 1e-2]  # 1e-2 is worse
  specs = study_results.all_specs(study)
  assert [(s.optimizer, s.learning_rate) for s in specs if s.seed == 1] == [
      ('scale', 1e-3)]
  results = study_results.aggregate(
      [study_results.collect_run(s) for s in specs], study)
  # Sensitivity: the best rate's grid neighbours only (3e-4 and 3e-3 for
  # scale; 1e-2 and 3e-2, also run long, are left out).
  ppl = {lr: math.exp(loss) for lr, loss in long_loss['scale'].items()}
  np.testing.assert_allclose(
      study_page.lr_sensitivity(results, study, 'scale'),
      (ppl[3e-4] + ppl[3e-3]) / 2 / ppl[1e-3], rtol=1e-6)
  best = study_page.best_rows(results, study)
  assert best['scale']['learning_rate'] == 1e-3
  assert not best['scale']['grid_end']


def write_phased_study(data_dir, tmp_path):
  """Every run of the phased study on disk; returns the study."""
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  for spec in study_config.sweep_specs(study):
    fake_run(spec, SWEEP_LOSS[spec.optimizer, spec.learning_rate])
  for spec in study_results.all_specs(study):
    if spec.phase == 'long' and spec.seed == 0:
      fake_run(spec, LONG_LOSS[spec.optimizer].get(spec.learning_rate))
  finals = [s for s in study_results.all_specs(study) if s.seed == 1]
  for spec in finals:
    fake_run(spec, SEED1[spec.optimizer])
  return study, finals


@pytest.fixture(scope='module')
def phased_report(data_dir, tmp_path_factory):
  """The phased study's files and its report, written once."""
  study, finals = write_phased_study(data_dir,
                                     tmp_path_factory.mktemp('phased'))
  return study, finals, study_lib.write_report(study, say=quiet)


def test_finalists_and_table_equal_a_direct_computation(phased_report):
  _, finals, paths = phased_report
  # Long phase by hand: scale best 1e-2 (3.7), adamw 1e-3 (3.8; its 1e-2 long
  # run diverged), sgd 3e-2 (4.6); finalists: scale always, then the best
  # other by long loss: adamw.
  assert [(s.optimizer, s.learning_rate, s.seed) for s in finals] == [
      ('scale', 1e-2, 1), ('adamw', 1e-3, 1)]
  with paths['results_csv'].open() as f:
    table = {(r['phase'], r['optimizer'], float(r['learning_rate'])): r
             for r in csv.DictReader(f)}
  expected = {}
  for (name, lr), loss in SWEEP_LOSS.items():
    expected['sweep', name, lr] = [loss]
  for name, losses in LONG_LOSS.items():
    for lr, loss in losses.items():
      expected['long', name, lr] = [loss]
  expected['long', 'adamw', 1e-2] = [None]  # the diverged long neighbour
  expected['long', 'scale', 1e-2].append(SEED1['scale'])
  expected['long', 'adamw', 1e-3].append(SEED1['adamw'])
  assert set(table) == set(expected)
  best = {('sweep', 'scale', 1e-2), ('sweep', 'adamw', 3e-3),
          ('sweep', 'sgd', 3e-2), ('long', 'scale', 1e-2),
          ('long', 'adamw', 1e-3), ('long', 'sgd', 3e-2)}
  for key, losses in expected.items():
    row = table[key]
    done = [l for l in losses if l is not None]
    assert int(row['n_runs']) == len(done), key
    assert int(row['n_diverged']) == len(losses) - len(done), key
    assert (row['best_lr'] == 'True') == (key in best), key
    assert (row['finalist'] == 'True') == (key in {
        ('long', 'scale', 1e-2), ('long', 'adamw', 1e-3)}), key
    if not done:
      assert row['eval_ppl_mean'] == '', key
      continue
    ppl = np.exp(done)
    np.testing.assert_allclose(float(row['eval_loss_mean']), np.mean(done),
                               rtol=1e-5)
    np.testing.assert_allclose(float(row['eval_ppl_mean']), ppl.mean(),
                               rtol=1e-5)
    if len(done) > 1:
      np.testing.assert_allclose(float(row['eval_ppl_std']),
                                 ppl.std(ddof=1), rtol=1e-5)
      assert row['seeds'] == '0 1'
    assert int(row['steps']) == (8 if key[0] == 'long' else 4)
  with paths['runs_csv'].open() as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 12 + 8 + 2


def test_results_page_puts_the_paper_beside_the_runs(phased_report):
  page = phased_report[2]['results_md'].read_text()
  assert '**Not a pretraining result' in page  # 8 steps x 256 tokens.
  assert ('Eval: the first 512 tokens of the `validation` split in its '
          'stored order, the same for every run') in page
  scale_ppl = np.mean(np.exp([3.7, SEED1['scale']]))
  scale_std = np.std(np.exp([3.7, SEED1['scale']]), ddof=1)
  # Memory: (1000 + 100) B and (1000 + 2000) B: 0.0011 MB, 0.37 of AdamW's.
  assert (f'| SCALE | {scale_ppl:.2f} ± {scale_std:.2f} | 0.01 | 0.00 | 0.37 '
          f'| 30.81 | 0.15 | 0.43 |') in page
  assert '| Muon | not run | — | — | — | 28.86 | 0.23 | 0.66 |' in page
  # sgd's best rate, 3e-2, is the top of its grid (1e-3 ... 3e-2).
  assert f'| SGD | {math.exp(4.6):.2f} | 0.03 (grid end) |' in page
  # SCALE (ppl exp(3.7) mean with exp(3.75)) beats AdamW (exp(3.8), exp(3.86)
  # mean): the paper's 60M column says SCALE trails Adam.
  adam_ppl = np.mean(np.exp([3.8, SEED1['adamw']]))
  assert (f'| SCALE trails AdamW (60M) | 30.81 vs 30.05 | SCALE '
          f'{scale_ppl:.2f}, AdamW {adam_ppl:.2f} | **disagrees** |') in page
  assert '| SCALE beats GaLore (60M) | 30.81 vs 34.58 | — | not run |' in page
  # Gradient variance written as lm_head 3 > embed 2 > layer_0 1.
  assert ('the LM head has the largest gradient variance, then the embedding '
          '(Figure 4) | yes | lm_head, embed, layer_0 | agrees |') in page
  assert 'plain SGD trails Adam far behind (Figure 2) | yes | AdamW ' in page


def test_the_page_says_which_optimizers_are_unfinished(data_dir, tmp_path,
                                                      monkeypatch):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  page = lambda: (tmp_path / 'docs' / 'results.md').read_text()
  # Only scale's runs all ended: one of three. adamw has no long run; sgd
  # one of two (its best so far, 3e-2, is marked unfinished).
  calls = _faking_runner(study, monkeypatch,
                         fail={'sweep adamw lr=0.001 seed=0',
                               'long sgd lr=0.01 seed=0'})
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  assert sum(c.startswith('long scale') for c in calls) == 3
  study_lib.write_report(study, say=quiet)
  assert '**In progress: 1 of 3 optimizers finished** (SCALE).' in page()
  assert '| AdamW | not run |' in page()
  assert (f'| SGD | {math.exp(4.6):.2f} (unfinished) | 0.03 (grid end) |'
          in page())
  assert f'| SCALE | {math.exp(3.7):.2f} | 0.01 |' in page()
  # Verdicts use whole rows only.
  assert 'plain SGD trails Adam far behind (Figure 2) | yes | — | not run |' \
      in page()
  # Everything but the finalists' extra seeds.
  finals = {'long scale lr=0.01 seed=1', 'long adamw lr=0.001 seed=1'}
  calls = _faking_runner(study, monkeypatch, fail=finals)
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  assert set(calls) >= finals
  study_lib.write_report(study, say=quiet)
  assert ("**In progress: every optimizer finished; the finalists' extra "
          'seeds are still to train**') in page()
  _faking_runner(study, monkeypatch)
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  study_lib.write_report(study, say=quiet)
  assert '**In progress' not in page()


def test_without_long_neighbours_sensitivity_reads_the_sweep(data_dir,
                                                            tmp_path):
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': [1e-3, 3e-3, 1e-2],
                                      'stable_spam': [1e-3, 3e-3, 1e-2]},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4, 'neighbours': 0}))

  def row(name, phase, lr, ppl, best=False):
    return {'optimizer': name, 'phase': phase, 'learning_rate': lr,
            'eval_ppl_mean': ppl, 'best_lr': best, 'n_diverged': 0,
            'n_missing': 0, 'param_bytes': 1000, 'opt_state_bytes': 100}

  results = [row('scale', 'sweep', 1e-3, 130.0), row('scale', 'sweep', 3e-3,
                                                     100.0, True),
             row('scale', 'sweep', 1e-2, 110.0),
             row('stable_spam', 'sweep', 1e-3, 150.0),
             row('stable_spam', 'sweep', 3e-3, 100.0, True),
             row('stable_spam', 'sweep', 1e-2, 170.0),
             row('scale', 'long', 3e-3, 90.0, True),
             row('stable_spam', 'long', 3e-3, 85.0, True)]
  best = {r['optimizer']: r for r in results if r['phase'] == 'long'}
  claim = next(c for c in study_page.claims(best, results, study, {})
               if c[0].startswith('SCALE is less sensitive'))
  assert claim[2:] == ('neighbour/best perplexity 1.200 vs 1.600 (sweep '
                       'runs)', 'agrees')


def test_the_memory_verdict_waits_for_every_row_of_the_table(data_dir,
                                                             tmp_path):
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': [1e-3], 'adamw': [1e-3],
                                      'muon': [1e-3]}))

  def row(state_bytes):
    return {'eval_ppl_mean': 100.0, 'param_bytes': 1000,
            'opt_state_bytes': state_bytes}

  def memory_claim(best):
    return next(c for c in study_page.claims(best, [], study, {})
                if c[0].startswith('SCALE needs the least'))

  best = {'scale': row(100), 'adamw': row(2000)}
  assert memory_claim(best)[2:] == ('least so far: SCALE (2 of 3 rows)',
                                    'not run')
  best['muon'] = row(50)  # Every row whole: Muon needs less here.
  assert memory_claim(best)[2:] == ('least: Muon', '**disagrees**')


def test_an_optimizer_that_diverged_at_every_rate_has_ended(data_dir,
                                                            tmp_path):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  for s in study_config.sweep_specs(study):
    fake_run(s, None if s.optimizer == 'sgd' else
             SWEEP_LOSS[s.optimizer, s.learning_rate])
  for s in study_results.all_specs(study):
    if s.phase == 'long' and s.seed == 0:
      fake_run(s, LONG_LOSS[s.optimizer].get(s.learning_rate))
  specs = study_results.all_specs(study)
  assert not any(s.optimizer == 'sgd' and s.phase == 'long' for s in specs)
  rows = [study_results.run_row(s) for s in specs]
  estimate = {'optimizers': {n: {'sweep_run_cpu_s': 1, 'long_run_cpu_s': 10}
                             for n in study.optimizers},
              'finalist_runs': 2, 'finalist_run_cpu_s': 10}
  # Only the finalists' two seeds are left: none of sgd's long runs.
  assert study_estimate.remaining(study, rows, estimate) == (2, 20)
  study_lib.write_report(study, say=quiet)
  page = (tmp_path / 'docs' / 'results.md').read_text()
  assert '**In progress: every optimizer finished;' in page
  assert '| SGD | diverged at every rate | — | — |' in page
  assert ('plain SGD trails Adam far behind (Figure 2) | yes | AdamW '
          f'{math.exp(3.8):.2f}, SGD diverged | agrees |') in page


def test_lr_sensitivity_by_hand(data_dir, tmp_path):
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': [1e-3, 3e-3, 1e-2, 3e-2]},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4, 'neighbours': 1}))

  def row(lr, ppl, best=False, diverged=0, missing=0):
    return {'optimizer': 'scale', 'phase': 'long', 'learning_rate': lr,
            'eval_ppl_mean': ppl, 'best_lr': best, 'n_diverged': diverged,
            'n_missing': missing}

  results = [row(1e-3, 120.0), row(3e-3, 100.0, best=True), row(1e-2, 110.0),
             row(3e-2, 500.0)]  # 3e-2: two grid steps away, left out.
  assert study_page.lr_sensitivity(results, study, 'scale') == 1.15
  results[2] = row(1e-2, None, diverged=1)  # A neighbour diverged.
  assert study_page.lr_sensitivity(results, study, 'scale') == math.inf
  results[2] = row(1e-2, None, missing=1)  # Still running: left out.
  assert study_page.lr_sensitivity(results, study, 'scale') == 1.2
  assert study_page.lr_sensitivity(results[2:], study, 'scale') is None


def test_the_paper_table_names_the_study_optimizers():
  assert set(study_paper.TABLE) == {'adamw', 'stable_spam', 'muon', 'galore',
                                    'fira', 'swan', 'apollo', 'apollo_mini',
                                    'scale'}


def test_the_page_sets_stable_spams_reset_period_against_the_run(
    data_dir, tmp_path):
  """Stable-SPAM's clip acts until its first reset: the page says over what
  share of a long run, from the study's own reset period and length."""
  values = study_values(
      data_dir, tmp_path, optimizers={'stable_spam': [1e-3], 'scale': [1e-3]},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4, 'neighbours': 1})
  values['base']['rivals'] = {'stable_spam': {'reset_interval': 2}}
  note = study_page.stable_spam_note(study_lib.parse_study(values))
  assert 'period (2 steps;' in note
  assert 'a run here resets 4 times' in note
  assert 'the first 25% of a run here, 0% of theirs' in note
  values['base']['rivals'] = {'stable_spam': {'reset_interval': 10}}
  note = study_page.stable_spam_note(study_lib.parse_study(values))
  assert note.endswith('so a 8-step run here never resets.')
  del values['optimizers']['stable_spam']
  assert study_page.stable_spam_note(study_lib.parse_study(values)) == ''


def priced_study(data_dir, tmp_path):
  """Two optimizers on a 3-rate grid with one long neighbour and SCALE's
  second seed; an estimate pricing each kind of run differently."""
  grid = [1e-3, 3e-3, 1e-2]
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': grid, 'adamw': grid},
      sweep={'steps': 4}, long={'steps': 8, 'eval_every': 4, 'neighbours': 1},
      finalists={'always': ['scale'], 'top': 0, 'seeds': [1]}))
  estimate = {
      'optimizers': {'scale': {'sweep_run_cpu_s': 10, 'long_run_cpu_s': 100},
                     'adamw': {'sweep_run_cpu_s': 20, 'long_run_cpu_s': 200}},
      'finalist_runs': 1, 'finalist_run_cpu_s': 150}
  return study, estimate


def plan_rows(study):
  """The row of every run planned so far."""
  return [study_results.run_row(s) for s in study_results.all_specs(study)]


def test_what_is_left_counts_unplanned_long_runs_and_finalists(data_dir,
                                                               tmp_path):
  study, estimate = priced_study(data_dir, tmp_path)

  def left():
    return study_estimate.remaining(study, plan_rows(study), estimate)

  # Nothing run: 6 sweep runs, 3 + 3 long runs (plan), 1 finalist run.
  assert left() == (13, 3 * 10 + 3 * 20 + 3 * 100 + 3 * 200 + 150)
  for s in study_config.sweep_specs(study):
    if s.optimizer == 'scale':
      fake_run(s, 4.0 if s.learning_rate == 3e-3 else 5.0)
  # scale's long runs are planned now (missing), adamw's still from the plan.
  assert left() == (10, 3 * 20 + 3 * 100 + 3 * 200 + 150)
  for s in study_results.all_specs(study):
    if s.phase == 'long':
      fake_run(s, 3.5)
  assert left() == (7, 3 * 20 + 3 * 200 + 150)
  del estimate['optimizers']['adamw']
  assert left() is None


def test_spent_prices_the_finished_runs_by_kind(data_dir, tmp_path):
  """What the study cost, walks and finalists' seeds included: once whole,
  what it costs from scratch."""
  study, estimate = priced_study(data_dir, tmp_path)

  def cost():
    return study_estimate.spent(study, plan_rows(study), estimate)

  assert cost() == {}
  for s in study_config.sweep_specs(study):
    fake_run(s, 4.0 if s.learning_rate == 1e-3 else 5.0)
  assert cost() == {'sweep': (6, 3 * 10 + 3 * 20)}
  # The best sweep rate, 1e-3, and its neighbour run long; 3e-3 wins at the
  # edge, so the walk adds 1e-2, which diverges (counted whole).
  long_losses = {1e-3: 3.6, 3e-3: 3.5, 1e-2: None}
  for _ in range(3):
    for s in study_results.all_specs(study):
      if s.phase == 'long' and s.seed == 0 and not s.run_dir.exists():
        fake_run(s, long_losses[s.learning_rate])
  specs = study_results.all_specs(study)
  assert sum(s.phase == 'long' and s.learning_rate == 1e-2
             for s in specs) == 2  # One walk step per optimizer.
  final = [s for s in specs if s.seed == 1]
  assert [(s.optimizer, s.learning_rate) for s in final] == [('scale', 3e-3)]
  assert cost() == {'sweep': (6, 90), 'long': (6, 3 * 100 + 3 * 200)}
  fake_run(final[0], 3.4)
  assert cost() == {'sweep': (6, 90), 'long': (6, 900), 'finalist': (1, 100)}
  for e in estimate['optimizers'].values():
    e.update(step_s=0.1, step_cpu_s=0.2, compile_s=1.0, cpu_s=60.0,
             runs={'sweep': 3, 'long': 3})
  lines = study_page.cost_lines(
      {**estimate, 'measured_steps': 2, 'cpu_count': 2, 'load_average': 1.0,
       'cpu_s': 3600, 'wall_s': 3600}, (0, 0.0), cost())
  assert lines[-1] == (
      'The runs the study took, at those rates (a diverged run counted '
      "whole): 6 sweep + 6 long (the walks' steps included) + 1 finalists' "
      'seeds = 13 runs, **0.3 CPU hours**: the cost of `python -m '
      'train.study` from scratch (with `docs/ledger` and the run folders '
      'removed it trains every run again and rewrites this page).')
  lines = study_page.cost_lines(
      {**estimate, 'measured_steps': 2, 'cpu_count': 2, 'load_average': 1.0,
       'cpu_s': 3600, 'wall_s': 3600}, (1, 100.0), cost())
  assert lines[-3].endswith('= 13 runs, **0.3 CPU hours** so far.')
  del estimate['optimizers']['adamw']
  assert cost() is None


def test_the_page_says_where_the_eval_tokens_come_from():
  source = lambda n: study_page.eval_source(
      {'eval_documents': {'tokens': 100, 'documents': n, 'of': 72}})
  assert source(1) == "the first of the split's 72 documents alone"
  assert source(5) == "the first 5 of the split's 72 documents"
  assert study_page.eval_source({}) == ''  # Not recorded: nothing said.
  part = lambda n: study_page._eval_is_part(  # pylint: disable=protected-access
      {'eval_documents': {'tokens': 100, 'documents': n, 'of': 72}})
  assert part(1) and part(71) and not part(72)
  assert not study_page._eval_is_part({})  # pylint: disable=protected-access
  shuffled = lambda n: {'eval_shuffle': True, 'eval_documents': {
      'tokens': 100, 'documents': n, 'of': 72}}
  assert study_page.eval_source(shuffled(18)) == "18 of the split's 72 documents"
  assert study_page.eval_source(shuffled(1)) == (
      "1 of the split's 72 documents alone")
  assert study_page.eval_order(shuffled(18)) == (
      'one fixed shuffled order of its documents')
  assert study_page.eval_order({}) == 'its stored order'
  note = study_page._eval_note  # pylint: disable=protected-access
  assert note({}, '') == ' (not a sample across the split)'
  assert note({}, 'X') == ' (not a sample across the split: they come from X)'
  assert note({'eval_shuffle': True}, 'X') == ' (they come from X)'
  assert note({'eval_shuffle': True}, '') == ''


def test_the_page_says_how_far_apart_the_seeds_ended():
  def row(n_runs, lo, hi):
    return {'n_runs': n_runs, 'eval_ppl_min': lo, 'eval_ppl_max': hi}

  best = {'adamw': row(2, 90.0, 99.0), 'scale': row(2, 100.0, 101.0),
          'muon': row(1, 70.0, 70.0)}
  assert study_page.seed_spread_lines(best) == [
      'Seeds: at their best rate the seeds of a row run more than once end '
      'this far apart in perplexity (highest over lowest): SCALE 1.0%, AdamW '
      '10.0%. A gap between two rows smaller than that could turn with other '
      'seeds; the rows with one seed have no such measure.', '']
  assert study_page.seed_spread_lines({'muon': best['muon']}) == []


def test_the_sensitivity_verdict_waits_for_both_rows(data_dir, tmp_path):
  study = study_lib.parse_study(study_values(
      data_dir, tmp_path, optimizers={'scale': RATES, 'stable_spam': RATES},
      long={'steps': 8, 'eval_every': 4, 'neighbours': 1}))
  ppl = {'scale': [110.0, 100.0, 105.0], 'stable_spam': [150.0, 100.0, 120.0]}
  results = [{'optimizer': n, 'phase': 'long', 'learning_rate': lr,
              'eval_ppl_mean': p, 'best_lr': lr == 3e-3,
              'param_bytes': 1000, 'opt_state_bytes': 1000}
             for n, ps in ppl.items() for lr, p in zip(RATES, ps)]
  best = {n: next(r for r in results if r['optimizer'] == n and r['best_lr'])
          for n in ppl}

  def verdict(whole):
    rows = study_page.claims(whole, results, study, {})
    return next(r for r in rows if r[0].startswith('SCALE is less sensitive'))

  # Stable-SPAM's row not whole yet: no verdict from its runs so far.
  assert verdict({'scale': best['scale']})[2:] == ('—', 'not run')
  # Both whole: (110 + 105) / 2 / 100 against (150 + 120) / 2 / 100.
  assert verdict(best)[2:] == ('neighbour/best perplexity 1.075 vs 1.350',
                               'agrees')


def test_the_plan_reads_summaries_not_curves(data_dir, tmp_path,
                                            monkeypatch):
  """The runner calls the plan after every run: it must not read every
  finished run's metrics.jsonl."""
  study, _ = write_phased_study(data_dir, tmp_path)
  expected = study_results.all_specs(study)
  assert any(s.seed == 1 for s in expected)  # every phase was decided

  def no_curves(run_dir):
    raise AssertionError(f'the plan read the curves of {run_dir}')

  monkeypatch.setattr(study_results, 'records', no_curves)
  assert study_results.all_specs(study) == expected


def test_runner_skips_finished_runs_and_resumes_partial_ones(
    data_dir, tmp_path, monkeypatch):
  study, _ = write_phased_study(data_dir, tmp_path)
  specs = study_results.all_specs(study)
  partial = specs[0]
  (partial.run_dir / 'summary.json').unlink()  # killed before its summary
  calls = []

  def fake_execute(run_dir, values, state, prune):
    calls.append((run_dir, state))
    return {'status': 'done', 'summary': {}, 'wall_s': 0.0}

  monkeypatch.setattr(study_runner, 'execute_run', fake_execute)
  runner = study_runner.Runner(study, 1, quiet)
  runner.run(lambda: specs)
  assert calls == [(str(partial.run_dir), 'partial')]
  skipped = {p for p, r in runner.results.items() if r['status'] == 'skipped'}
  assert skipped == {s.run_dir for s in specs} - {partial.run_dir}
  diverged = [s for s in specs if s.phase == 'sweep' and
              SWEEP_LOSS[s.optimizer, s.learning_rate] is None]
  assert {runner.results[s.run_dir]['state'] for s in diverged} == {
      'diverged'}


def _faking_runner(study, monkeypatch, fail=()):
  """Replaces the trainer with one writing ``fake_run``'s files (the losses
  of SWEEP_LOSS, LONG_LOSS and SEED1); runs whose label is in ``fail`` end
  with an error instead. Returns the list of labels trained, in order."""
  specs = {str(s.run_dir): s for s in (
      study_config.spec(study, phase, name, lr, seed)
      for phase in study.phases for name, rates in study.optimizers.items()
      for lr in rates for seed in study.seeds + study.finalist_seeds)}
  calls = []

  def fake_execute(run_dir, values, state, prune):
    del values, state, prune
    spec = specs[run_dir]
    calls.append(spec.label)
    if spec.label in fail:
      return {'status': 'error', 'error': 'RuntimeError: boom', 'wall_s': 0.0}
    loss = (SWEEP_LOSS[spec.optimizer, spec.learning_rate]
            if spec.phase == 'sweep' else SEED1[spec.optimizer] if spec.seed
            else LONG_LOSS[spec.optimizer].get(spec.learning_rate))
    fake_run(spec, loss)
    return {'status': 'done' if loss else 'diverged', 'error': 'nan',
            'summary': {}, 'wall_s': 0.0}

  monkeypatch.setattr(study_runner, 'execute_run', fake_execute)
  return calls


def test_each_optimizer_is_trained_whole_in_priority_order(
    data_dir, tmp_path, monkeypatch):
  values = phased_values(data_dir, tmp_path)
  values['priority'] = ['adamw']
  study = study_lib.parse_study(values)
  assert study.order == ('adamw', 'scale', 'sgd')
  calls = _faking_runner(study, monkeypatch)
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  sweep = lambda n: [f'sweep {n} lr={lr:g} seed=0' for lr in RATES]
  # By hand: adamw's best sweep rate is 3e-3, scale's 1e-2, sgd's 3e-2 (at
  # the grid's end: one neighbour); finalists: scale (always), then the best
  # other long run, adamw's 1e-3 (3.8 against sgd's 4.6).
  assert calls == (
      sweep('adamw') + [f'long adamw lr={lr} seed=0'
                        for lr in ('0.001', '0.003', '0.01')]
      + sweep('scale') + [f'long scale lr={lr} seed=0'
                          for lr in ('0.003', '0.01', '0.03')]
      + sweep('sgd') + ['long sgd lr=0.01 seed=0', 'long sgd lr=0.03 seed=0']
      + ['long scale lr=0.01 seed=1', 'long adamw lr=0.001 seed=1'])
  calls.clear()
  runner = study_runner.Runner(study, 1, quiet)
  runner.run(lambda: study_results.all_specs(study))
  assert not calls and len(runner.results) == 12 + 8 + 2
  assert {r['status'] for r in runner.results.values()} == {'skipped'}


def test_a_failed_sweep_run_holds_back_its_optimizer_and_the_finalists(
    data_dir, tmp_path, monkeypatch):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  calls = _faking_runner(study, monkeypatch, fail={'sweep scale lr=0.01 seed=0'})
  runner = study_runner.Runner(study, 1, quiet)
  runner.run(lambda: study_results.all_specs(study))
  assert calls.count('sweep scale lr=0.01 seed=0') == 1  # Not retried.
  assert not any(c.startswith('long scale') or c.endswith('seed=1')
                 for c in calls)
  assert sum(c.startswith('long ') for c in calls) == 3 + 2  # adamw, sgd
  assert not runner.stopped


# --------------------------------------------------------------------------
# The ledger: finished runs kept in git, so a fresh clone resumes the study.


def _ledger_files(study):
  return {p.relative_to(study.ledger_dir): p.read_bytes()
          for p in study.ledger_dir.rglob('*') if p.is_file()}


def test_a_run_is_kept_in_the_ledger_when_it_finishes(data_dir, tmp_path,
                                                      monkeypatch):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  _faking_runner(study, monkeypatch)
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  specs = study_results.all_specs(study)
  kept = _ledger_files(study)
  for s in specs:
    rel = s.kept_dir.relative_to(study.ledger_dir)
    names = {p.name for p in s.run_dir.iterdir()}
    assert {p.name for p in kept if p.parent == rel} == names, s.label
    for name in names:  # The run's own small files, byte for byte.
      assert kept[rel / name] == (s.run_dir / name).read_bytes()
  assert len({p.parent for p in kept}) == len(specs)
  assert not [p for p in study.ledger_dir.rglob('*')
              if p.name.endswith(('.tmp', '.old'))]


def test_a_fresh_clone_resumes_from_the_ledger(data_dir, tmp_path,
                                               monkeypatch):
  """Runs finished before the ledger existed are kept when the runner next
  passes them; then, without any run folder, the plan, the rows and the
  report are the same, and nothing trains again."""
  study, _ = write_phased_study(data_dir, tmp_path)
  specs = study_results.all_specs(study)
  states = [study_runner.run_state(s) for s in specs]
  rows = [study_results.collect_run(s) for s in specs]
  study_lib.write_report(study, say=quiet)
  tables = {n: (study.docs_dir / n).read_text()
            for n in ('runs.csv', 'results.csv', 'results_table.md',
                      'grad_variance.csv')}
  calls = _faking_runner(study, monkeypatch)
  study_runner.Runner(study, 1, quiet).run(
      lambda: study_results.all_specs(study))
  assert not calls

  shutil.rmtree(study.output_dir)  # The new machine: no run folders.
  assert study_results.all_specs(study) == specs
  assert [study_runner.run_state(s) for s in specs] == states
  assert [study_results.collect_run(s) for s in specs] == rows
  runner = study_runner.Runner(study, 1, quiet)
  runner.run(lambda: study_results.all_specs(study))
  assert not calls
  assert {r['status'] for r in runner.results.values()} == {'skipped'}
  study_lib.write_report(study, say=quiet)
  for name, text in tables.items():
    assert (study.docs_dir / name).read_text() == text, name


def kept_run(data_dir, tmp_path):
  """A finished sweep run (eval loss 4.5), kept in the ledger."""
  study = study_lib.parse_study(study_values(data_dir, tmp_path))
  spec = study_config.sweep_specs(study)[0]
  fake_run(spec, 4.5)
  study_ledger.keep(spec.run_dir, spec.kept_dir)
  return spec


def test_the_ledger_holds_whole_copies_of_the_right_config(data_dir,
                                                           tmp_path):
  spec = kept_run(data_dir, tmp_path)
  shutil.rmtree(spec.run_dir)
  assert study_runner.run_state(spec) == 'done'
  assert study_runner.finished_dir(spec) == spec.kept_dir

  fake_run(spec, 4.0)  # Kept again: the new copy replaces the old, whole.
  (spec.run_dir / 'checkpoints').mkdir()
  study_ledger.keep(spec.run_dir, spec.kept_dir)
  assert sorted(p.name for p in spec.kept_dir.parent.iterdir()) == ['seed_0']
  assert sorted(p.name for p in spec.kept_dir.iterdir()) == [
      'config.yaml', 'metrics.jsonl', 'summary.json']
  assert json.loads((spec.kept_dir / 'summary.json').read_text())[
      'eval_loss'] == 4.0
  assert study_runner.finished_dir(spec) == spec.run_dir  # its own first

  shutil.rmtree(spec.run_dir)
  changed = to_dict(spec.config)
  changed['train']['steps'] += 1
  (spec.kept_dir / 'config.yaml').write_text(yaml.safe_dump(changed))
  assert study_runner.run_state(spec) == 'new'  # another config's run
  assert study_runner.finished_dir(spec) is None
  assert study_results.run_row(spec)['status'] == 'missing'


def test_a_clone_with_other_folders_keeps_the_ledgers_runs(data_dir,
                                                            tmp_path):
  spec = kept_run(data_dir, tmp_path)
  base = copy.deepcopy(BASE)
  base['data']['data_dir'] = str(tmp_path / 'elsewhere' / 'data')
  moved = study_lib.parse_study(study_values(
      data_dir, tmp_path, base=base, output_dir=str(tmp_path / 'other_runs')))
  spec2 = study_config.sweep_specs(moved)[0]
  assert spec2.kept_dir == spec.kept_dir and spec2.run_dir != spec.run_dir
  assert study_runner.run_state(spec2) == 'done'
  assert study_results.run_row(spec2)['eval_loss'] == 4.5


def test_the_page_names_the_runs_restored_without_curves(phased_report):
  study, _, _ = phased_report
  rows = [study_results.collect_run(s) for s in study_results.all_specs(study)]
  results = study_results.aggregate(rows, study)
  info = study_report.setting(study)
  page = study_page.results_page(study, results, info, [], None)
  assert 'restored' not in page
  restored = [{**r, 'restored_from': 'runs.csv of commit abc'}
              for r in rows if r['status'] == 'done'][:3]
  restored[0]['phase'] = 'long'
  page = study_page.results_page(study, results, info, [], None,
                                 restored=restored)
  assert ('3 finished runs (1 of them long) are restored from runs.csv of '
          'commit abc') in page


def test_runs_that_would_end_past_the_deadline_are_deferred(
    data_dir, tmp_path, monkeypatch):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  calls = _faking_runner(study, monkeypatch)
  seconds = {'sweep': 60.0, 'long': 600.0}
  runner = study_runner.Runner(study, 1, quiet, time.time() + 300,
                               lambda spec: seconds[spec.phase])
  runner.run(lambda: study_results.all_specs(study))
  # Every sweep fits (one run after another, each checked when it starts);
  # no long run does, and the plan goes on past them.
  assert calls == [s.label for s in study_config.sweep_specs(study)]
  deferred = {p for p, r in runner.results.items() if r['status'] == 'deferred'}
  assert deferred == {s.run_dir for s in study_results.all_specs(study)
                      if s.phase == 'long'} and len(deferred) == 8
  calls.clear()
  study_runner.Runner(study, 1, quiet, None,
                      lambda spec: seconds[spec.phase]).run(
                          lambda: study_results.all_specs(study))
  assert len(calls) == 8 + 2 and not calls[0].startswith('sweep')


def test_a_run_is_expected_to_take_its_phases_longest_finished_run(
    data_dir, tmp_path):
  study = study_lib.parse_study(phased_values(data_dir, tmp_path))
  sweep = study_config.spec(study, 'sweep', 'scale', 1e-3, 0)  # 4 steps
  long = study_config.spec(study, 'long', 'scale', 1e-3, 0)    # 8 steps
  rows = [{'phase': 'sweep', 'status': 'done', 'wall_s': 30.0, 'steps': 4},
          {'phase': 'sweep', 'status': 'done', 'wall_s': 45.0, 'steps': 3},
          {'phase': 'sweep', 'status': 'diverged', 'wall_s': None,
           'steps': None},
          {'phase': 'long', 'status': 'missing', 'wall_s': None,
           'steps': None}]
  assert study_results.expected_seconds(sweep, rows) == 45.0
  # No long run has finished: the slowest step (15 s, a resumed run's
  # part) times its 8 steps.
  assert study_results.expected_seconds(long, rows) == 120.0
  rows.append({'phase': 'long', 'status': 'done', 'wall_s': 70.0, 'steps': 8})
  assert study_results.expected_seconds(long, rows) == 70.0
  assert study_results.expected_seconds(long, rows[2:4]) is None


def test_a_deferred_run_ends_the_call_with_status_3(data_dir, tmp_path,
                                                    monkeypatch):
  study, _ = write_phased_study(data_dir, tmp_path)
  last = study_results.all_specs(study)[-1]  # a finalist's seed
  shutil.rmtree(last.run_dir)
  calls = _faking_runner(study, monkeypatch)
  path = tmp_path / 'study.yaml'
  path.write_text(yaml.safe_dump(phased_values(data_dir, tmp_path)))
  assert study_lib.main(['--config', str(path), '--hours', '1e-6']) == 3
  assert not calls
  assert study_lib.main(['--config', str(path)]) == 0
  assert calls == [last.label]


def _stop_during_set_up(event, queue):
  """In a spawned worker: the stop comes while a run is being set up (before
  the trainer installs its handler); reports what each handler caught."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  study_runner._worker_init(event)  # pylint: disable=protected-access
  event.set()
  time.sleep(0.3)  # The set-up: the first SIGTERM lands in the worker's handler.
  trainer_caught = []
  signal.signal(signal.SIGTERM, lambda signum, frame: trainer_caught.append(
      signal.Signals(signum).name))
  deadline = time.time() + 10
  while not trainer_caught and time.time() < deadline:
    time.sleep(0.05)
  queue.put((list(study_runner._STOP_REQUESTED), trainer_caught[:1]))  # pylint: disable=protected-access


def test_the_stop_event_reaches_a_worker_even_while_a_run_is_set_up():
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context('spawn')
  event, queue = ctx.Event(), ctx.Queue()
  worker = ctx.Process(target=_stop_during_set_up, args=(event, queue))
  worker.start()
  try:
    requested, trainer_caught = queue.get(timeout=120)
  finally:
    worker.kill()
    worker.join()
  assert requested[0] == 'SIGTERM'  # Between runs: the worker's flag.
  assert trainer_caught == ['SIGTERM']  # And again for the trainer's handler.


@pytest.mark.parametrize('name', ['study', 'study_quick'])
def test_shipped_study_configs(name):
  study = study_lib.load_study(REPO / 'configs' / f'{name}.yaml')
  for rates in study.optimizers.values():
    assert 2 <= len(rates) <= 5
  assert {'scale', 'adamw'} <= set(study.finalists_always)
  assert study.finalist_seeds
  if name == 'study':
    assert str(study.docs_dir) == 'docs'
    assert {'adamw', 'sgd', 'sgd_column_norm', 'scale', 'muon',
            'scale_first_last'} <= set(study.optimizers)
    assert {'sgd_row_norm', 'scale_row_norm'} & set(study.optimizers)
    assert 'sgd_column_norm' in study.diagnostics_optimizers


def test_the_study_is_the_papers_table_at_20_tokens_per_parameter():
  from train.model import param_count
  study = study_lib.load_study(REPO / 'configs' / 'study.yaml')
  assert set(study_paper.TABLE) | set(study_paper.ABLATIONS) <= set(
      study.optimizers)
  assert study.phases == ('sweep', 'long') and study.long_neighbours == 1
  for name in study.optimizers:
    sweep = study_config.run_config(study, 'sweep', name, 1e-3, 0)
    long = study_config.run_config(study, 'long', name, 1e-3, 0)
    tokens = long.train.steps * long.data.batch_size * long.data.seq_len
    assert tokens >= 20 * param_count(long.model)
    assert sweep.train.steps < long.train.steps
    assert long.optimizer.grad_clip is None
    assert (long.optimizer.warmup_ratio, long.optimizer.min_lr_ratio) == (
        0.1, 0.1)
    assert long.data.name == 'python_source'
    if name.startswith('scale') or name.startswith('sgd_'):
      assert (long.optimizer.vector_learning_rate,
              long.optimizer.vector_adam) == (2e-2, 'authors')
  assert len(study.seeds) + len(study.finalist_seeds) == 2


def test_gpu_study_is_a_20_to_60m_model_on_python_source():
  from train.model import param_count
  study = study_lib.load_study(REPO / 'configs' / 'study_gpu.yaml')
  assert set(study.optimizers) == set(study_paper.TABLE)
  config = study_config.run_config(study, 'long', 'scale', 1e-3, 0)
  assert 20e6 <= param_count(config.model) <= 60e6
  assert config.data.name == 'python_source'
  assert config.optimizer.grad_clip is None
  # Every optimizer on scanned layers (the rivals vmapped over the layer axis
  # with shared step counts: train.optim.per_layer).
  assert all(study_config.run_config(study, 'long', n, 1e-3, 0
                                     ).model.scan_layers
             for n in study.optimizers)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(study_paper.TABLE))
def test_gpu_study_run_trains_two_steps_on_cpu(name, data_dir, tmp_path):
  from train.config import build_config
  study = study_lib.load_study(REPO / 'configs' / 'study_gpu.yaml')
  lr = study.optimizers[name][0]
  values = to_dict(study_config.run_config(study, 'sweep', name, lr, 0))
  values['train'].update(steps=2, eval_every=2, checkpoint_every=2,
                         eval_tokens=1024, run_dir=str(tmp_path / name))
  values['data'].update(batch_size=4, data_dir=data_dir)
  summary = train(build_config(values), resume=False)
  assert summary['steps'] == 2 and math.isfinite(summary['eval_loss'])


def test_the_variance_table_gives_each_column_its_own_steps():
  # A sweep run (2 diagnostic steps, to 560) beside a long run (3, to 4480):
  # each column's header names its own steps, and each mean is over them.
  vrows = [{'optimizer': name, 'learning_rate': lr, 'seed': 0, 'step': step,
            'tokens': None, 'group': group, 'grad_var': value, 'grad_sq': None}
           for name, lr, steps in (('sgd_column_norm', 1e-3, (56, 560)),
                                   ('scale', 3e-3, (56, 2240, 4480)))
           for step in steps
           for group, value in (('embed', 1.0 + step / 560), ('lm_head', 2.0))]
  table = study_report.variance_markdown(vrows)
  assert ('| param group | sgd_column_norm (lr 0.001, seed 0, 2 steps: 56 to '
          '560) | scale (lr 0.003, seed 0, 3 steps: 56 to 4480) |') in table
  assert '| embed | 1.55 (2) | 5.03 (1) |' in table
  assert '| lm_head | 2 (1) | 2 (2) |' in table


# --------------------------------------------------------------------------
# The gradient-variance diagnostic.


def _train_records(data_dir, run_dir, every):
  config = load_config(None, SMALL + [
      f'data.data_dir={data_dir}', f'train.run_dir={run_dir}',
      'optimizer.name=sgd_column_norm', 'optimizer.learning_rate=3e-3',
      'train.steps=6', 'train.eval_every=6', 'train.checkpoint_every=6',
      'train.log_every=1', f'train.diagnostics_every={every}',
      'train.diagnostics_microbatches=4'])
  summary = train(config, resume=False)
  lines = (pathlib.Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
  return summary, [json.loads(l) for l in lines]


@pytest.mark.slow
def test_diagnostics_log_records_and_leave_training_unchanged(data_dir,
                                                              tmp_path):
  s_off, off = _train_records(data_dir, tmp_path / 'off', 0)
  s_on, on = _train_records(data_dir, tmp_path / 'on', 2)
  loss = lambda recs: [(r['step'], r['loss'], r['grad_norm']) for r in recs
                       if r['kind'] == 'train']
  assert loss(on) == loss(off)  # Bit for bit.
  assert s_on['eval_loss'] == s_off['eval_loss']
  assert not [r for r in off if r['kind'] == 'diagnostics']
  diag = [r for r in on if r['kind'] == 'diagnostics']
  assert [r['step'] for r in diag] == [2, 4, 6]
  assert [r['tokens'] for r in diag] == [8 * 32 * s for s in (1, 3, 5)]
  groups = ['embed', 'layer_0', 'layer_1', 'final_norm', 'lm_head']
  for r in diag:
    for g in groups:
      assert r[f'grad_var/{g}'] > 0 and math.isfinite(r[f'grad_var/{g}'])
      assert r[f'grad_sq/{g}'] > 0 and math.isfinite(r[f'grad_sq/{g}'])
  assert set(diag[0]) == {'kind', 'step', 'tokens'} | {
      f'{k}/{g}' for k in ('grad_var', 'grad_sq') for g in groups}


@pytest.mark.slow  # Diagnostics of the study only; 15 s.
def test_gradient_variance_matches_a_direct_computation(data_dir):
  from train import mesh as mesh_lib
  from train.diagnostics import gradient_variance, param_group
  from train.model import loss_fn
  from train.optim import make_optimizer
  from train.state import make_setup
  import scale_optax

  config = load_config(None, SMALL + [f'data.data_dir={data_dir}'])
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.optimizer, 10)
  setup = make_setup(config, mesh, tx, schedule)
  params = setup.init_params(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, size=(8, 33))
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
           'targets': jnp.asarray(tokens[:, 1:], jnp.int32)}
  k, m = 4, 2
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, b: gradient_variance(setup, p, b, k))(
        params, batch)
    grad = jax.jit(jax.grad(lambda p, mb: loss_fn(setup.merge(p), mb)[0]))
    grads = [grad(params, jax.tree.map(lambda x, i=i: x[i * m:(i + 1) * m],
                                       batch)) for i in range(k)]
  stacked = jax.tree.map(lambda *g: np.stack(g), *grads)
  want_var, want_sq, count = {}, {}, {}
  for path, g in jax.tree_util.tree_leaves_with_path(stacked):
    group = param_group(scale_optax.path_str(path))
    want_var[group] = want_var.get(group, 0.0) + (
        m * np.var(g, axis=0, ddof=1)).sum()
    want_sq[group] = want_sq.get(group, 0.0) + (g.mean(0) ** 2).sum()
    count[group] = count.get(group, 0) + g[0].size
  assert set(got) == {f'{k}/{g}' for k in ('grad_var', 'grad_sq')
                      for g in count}
  for group in count:
    np.testing.assert_allclose(got[f'grad_var/{group}'],
                               want_var[group] / count[group], rtol=1e-4)
    np.testing.assert_allclose(got[f'grad_sq/{group}'],
                               want_sq[group] / count[group], rtol=1e-4)


def test_diagnostics_config_is_validated():
  from train.config import ConfigError
  with pytest.raises(ConfigError, match='train.diagnostics_every'):
    load_config(None, ['train.diagnostics_every=-1'])
  with pytest.raises(ConfigError, match='train.diagnostics_microbatches'):
    load_config(None, ['train.diagnostics_every=5', 'data.batch_size=16',
                       'train.diagnostics_microbatches=3'])
  with pytest.raises(ConfigError, match='train.diagnostics_microbatches'):
    load_config(None, ['train.diagnostics_every=5',
                       'train.diagnostics_microbatches=1'])


@pytest.mark.slow
def test_quick_study_end_to_end_in_two_processes(tmp_path):
  values = yaml.safe_load((REPO / 'configs' / 'study_quick.yaml').read_text())
  values.update(output_dir=str(tmp_path / 'runs'),
                docs_dir=str(tmp_path / 'docs'))
  values['base']['data']['data_dir'] = str(tmp_path / 'data')
  study = study_lib.parse_study(values)
  out = study_lib.run_study(study, jobs=2, say=quiet)
  assert out['errors'] == 0
  # 3 optimizers x 2 rates, each one's best rate long, 2 finalists' seeds.
  assert len(out['results']) == 6 + 3 + 2
  assert {r['status'] for r in out['results'].values()} == {'done'}
  for name in ('loss_vs_tokens', 'ppl_vs_memory', 'lr_sensitivity',
               'grad_variance'):
    assert (tmp_path / 'docs' / f'{name}.png').stat().st_size > 10_000
