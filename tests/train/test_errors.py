"""The error contract (``train/errors.py``): every class of user mistake ends
the command with its exit code (2 config, 1 run) and exactly one line on
stderr naming the culprit, without a traceback; a bug keeps its traceback.

The entry points' ``main`` runs in this process (fast); one subprocess proves
the guarantee end to end, through ``python -m train``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys

import pytest

import harness
import train
from train import errors, export, loop, study
from train.__main__ import main as train_main


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return harness.shared_data_dir(tmp_path_factory)


def call(capsys, main, args) -> tuple[int, list[str]]:
  """(exit code, the lines on stderr) of ``main(args)``."""
  capsys.readouterr()
  code = main([str(a) for a in args])
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  return code, err.splitlines()


def small(tmp_path, data_dir, *args):
  return harness.small_args(tmp_path / 'run', data_dir, *args)


def test_every_error_class_of_the_trainer_has_one_of_the_two_bases():
  found = {}
  for module in pkgutil.walk_packages(train.__path__, 'train.'):
    for name, cls in inspect.getmembers(importlib.import_module(module.name),
                                        inspect.isclass):
      if issubclass(cls, Exception) and cls.__module__ == module.name:
        found[f'{module.name}.{name}'] = cls
  assert {'train.config.ConfigError', 'train.study.config.StudyConfigError',
          'train.checkpoint.CheckpointError', 'train.loop.TrainingError',
          'train.hf_llama.HFFormatError', 'train.export.ExportError',
          'train.data.errors.TokenizerError',
          'train.data.errors.FeatureNotFoundError',
          'train.data.errors.SplitNotFoundError'} <= set(found)
  bad = [name for name, cls in found.items() if cls not in (
      errors.UsageError, errors.RunError) and not issubclass(
          cls, (errors.UsageError, errors.RunError))]
  assert not bad, bad


@pytest.mark.parametrize('args, line', [
    (['model.d_modle=64'], 'config error: model.d_modle: unknown key (known: '),
    (['model.n_layers=two'],
     "config error: model.n_layers: expected int, got 'two' (str)."),
    (['--config', '/nonexistent/x.yaml'],
     'config error: config file /nonexistent/x.yaml: No such file or '
     'directory.'),
    (['mesh.data=3'],
     'config error: mesh: the fixed axis sizes (product 3) do not divide '),
    (['--dry-run', 'mesh.data=3'],  # Found by the dry run's own mesh.
     'config error: mesh: the fixed axis sizes (product 3) do not divide '),
], ids=['bad_key', 'bad_type', 'bad_config_path', 'mesh', 'dry_run'])
def test_config_mistakes_exit_2_with_one_line(capsys, args, line):
  code, err = call(capsys, train_main, args)  # Found before any file is made.
  assert code == 2
  assert len(err) == 1 and err[0].startswith(line), err


@pytest.mark.parametrize('args, line', [
    (['data.text_key=content'],
     "error: data.text_key='content' is not a feature of data set "
     "'embedded'"),
    (['data.eval_split=test'], "error: Split 'test' not found in data set "),
    (['data.batch_size=4096', 'data.seq_len=512', 'model.max_seq_len=512'],
     "error: Split 'train' has "),
    (['data.name=c4/en', 'data.tokenizer=x.model',
      'data.data_dir={tmp}/missing'],
     "error: TFDS data set 'c4/en' is not prepared under data_dir="),
    (['data.tokenizer={tmp}/missing.model'],
     "error: SentencePiece model file '{tmp}/missing.model' not found"),
    (['data.tokenizer={tmp}/garbage.model'],
     "error: SentencePiece model file '{tmp}/garbage.model' does not load"),
    (['data.data_dir=/dev/null/data'],
     "error: [Errno 20] Not a directory: '/dev/null/data'"),
    (['train.run_dir=/dev/null/run'],
     "error: [Errno 20] Not a directory: '/dev/null/run"),
], ids=['text_key', 'missing_split', 'split_too_small', 'not_prepared',
        'missing_tokenizer', 'bad_tokenizer', 'bad_data_dir', 'bad_run_dir'])
def test_run_errors_exit_1_with_one_line(tmp_path, data_dir, capsys, args,
                                        line):
  (tmp_path / 'garbage.model').write_bytes(b'\x00not a sentencepiece model\xff')
  args = [a.format(tmp=tmp_path) for a in args]
  code, err = call(capsys, train_main, small(tmp_path, data_dir, *args))
  assert code == 1
  assert len(err) == 1 and err[0].startswith(line.format(tmp=tmp_path)), err


def _run_dir_with_corrupt_checkpoint(tmp_path, data_dir):
  """A run directory whose only checkpoint fails its integrity manifest."""
  from train.config import load_config, to_dict  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'
  step = run_dir / 'checkpoints' / '3'
  (step / 'state').mkdir(parents=True)
  (step / 'state' / 'array').write_bytes(b'12345')
  (step / 'integrity.json').write_text(json.dumps({
      'version': 1, 'algorithm': 'sha256',
      'files': {'state/array': {'size': 9, 'sha256': '0' * 64}}}))
  config = load_config(None, small(tmp_path, data_dir))
  (run_dir / 'config.yaml').write_text(yaml.safe_dump(to_dict(config)))
  return run_dir


def test_corrupt_checkpoint_exits_1_with_one_line(tmp_path, data_dir, capsys):
  run_dir = _run_dir_with_corrupt_checkpoint(tmp_path, data_dir)
  code, err = call(capsys, export.main, ['--run-dir', run_dir,
                                         '--out', tmp_path / 'hf'])
  assert code == 1
  assert err == [f'error: checkpoint {run_dir}/checkpoints/3 is corrupt: '
                 f'state/array: 5 bytes, expected 9 (truncated or '
                 f'rewritten).'], err
  assert not (tmp_path / 'hf').exists()


def test_study_usage_mistake_exits_2_with_one_line(tmp_path, capsys):
  code, err = call(capsys, study.main, ['--quick', '--config', 'x.yaml'])
  assert code == 2
  assert err == ['config error: give either --quick or --config']


def test_a_multi_line_message_is_reported_on_one_line(capsys):
  @errors.cli
  def main(_):
    raise loop.TrainingError('first\n  second\n')

  assert call(capsys, main, []) == (1, ['error: first / second'])


def test_a_bug_propagates_with_its_traceback(tmp_path, data_dir, monkeypatch):
  def broken(config, resume):
    del config, resume
    raise TypeError('a bug')

  monkeypatch.setattr(loop, 'train', broken)
  with pytest.raises(TypeError, match='a bug'):
    train_main(small(tmp_path, data_dir))


def test_no_traceback_through_python_m_train(tmp_path, data_dir):
  """End to end, config errors and a run error: the child's whole stderr is
  the one line."""
  res = harness.run_train(['optimizer.lernin_rate=1'])
  assert res.rc == 2
  assert res.stderr.strip().splitlines() == [
      'config error: optimizer.lernin_rate: unknown key (known: b1, b2, eps, '
      'grad_clip, learning_rate, min_lr_ratio, momentum, name, '
      'vector_adam, vector_learning_rate, warmup_ratio, weight_decay).']
  bad_yaml = tmp_path / 'bad.yaml'
  bad_yaml.write_text('model:\n  d_model: [64\n')
  res = harness.run_train(['--config', bad_yaml])
  assert res.rc == 2
  assert res.stderr.splitlines() == [
      f'config error: config file {bad_yaml} does not parse: expected \',\' '
      f'or \']\', but got \'<stream end>\' at line 3, column 1 (while '
      f'parsing a flow sequence)']
  res = harness.run_train(small(tmp_path, data_dir, 'data.text_key=content'))
  assert res.rc == 1
  assert res.stderr.splitlines() == [
      f"error: data.text_key='content' is not a feature of data set "
      f"'embedded' (embedded_text/1.0.0 under {data_dir}); it has ['text']."]


@pytest.mark.parametrize('argv0, expected', [
    ('/venv/bin/scale-train', 'scale-train'),
    ('/repo/train/__main__.py', 'python -m train.export'),
    ('-c', 'python -m train.export'),
])
def test_usage_names_the_command_as_it_was_started(monkeypatch, argv0,
                                                   expected):
  monkeypatch.setattr(sys, 'argv', [argv0])
  assert errors.prog('train.export') == expected
