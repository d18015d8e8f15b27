"""Smoke test of benchmarks.throughput on a tiny model."""

import pytest

from benchmarks import throughput

MICRO = ['model.vocab_size=256', 'model.d_model=32', 'model.n_layers=1',
         'model.n_heads=2', 'model.d_ff=64']


@pytest.mark.slow
def test_main_runs_on_tiny_shapes(capsys):
  argv = ['--configs', 'tiny', '--optimizers', 'scale,sgd',
          '--repeats', '2', '--min-repeats', '1', '--batch-size', '2',
          '--seq-len', '16']
  for o in MICRO:
    argv += ['--override', o]
  assert throughput.main(argv) == 0
  out = capsys.readouterr().out
  assert '2 x 16 = 32 tokens a step' in out
  assert "target tiny: SCALE within 3% of plain SGD's tokens/s" in out
