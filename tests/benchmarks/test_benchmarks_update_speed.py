"""Smoke tests of benchmarks.update_speed."""

from benchmarks import update_speed

MICRO = ['model.vocab_size=256', 'model.d_model=32', 'model.n_layers=1',
         'model.n_heads=2', 'model.d_ff=64', 'data.seq_len=16']


def _argv(optimizers, *extra):
  argv = ['--configs', 'tiny', '--optimizers', optimizers,
          '--repeats', '2', '--min-repeats', '1', *extra]
  for o in MICRO:
    argv += ['--override', o]
  return argv


def test_floor_bytes_definition():
  args = update_speed.parse_args(_argv('scale,adamw,sgd'))
  out = update_speed.run_config(args, 'tiny')
  assert {c.name for c in out['cases']} == {'scale', 'adamw', 'sgd'}
  for case in out['cases']:
    p, s = case.param_bytes, case.state_bytes
    assert case.floor_bytes == 3 * p + 2 * s  # G in, P in and out, S in and out
    assert len(case.times) == 2
    if case.name == 'adamw':
      assert s == 2 * p + 8                   # mu, nu; two int32 counters
    if case.name == 'sgd':
      assert s == 4                           # the schedule's counter


def test_main_runs_on_tiny_shapes(capsys):
  assert update_speed.main(_argv('scale', '--mode', 'update')) == 0
  out = capsys.readouterr().out
  assert 'time / floor' in out and 'mode update' in out
  assert 'target tiny: SCALE within 2.0x of the bytes floor' in out
