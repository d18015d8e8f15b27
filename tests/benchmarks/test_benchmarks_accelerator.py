"""benchmarks.accelerator: its smoke mode end to end, and an import graph the
GPU machine can load (no grain, no TensorFlow Datasets)."""

import subprocess
import sys

import pytest

from benchmarks import accelerator

BLOCKED = ('grain', 'tensorflow_datasets', 'tensorflow', 'sentencepiece')


def test_imports_without_data_packages():
  blocker = ''.join(f'sys.modules[{m!r}] = None; ' for m in BLOCKED)
  code = ('import sys; ' + blocker +
          'import benchmarks.accelerator, benchmarks.common, train.step, '
          'train.state, train.perf, train.optim, train.model')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path, capsys):
  out = tmp_path / 'gpu.md'
  assert accelerator.main(['--smoke', '--optimizers', 'scale', '--steps', '2',
                           '--warmup', '1', '--out', str(out)]) == 0
  text = out.read_text()
  assert 'Command: `python -m benchmarks.accelerator --smoke' in text
  row = [line for line in text.splitlines()
         if line.startswith('| llama_60m | scale |')]
  assert len(row) == 1 and '4 x 32' in row[0] and 'error' not in row[0], text
  assert '| llama_60m | scale | 4 x 32 |' in capsys.readouterr().out


def test_failed_rows_are_listed():
  text = accelerator.document(
      [{'model': 'llama_350m', 'optimizer': 'muon', 'error': 'timed out'}],
      'cmd', 1.0, complete=False)
  assert '| llama_350m | muon | | timed out |' in text
  assert 'INCOMPLETE' in text
