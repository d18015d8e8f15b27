"""model.param_dtype: float32 (mixed precision) or bfloat16 (pure bf16)."""

import jax
import jax.numpy as jnp
import numpy as np

from train import mesh as mesh_lib
from train.config import load_config
from train.dry_run import dry_run
from train.model import param_count
from train.optim import make_optimizer
from train.state import make_setup
from train.step import make_train_step

# llama_60m's recipe (authors' 1-D Adam, no clipping) on a tiny shape.
TINY = ['model.vocab_size=64', 'model.d_model=16', 'model.n_layers=2',
        'model.n_heads=2', 'model.d_ff=24', 'data.batch_size=4',
        'data.seq_len=8', 'mesh.fsdp=1', 'train.steps=10']


def _config(param_dtype):
  return load_config('configs/llama_60m.yaml',
                     TINY + [f'model.param_dtype={param_dtype}'])


def _floating(tree):
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]


def _setup(param_dtype):
  config = _config(param_dtype)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  return make_setup(config, mesh_lib.make_mesh(config.mesh), tx, schedule)


def test_mixed_precision_stores_float32():
  setup = _setup('float32')
  params = setup.init_params(0)
  floats = _floating(params) + _floating(setup.init_opt_state(params))
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert setup.config.model.dtype == 'bfloat16'  # bf16 compute


def test_a_pure_bf16_step_keeps_every_leaf_bf16_and_finite():
  setup = _setup('bfloat16')
  params = setup.init_params(0)
  opt_state = setup.init_opt_state(params)
  start = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 64, size=(4, 9)).astype(np.int32)
  weights = np.ones((4, 8), np.float32)
  weights[0, 5:] = 0  # a padded row
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'weights': weights}
  train_step = make_train_step(setup)
  with jax.set_mesh(setup.mesh):
    for _ in range(3):  # step 1 has rate 0; steps 2-3 move the weights
      params, opt_state, metrics = train_step(params, opt_state, batch)
      assert int(metrics['skipped']) == 0
      assert int(metrics['tokens']) == 4 * 8 - 3
  floats = _floating(params) + _floating(opt_state)
  assert len(_floating(opt_state)) == 1 + 2 * 5  # LM-head EMA, Adam m and v
  for x in floats:
    assert x.dtype == jnp.bfloat16, x.dtype
    assert bool(jnp.isfinite(x).all())
  moved = [np.abs(np.asarray(x, np.float32) - s).max()
           for x, s in zip(jax.tree.leaves(params), start)]
  assert min(moved) > 0


def test_dry_run_reports_the_bf16_bytes():
  """Half of mixed precision's 4 bytes a value, but for 4 int32 counters."""
  config = _config('bfloat16')
  report = dry_run(config)
  d, v, n_layers = 16, 64, 2
  assert report['param_bytes'] == 2 * param_count(config.model)
  vector_params = (2 * n_layers + 1) * d  # RMSNorm scales
  # LM-head EMA, Adam's m and v; counters of the EMA, Adam and 2 schedules.
  assert report['opt_state_bytes'] == 2 * (d * v + 2 * vector_params) + 4 * 4
