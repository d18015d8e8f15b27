"""The study runner (train/study/) and the gradient-variance diagnostic."""

import copy
import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from train import study as study_lib
from train.config import load_config, to_dict
from train.loop import train

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

  # Second call: both runs are finished and skipped, nothing retrained.
  before = mtimes(tmp_path / 'runs')
  out = study_lib.run_study(study, say=quiet)
  assert {r['status'] for r in out['results'].values()} == {'skipped'}
  assert mtimes(tmp_path / 'runs') == before

  # A half-finished run (no summary, checkpoint kept) resumes, not restarts.
  scale_dir = tmp_path / 'runs' / 'scale' / 'lr_0.003' / 'seed_0'
  (scale_dir / 'summary.json').unlink()
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
  spec = study_lib.sweep_specs(study)[0]
  d = spec.run_dir
  assert study_lib.run_state(spec) == 'new'
  d.mkdir(parents=True)
  (d / 'config.yaml').write_text(yaml.safe_dump(to_dict(spec.config)))
  assert study_lib.run_state(spec) == 'partial'
  summary = {'steps': 4, 'eval_loss': 5.0, 'stopped_by': None}
  (d / 'summary.json').write_text(json.dumps(summary))
  assert study_lib.run_state(spec) == 'done'
  (d / 'summary.json').write_text(json.dumps({**summary, 'steps': 3}))
  assert study_lib.run_state(spec) == 'partial'  # Stopped early: resume.
  (d / 'failed.json').write_text(json.dumps({'status': 'diverged'}))
  assert study_lib.run_state(spec) == 'diverged'
  changed = to_dict(spec.config)
  changed['train']['steps'] = 5
  (d / 'config.yaml').write_text(yaml.safe_dump(changed))
  assert study_lib.run_state(spec) == 'new'  # Another config: start over.


def test_a_key_added_to_the_trainer_later_keeps_runs_valid(data_dir,
                                                          tmp_path):
  study = study_lib.parse_study(study_values(data_dir, tmp_path))
  spec = study_lib.sweep_specs(study)[0]  # scale, with diagnostics on.
  assert spec.config.train.diagnostics_microbatches == 2  # Not the default.
  saved = to_dict(spec.config)
  del saved['train']['max_consecutive_skips']  # At its default: matches.
  saved['train']['a_removed_key'] = 1  # Unknown to the trainer: ignored.
  assert study_lib.config_matches(saved, spec.config)
  del saved['train']['diagnostics_microbatches']  # Default 4 != 2.
  assert not study_lib.config_matches(saved, spec.config)
  assert not study_lib.config_matches(None, spec.config)


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
  assert study_lib.best_learning_rates(rows, study) == {
      'scale': 3e-3, 'adamw': 1e-3, 'sgd': 0.1, 'muon': 0.02}
  assert study_lib.select_finalists(rows, study) == ['scale', 'muon']
  specs = study_lib.finalist_specs(study, rows)
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
    'diagnostics unknown key': (
        lambda v: {**v, 'diagnostics': {'every': 2, 'often': True}},
        'diagnostics.often'),
    'diagnostics microbatches': (
        lambda v: {**v, 'diagnostics': {'optimizers': ['scale'],
                                        'microbatches': 3}},
        'diagnostics.microbatches'),
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
  assert len(out['results']) == 8
  assert {r['status'] for r in out['results'].values()} == {'done'}
  for name in ('loss_vs_tokens', 'ppl_vs_memory', 'lr_sensitivity',
               'grad_variance'):
    assert (tmp_path / 'docs' / f'{name}.png').stat().st_size > 10_000
