"""Smoke test of benchmarks.loop_overhead on micro shapes."""

import json

import pytest

from benchmarks import loop_overhead

MICRO = ['model.vocab_size=512', 'model.d_model=32', 'model.n_layers=1',
         'model.n_heads=2', 'model.d_ff=64', 'data.seq_len=16']


@pytest.mark.slow
@pytest.mark.parametrize('clock', ['wall', 'cpu'])
def test_main_reports_loop_and_bare_tokens_per_s(tmp_path, capsys, clock):
  argv = ['--steps', '6', '--repeats', '1', '--clock', clock,
          '--override', f'data.data_dir={tmp_path / "data"}']
  for o in MICRO:
    argv += ['--override', o]
  assert loop_overhead.main(argv) == 0
  out = capsys.readouterr().out
  assert 'batch 4 x 16' in out and 'target: ratio >= 0.97' in out
  result = json.loads(out.strip().splitlines()[-1])
  (round_,) = result['rounds']
  assert round_['loop'] > 0 and round_['bare'] > 0
  assert result['loop_over_bare'] == round_['loop'] / round_['bare']
