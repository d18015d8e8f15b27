"""Gradient accumulation (``train.grad_accum_steps``) equals the one-batch step.

Five SCALE steps of a small float32 LLaMA on the same global batches with
``k = 1`` and ``k = 4`` micro-batches (one device, in process), and with
``k = 1`` and ``k = 2`` on 8 simulated devices (mesh fsdp=8, a subprocess):
the losses and the final parameters agree to 1e-5 relative. Bad values of
``k`` are config errors naming the key.
"""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

import harness
from train import mesh as mesh_lib
from train.config import ConfigError, load_config
from train.dry_run import dry_run, format_report
from train.optim import make_optimizer
from train.prefetch import global_batch
from train.state import make_setup
from train.step import make_train_step

SMALL = ['model.d_model=64', 'model.n_layers=2', 'model.d_ff=176',
         'model.vocab_size=512', 'data.seq_len=32', 'data.batch_size=16',
         'optimizer.warmup_ratio=0']
STEPS = 5
RTOL = 1e-5


def _five_steps(overrides: list[str]) -> tuple[list[float], dict]:
  """Losses of five steps on one random batch, and the final params."""
  config = load_config('configs/tiny.yaml', overrides)
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  setup = make_setup(config, mesh, tx, schedule)
  step = make_train_step(setup)
  params = setup.init_params(0)
  opt_state = setup.init_opt_state(params)
  tokens = np.random.default_rng(0).integers(3, 512, (16, 33), dtype=np.int32)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(STEPS):
      batch = global_batch(setup, {'inputs': tokens[:, :-1],
                                   'targets': tokens[:, 1:]})
      params, opt_state, metrics = step(params, opt_state, batch)
      losses.append(float(metrics['loss']))
      assert int(metrics['skipped']) == 0
      assert float(metrics['tokens']) == 16 * 32
  return losses, jax.tree.map(np.asarray, params)


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]),
                          jax.tree.leaves(want[1])):
    scale = np.abs(w).max()
    np.testing.assert_allclose(g, w, rtol=0, atol=RTOL * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_four_micro_batches_equal_one_batch():
  one = _five_steps(SMALL)
  four = _five_steps([*SMALL, 'train.grad_accum_steps=4'])
  assert one[0][-1] < one[0][0] - 0.1  # It learns: not a vacuous match.
  _assert_close(four, one)


_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import jax
    import numpy as np
    sys.path.insert(0, 'tests/train')
    import test_grad_accum as t
    assert jax.device_count() == 8, jax.devices()
    mesh = ['mesh.fsdp=8']
    one = t._five_steps([*t.SMALL, *mesh])
    two = t._five_steps([*t.SMALL, *mesh, 'train.grad_accum_steps=2'])
    t._assert_close(two, one)
    print(json.dumps({'losses': two[0]}))
''')


@pytest.mark.slow  # Four compiles on 8 simulated devices in a subprocess.
def test_micro_batches_on_a_sharded_mesh_equal_one_batch():
  out = harness.last_json_line(harness.run_python(_SCRIPT,
                                                  devices=8).check())
  assert len(out['losses']) == STEPS


@pytest.mark.parametrize('overrides, message', [
    (['train.grad_accum_steps=0'], 'train.grad_accum_steps: must be positive'),
    (['train.grad_accum_steps=3'], 'train.grad_accum_steps: must divide '
     'data.batch_size=16'),
])
def test_bad_grad_accum_steps_are_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config('configs/tiny.yaml', [*SMALL, *overrides])


@pytest.mark.slow
def test_dry_run_reports_the_smaller_temporaries_of_micro_batches():
  """Activations of a quarter of the batch at a time: well under the k=1
  step's temporaries (which a 64-row batch of this model dominates)."""
  big = [*SMALL, 'data.batch_size=64', 'data.seq_len=128']
  one = dry_run(load_config('configs/tiny.yaml', big))
  config = load_config('configs/tiny.yaml', [*big, 'train.grad_accum_steps=4'])
  four = dry_run(config)
  assert four['temp_bytes'] < 0.5 * one['temp_bytes'], (four, one)
  assert 'batch 64 x 128 as 4 micro-batches of 16' in format_report(config,
                                                                     four)
