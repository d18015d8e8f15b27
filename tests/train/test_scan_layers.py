"""Scanned layers (``model.scan_layers``): the same model, loss and optimizer
steps as the unrolled layout, the layer axis unsharded, and checkpoints of one
layout refused by the other."""

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from train import checkpoint as ckpt_lib
from train import mesh as mesh_lib
from train import model as model_lib
from train.config import ConfigError, load_config
from train.optim import make_optimizer
from train.state import make_setup
from train.step import make_train_step

MODEL = ('model.vocab_size=64', 'model.d_model=32', 'model.n_layers=3',
         'model.n_heads=2', 'model.d_ff=48', 'model.max_seq_len=16',
         'data.seq_len=16', 'data.batch_size=4', 'train.steps=10',
         'optimizer.warmup_ratio=0.0', 'optimizer.learning_rate=0.01',
         'optimizer.weight_decay=0.1')


def _config(scan: bool, *overrides: str):
  return load_config(None, MODEL + (f'model.scan_layers={str(scan).lower()}',)
                     + overrides)


def _setup(config):
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                config.rivals,
                                scan_layers=config.model.scan_layers)
  return make_setup(config, mesh, tx, schedule)


def _batches(n: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (n, 4, 17), dtype=np.int32)
  return [{'inputs': t[:, :-1], 'targets': t[:, 1:]} for t in tokens]


def _close(a, b, rtol=1e-5, atol=1e-6):
  chex_tree = jax.tree.map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                              rtol=rtol, atol=atol), a, b)
  del chex_tree


def test_stack_unstack_round_trip_and_paths():
  setup = _setup(_config(False))
  params = setup.init_params(0)
  stacked = model_lib.stack_layers(params)
  scanned = _setup(_config(True))
  assert (jax.tree.structure(stacked)
          == jax.tree.structure(scanned.abstract_params))
  assert stacked['layers']['attn']['q_proj']['kernel'].shape == (3, 32, 32)
  assert stacked['layers']['mlp_norm']['scale'].shape == (3, 32)
  _close(model_lib.unstack_layers(stacked), params, rtol=0, atol=0)


def test_layer_axes():
  assert model_lib.layer_axes('layers/attn/q_proj/kernel') == 1
  assert model_lib.layer_axes('layers/2/attn/q_proj/kernel') == 0
  assert model_lib.layer_axes('lm_head/kernel') == 0


@pytest.mark.parametrize(
    'remat', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_same_loss_and_gradients(remat):
  config = _config(False, f'model.remat={str(remat).lower()}')
  unrolled = model_lib.Llama(config.model, rngs=nnx.Rngs(0))
  scanned = model_lib.Llama(
      dataclasses.replace(config.model, scan_layers=True), rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, model_lib.stack_layers(params))
  nnx.update(scanned, state)
  batch = _batches(1)[0]

  @nnx.jit
  def loss_and_grad(model):
    grad_fn = nnx.value_and_grad(lambda m: model_lib.loss_fn(m, batch)[0])
    value, grads = grad_fn(model)
    return value, nnx.to_pure_dict(grads)

  loss_u, grads_u = loss_and_grad(unrolled)
  loss_s, grads_s = loss_and_grad(scanned)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  _close(model_lib.unstack_layers(grads_s), grads_u)


@pytest.mark.parametrize('name', [
    'scale',
    pytest.param('muon', marks=pytest.mark.slow),
    pytest.param('adafactor', marks=pytest.mark.slow),
    pytest.param('sgd_column_norm', marks=pytest.mark.slow),
    pytest.param('galore', marks=pytest.mark.slow),
    pytest.param('fira', marks=pytest.mark.slow),
    pytest.param('stable_spam', marks=pytest.mark.slow)])
def test_same_optimizer_steps(name):
  """Two trainer steps from the same initial values: params (1e-5) and the
  loss of every step agree; SCALE's output-layer momentum and AdamW's moments
  of the norm scales carry over into step 2."""
  unrolled = _setup(_config(False, f'optimizer.name={name}'))
  scanned = _setup(_config(True, f'optimizer.name={name}'))
  p_u = unrolled.init_params(0)
  p_s = jax.device_put(jax.tree.map(jnp.copy, model_lib.stack_layers(p_u)),
                       scanned.param_shardings)  # p_u is donated.
  o_u, o_s = unrolled.init_opt_state(p_u), scanned.init_opt_state(p_s)
  step_u, step_s = make_train_step(unrolled), make_train_step(scanned)
  with jax.set_mesh(unrolled.mesh):
    for batch in _batches(2):
      p_u, o_u, m_u = step_u(p_u, o_u, batch)
      p_s, o_s, m_s = step_s(p_s, o_s, batch)
      np.testing.assert_allclose(m_s['loss'], m_u['loss'], rtol=1e-5)
      assert int(m_s['skipped']) == int(m_u['skipped']) == 0
  # GaLore's and Fira's SVD of one matrix and of a batch of them round
  # differently.
  _close(model_lib.unstack_layers(p_s), p_u,
         atol=1e-5 if name in ('galore', 'fira') else 1e-6)


@pytest.mark.parametrize('name', [
    'apollo', pytest.param('apollo_mini', marks=pytest.mark.slow)])
def test_random_projection_optimizers_step_scanned_layers(name):
  """APOLLO's norm-growth limiter also runs on the partition without
  low-rank matrices (embedding, head: every leaf masked out). Its random
  bases differ between the layouts, so only the scanned steps are checked,
  and that each layer has its own basis, as each unrolled leaf has."""
  scanned = _setup(_config(True, f'optimizer.name={name}'))
  params = scanned.init_params(0)
  before = jax.tree.map(np.asarray, params)
  opt_state = scanned.init_opt_state(params)
  step = make_train_step(scanned)
  with jax.set_mesh(scanned.mesh):
    losses = []
    for batch in _batches(2):
      params, opt_state, metrics = step(params, opt_state, batch)
      losses.append(float(metrics['loss']))
      assert int(metrics['skipped']) == 0
  assert all(np.isfinite(losses)), losses
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                       params, before)
  assert all(jax.tree.leaves(moved)), moved
  bases = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
      opt_state) if '.basis' in jax.tree_util.keystr(p)]
  assert len(bases) == 7  # q, k, v, o, gate, up, down: [layers, in, rank]
  for b in bases:
    assert b.shape[0] == 3 and not np.allclose(b[0], b[1]), b.shape


def test_scale_normalizes_each_layer_over_its_own_fan_in():
  """One SCALE step from zero weight decay: every column of every layer's
  kernel moved by exactly lr in RMS over that layer's inputs."""
  config = _config(True, 'optimizer.weight_decay=0.0',
                   'optimizer.grad_clip=null')
  setup = _setup(config)
  params = setup.init_params(0)
  step = make_train_step(setup)
  old = jax.tree.map(np.asarray, params)
  with jax.set_mesh(setup.mesh):
    new, _, _ = step(params, setup.init_opt_state(params), _batches(2)[1])
  lr = float(setup.schedule(0))
  delta = (old['layers']['mlp']['down_proj']['kernel']
           - np.asarray(new['layers']['mlp']['down_proj']['kernel'])) / lr
  rms = np.sqrt(np.mean(delta.astype(np.float64) ** 2, axis=1))  # [L, out]
  np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


def test_row_normalized_variants_refuse_scanned_layers():
  with pytest.raises(ConfigError, match='model.scan_layers'):
    make_optimizer(_config(True, 'optimizer.name=scale_row_norm').optimizer,
                   10, scan_layers=True)


def test_unscanned_scale_refuses_stacked_kernels():
  config = _config(True)
  tx, _ = make_optimizer(config.optimizer, 10)  # scan_layers not passed.
  with pytest.raises(ValueError, match='rank 3'):
    _setup_with(config, tx)


def _setup_with(config, tx):
  return make_setup(config, mesh_lib.make_mesh(config.mesh), tx,
                    lambda s: 0.0)


def test_layer_axis_is_not_sharded():
  shardings = _setup(_config(True)).param_shardings['layers']
  assert shardings['attn']['q_proj']['kernel'].spec == PartitionSpec(
      None, 'fsdp', 'tensor')
  assert shardings['mlp']['down_proj']['kernel'].spec == PartitionSpec(
      None, 'tensor', 'fsdp')
  assert shardings['attn_norm']['scale'].spec == PartitionSpec(None, None)


def _iterator():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


@pytest.mark.parametrize('saved_scan', [False, True])
def test_checkpoint_of_the_other_layout_is_refused(tmp_path, saved_scan):
  saving = _setup(_config(saved_scan))
  loading = _setup(_config(not saved_scan))
  state = {'params': saving.init_params(0)}
  checkpointer = ckpt_lib.Checkpointer(tmp_path / 'checkpoints', keep=1)
  checkpointer.save(1, state, _iterator())
  checkpointer.wait()
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=f'model.scan_layers={str(saved_scan).lower()} to '
                     'resume'):
    checkpointer.restore(1, {'params': loading.abstract_params}, _iterator())
  checkpointer.close()


@pytest.mark.slow
def test_gradient_variance_groups_each_layer():
  from train.diagnostics import gradient_variance  # pylint: disable=g-import-not-at-top
  unrolled, scanned = _setup(_config(False)), _setup(_config(True))
  params = unrolled.init_params(0)
  batch = _batches(1)[0]
  record = lambda setup, p: jax.jit(
      lambda p: gradient_variance(setup, p, batch, 2))(p)
  expected = record(unrolled, params)
  got = record(scanned, model_lib.stack_layers(params))
  assert set(got) == set(expected) and 'grad_var/layer_2' in got
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4,
                               err_msg=name)


_SHARDED_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from train import mesh as mesh_lib, model as model_lib
from train.config import load_config
from train.optim import make_optimizer
from train.prefetch import global_batch
from train.state import make_setup
from train.step import make_train_step

def setup_for(scan, mesh_args, devices=None):
  config = load_config(None, %(model)r + [f'model.scan_layers={scan}'] +
                       mesh_args)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                scan_layers=config.model.scan_layers)
  return make_setup(config, mesh_lib.make_mesh(config.mesh, devices), tx,
                    schedule)

def run(setup, params, batches):
  step = make_train_step(setup)
  opt_state = setup.init_opt_state(params)
  with jax.set_mesh(setup.mesh):
    for b in batches:
      params, opt_state, m = step(params, opt_state, global_batch(setup, b))
      jax.device_get(m)
  return jax.device_get(params)

rng = np.random.default_rng(0)
batches = [{'inputs': t[:, :-1], 'targets': t[:, 1:]} for t in
           rng.integers(0, 64, (2, 4, 17), dtype=np.int32)]
one = setup_for('false', ['mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=1'],
                jax.devices()[:1])
init = jax.device_get(one.init_params(0))
expected = run(one, jax.device_put(init, one.param_shardings), batches)
sharded = setup_for('true', ['mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'])
stacked = jax.device_put(model_lib.stack_layers(init), sharded.param_shardings)
q = stacked['layers']['attn']['q_proj']['kernel']
got = model_lib.unstack_layers(run(sharded, stacked, batches))
err = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in
          zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
print(json.dumps({'spec': [str(a) for a in q.sharding.spec],
                  'shard': list(q.sharding.shard_shape(q.shape)),
                  'max_rel_err': err}))
'''


@pytest.mark.slow  # About 40 s idle: 8 simulated devices in a subprocess.
def test_scanned_step_on_a_2x2x2_mesh_equals_one_device_unrolled():
  import harness  # pylint: disable=g-import-not-at-top
  out = harness.last_json_line(harness.run_python(
      _SHARDED_SCRIPT % {'model': list(MODEL)}, devices=8,
      timeout=600).check())
  assert out['spec'] == ['None', 'fsdp', 'tensor']
  assert out['shard'] == [3, 16, 16]  # The layer axis whole on every device.
  assert out['max_rel_err'] < 1e-5, out


def test_every_optimizer_builds_for_both_layouts():
  from train.optim import KNOWN  # pylint: disable=g-import-not-at-top
  for scan in (False, True):
    config = _config(scan)
    mesh = mesh_lib.make_mesh(config.mesh)
    for name in KNOWN:
      opt = dataclasses.replace(config.optimizer, name=name)
      if scan and name.endswith('row_norm'):
        with pytest.raises(ConfigError, match='model.scan_layers'):
          make_optimizer(opt, 10, config.rivals, scan_layers=True)
        continue
      tx, schedule = make_optimizer(opt, 10, config.rivals, scan_layers=scan)
      setup = make_setup(config, mesh, tx, schedule)  # Abstract init.
      assert jax.tree.leaves(setup.abstract_opt_state), name
