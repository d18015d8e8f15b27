"""Sharded training on 8 simulated CPU devices, through the real trainer.

- Every parameter, optimizer-state leaf and batch is created with the
  NamedSharding its logical axes and ``mesh.rules`` give (mesh 1x8x1 and
  2x2x2), and nothing but scalars and norm vectors is fully replicated.
- FSDP compiles to a step that keeps the batch split (activation memory
  like data parallelism's), not one that replicates it.
- One trainer step on a sharded mesh equals the same step on one device, and
  SCALE's column normalization reduces across the shards of a matrix: each
  column of ``(W_old - W_new) / lr`` has RMS exactly 1.
- ``python -m train`` gives the same losses on meshes 8x1x1, 2x4x1, 2x2x2 and
  1x8x1 as on one device over 5 steps, and the one-device run gives those of
  an independent plain-JAX replay (``replay_util``).
- A checkpoint saved on mesh 1x8x1 restores onto 2x2x2 and onto one device,
  and the resumed runs continue with the uninterrupted run's losses.
"""

import shutil
import textwrap

import numpy as np
import pytest

import harness
import replay_util as ru
from train import data as data_lib

STEPS = ('train.steps=5', 'train.eval_every=5')
RTOL = 2e-5  # Observed differences between meshes: about 1e-7 relative.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return harness.shared_data_dir(tmp_path_factory)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return harness.compile_cache_dir(tmp_path_factory)


# ------------------------------------------ shardings and one sharded step ----

_SCRIPT = textwrap.dedent(r'''
    import json

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import scale_optax
    from train import mesh as mesh_lib
    from train.config import load_config
    from train.optim import make_optimizer
    from train.prefetch import global_batch
    from train.state import make_setup
    from train.step import make_train_step

    SMALL = %(small)r
    assert jax.device_count() == 8, jax.devices()
    # Logical axes of each parameter (train/model.py's table), by name.
    LOGICAL = {'embedding': ('vocab', 'embed'), 'q_proj': ('embed', 'heads'),
               'k_proj': ('embed', 'heads'), 'v_proj': ('embed', 'heads'),
               'o_proj': ('heads', 'embed'), 'gate_proj': ('embed', 'mlp'),
               'up_proj': ('embed', 'mlp'), 'down_proj': ('mlp', 'embed'),
               'scale': ('norm',), 'lm_head': ('embed', 'vocab')}

    def logical(path):
      for name in reversed(path.split('/')):
        if name in LOGICAL:
          return LOGICAL[name]
      raise KeyError(path)

    def flat(tree):
      return [(scale_optax.path_str(p), x) for p, x in
              jax.tree_util.tree_flatten_with_path(tree)[0]]

    def build(mesh_args, devices=None):
      config = load_config(None, SMALL + mesh_args + [
          'optimizer.warmup_ratio=0', 'optimizer.weight_decay=0',
          'train.steps=100'])
      mesh = mesh_lib.make_mesh(config.mesh, devices)
      tx, schedule = make_optimizer(config.optimizer, config.train.steps)
      return config, mesh, make_setup(config, mesh, tx, schedule)

    def check_shardings(mesh_args):
      config, mesh, setup = build(mesh_args)
      rules = config.mesh.rules
      problems, replicated, checked = [], [], 0
      params = setup.init_params(0)
      opt_state = setup.init_opt_state(params)
      param_sharding = {}
      for path, x in flat(params):
        spec = P(*[rules[n] for n in logical(path)])
        want = NamedSharding(mesh, spec)
        param_sharding[path] = x.sharding
        checked += 1
        if not (isinstance(x.sharding, NamedSharding)
                and x.sharding.mesh.shape == mesh.shape
                and x.sharding.is_equivalent_to(want, x.ndim)):
          problems.append(f'param {path}: {x.sharding}, want {want}')
        if x.sharding.shard_shape(x.shape) != want.shard_shape(x.shape):
          problems.append(f'param {path}: shard {x.sharding.shard_shape(x.shape)}')
        if x.ndim >= 2 and x.sharding.is_fully_replicated:
          replicated.append(path)
      for path, x in flat(opt_state):
        checked += 1
        if not isinstance(x.sharding, NamedSharding):
          problems.append(f'opt {path}: not a NamedSharding: {x.sharding}')
          continue
        owner = [p for p in param_sharding if path.endswith('/' + p)]
        if x.ndim == 0:
          ok = x.sharding.is_fully_replicated
        elif owner and x.ndim >= 2:
          ok = x.sharding.is_equivalent_to(param_sharding[owner[0]], x.ndim)
        else:
          ok = True
        if not ok:
          problems.append(f'opt {path}: {x.sharding} (param {owner})')
        if x.ndim >= 2 and x.sharding.is_fully_replicated:
          replicated.append('opt ' + path)
      # Compiled-step outputs keep the same shardings (no resharding drift).
      tokens = np.random.default_rng(0).integers(
          0, 512, (config.data.batch_size, config.data.seq_len), np.int32)
      batch = global_batch(setup, {'inputs': tokens, 'targets': tokens})
      want_batch = NamedSharding(mesh, P(('data', 'fsdp'), None))
      if not batch['inputs'].sharding.is_equivalent_to(want_batch, 2):
        problems.append(f'batch: {batch["inputs"].sharding}')
      before = [x.sharding for _, x in flat((params, opt_state))]
      with jax.set_mesh(mesh):
        params, opt_state, m = make_train_step(setup)(params, opt_state, batch)
        jax.block_until_ready(m)
      for (path, x), s in zip(flat((params, opt_state)), before):
        if not x.sharding.is_equivalent_to(s, x.ndim):
          problems.append(f'after a step, {path}: {x.sharding} != {s}')
      return {'problems': problems, 'replicated_matrices': replicated,
              'checked': checked,
              'head_shard': list(params['lm_head']['kernel'].sharding
                                 .shard_shape((64, 512))),
              'ema_paths': [p for p, _ in flat(opt_state) if 'lm_head' in p]}

    def run_steps(setup, params, batches):
      """Params before and after each step, as NumPy."""
      step = make_train_step(setup)
      opt_state = setup.init_opt_state(params)
      history = [jax.device_get(params)]
      with jax.set_mesh(setup.mesh):
        for b in batches:
          params, opt_state, m = step(params, opt_state,
                                      global_batch(setup, b))
          jax.device_get(m)  # One step in flight at a time: host memory stays bounded.
          history.append(jax.device_get(params))
      return history

    def reference_steps():
      """Two steps on one device, from the same init and batches."""
      config, _, ref = build(['mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=1'],
                             devices=jax.devices()[:1])
      rng = np.random.default_rng(1)
      shape = (config.data.batch_size, config.data.seq_len)
      batches = []
      for _ in range(2):
        t = rng.integers(0, 512, (shape[0], shape[1] + 1), np.int32)
        batches.append({'inputs': t[:, :-1], 'targets': t[:, 1:]})
      return batches, run_steps(ref, ref.init_params(0), batches)

    def compare_steps(mesh_args, batches, ref_h):
      _, _, sharded = build(mesh_args)
      sh_params = sharded.init_params(0)
      head = sh_params['lm_head']['kernel']
      sharded_rows = head.sharding.shard_shape(head.shape)[0] < head.shape[0]
      sh_h = run_steps(sharded, sh_params, batches)
      init_diff = max(float(np.abs(a - b).max()) for a, b in
                      zip(jax.tree.leaves(ref_h[0]), jax.tree.leaves(sh_h[0])))
      update_err, col_rms = {}, {}
      for k in range(1, len(batches) + 1):
        lr = float(sharded.schedule(k - 1))
        for (path, old), new, r_old, r_new in zip(
            flat(sh_h[k - 1]), jax.tree.leaves(sh_h[k]),
            jax.tree.leaves(ref_h[k - 1]), jax.tree.leaves(ref_h[k])):
          u, ref_u = old - new, r_old - r_new
          err = float(np.abs(u - ref_u).max() / np.abs(ref_u).max())
          update_err[path] = max(update_err.get(path, 0.0), err)
          if old.ndim == 2:  # SCALE: every column of the update has RMS 1.
            rms = np.sqrt(np.mean(np.square(u / lr), axis=0))
            col_rms[path] = max(col_rms.get(path, 0.0),
                                float(np.abs(rms - 1).max()))
      return {'init_diff': init_diff, 'update_err': update_err,
              'col_rms_err': col_rms, 'head_rows_sharded': sharded_rows}

    def step_temporaries():
      """Compiled step's temporary bytes per device, and the params' bytes."""
      from train.dry_run import dry_run
      out = {}
      for name, args in [('data8', ['mesh.data=8', 'mesh.fsdp=1']),
                         ('fsdp8', ['mesh.data=1', 'mesh.fsdp=8'])]:
        report = dry_run(load_config(None, SMALL + args))
        out[name] = report['temp_bytes']
        out['params'] = report['param_bytes_total']
      return out

    out = {'temporaries': step_temporaries()}
    batches, ref_h = reference_steps()
    for name, args in [('fsdp8', ['mesh.data=1', 'mesh.fsdp=8', 'mesh.tensor=1']),
                       ('2x2x2', ['mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'])]:
      out[name] = {'shardings': check_shardings(args),
                   'steps': compare_steps(args, batches, ref_h)}
    print(json.dumps(out))
    ''') % {'small': list(harness.SMALL_ARGS)}


@pytest.fixture(scope='module')
def sharding_report(cache_dir):
  return harness.last_json_line(harness.run_python(
      _SCRIPT, devices=8, jax_cache=cache_dir).check())


@pytest.mark.parametrize('mesh', ['fsdp8', '2x2x2'])
def test_params_state_and_batch_are_created_with_their_shardings(
    sharding_report, mesh):
  report = sharding_report[mesh]['shardings']
  assert not report['problems'], '\n'.join(report['problems'])
  assert not report['replicated_matrices'], report['replicated_matrices']
  assert report['checked'] > 30
  # SCALE's state: the head's momentum, sharded like the head.
  assert any(p.endswith('lm_head/kernel') for p in report['ema_paths'])
  want = {'fsdp8': [8, 512], '2x2x2': [32, 256]}[mesh]
  assert report['head_shard'] == want


@pytest.mark.parametrize('mesh', ['fsdp8', '2x2x2'])
def test_sharded_step_matches_one_device_and_normalizes_whole_columns(
    sharding_report, mesh):
  steps = sharding_report[mesh]['steps']
  # Parameters are created with the same values whatever the sharding.
  assert steps['init_diff'] == 0.0
  # The head's fan-in axis is split over devices: its column RMS needs a
  # cross-device reduction.
  assert steps['head_rows_sharded']
  # Matrices (SCALE) agree to ~2e-6 of the update; norm scales (AdamW, whose
  # first update is about lr * sign(g)) to ~6e-5.
  bad = {p: e for p, e in steps['update_err'].items()
         if e > (1e-3 if p.endswith('scale') else 1e-4)}
  assert not bad, bad
  matrices = steps['col_rms_err']
  assert len(matrices) == 2 + 7 * 2  # embed, head, 7 per layer, 2 layers.
  bad = {p: e for p, e in matrices.items() if e > 1e-3}
  assert not bad, bad


def test_fsdp_keeps_activations_split_over_the_batch(sharding_report):
  # FSDP (params split over fsdp, batch split over fsdp) needs at most one
  # gathered copy of the weights more than pure data parallelism (the same
  # per-device batch). Compiled so that activations are split over the
  # weights' embed axis instead, every device computes the whole batch:
  # 3.3x data parallelism's temporaries for this model.
  temps = sharding_report['temporaries']
  assert temps['fsdp8'] <= temps['data8'] + temps['params'], temps


# ------------------------------------------------- the trainer on meshes ----


def _train(tmp_path, name, mesh, devices, data_dir, cache_dir, *extra):
  run_dir = tmp_path / name
  sizes = dict(zip(('data', 'fsdp', 'tensor'), mesh))
  args = harness.small_args(run_dir, data_dir, *STEPS,
                            *(f'mesh.{k}={v}' for k, v in sizes.items()),
                            *extra)
  harness.run_train(args, devices=devices, jax_cache=cache_dir).check()
  return run_dir


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory, data_dir, cache_dir):
  return _train(tmp_path_factory.mktemp('one'), 'run', (1, 1, 1), 1,
                data_dir, cache_dir, 'train.checkpoint_every=5')


@pytest.fixture(scope='module')
def fsdp8_run(tmp_path_factory, data_dir, cache_dir):
  """Mesh 1x8x1 (the default fsdp=-1 on 8 devices), checkpoints at 3 and 5."""
  return _train(tmp_path_factory.mktemp('fsdp8'), 'run', (1, -1, 1), 8,
                data_dir, cache_dir, 'train.checkpoint_every=3')


def _assert_same_losses(run_dir, reference, steps=range(1, 6)):
  got, want = harness.losses(run_dir), harness.losses(reference)
  assert sorted(got) == list(steps), got
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps],
                             rtol=RTOL)
  (got_eval,), (want_eval,) = (harness.records(run_dir, 'eval'),
                                harness.records(reference, 'eval'))
  assert got_eval['step'] == want_eval['step'] == 5
  assert got_eval['eval_tokens'] == want_eval['eval_tokens'] == 2 * 8 * 64
  np.testing.assert_allclose(got_eval['loss'], want_eval['loss'], rtol=RTOL)


@pytest.mark.slow  # Two CLI runs; the default suite checks the sharded step in sharding_report.
def test_one_device_run_learns_as_an_independent_replay(one_device_run,
                                                       data_dir):
  """The reference of every mesh comparison below is itself checked: its
  losses, gradient norms and eval loss are those of a plain-JAX replay."""
  loss = harness.losses(one_device_run)
  assert sorted(loss) == [1, 2, 3, 4, 5]
  assert all(np.isfinite(v) for v in loss.values())
  assert loss[5] < loss[1]
  config = ru.cli_config(*harness.small_args(one_device_run, data_dir),
                         *STEPS)
  dataset = data_lib.prepare(config.data, harness.VOCAB)
  ru.assert_run_matches_replay(one_device_run, config, dataset, processes=1)


@pytest.mark.slow  # An 8-device CLI run (see sharding_report for the default check).
def test_fsdp8_matches_one_device(fsdp8_run, one_device_run):
  _assert_same_losses(fsdp8_run, one_device_run)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 4, 1), (2, 2, 2)],
                         ids=['8x1x1', '2x4x1', '2x2x2'])
def test_mesh_matches_one_device(mesh, tmp_path, one_device_run, data_dir,
                                 cache_dir):
  run_dir = _train(tmp_path, 'run', mesh, 8, data_dir, cache_dir,
                   'train.checkpoint_every=5')
  _assert_same_losses(run_dir, one_device_run)


@pytest.mark.parametrize('mesh,devices', [
    pytest.param((2, 2, 2), 8, id='2x2x2', marks=pytest.mark.slow),
    pytest.param((1, 1, 1), 1, id='one_device', marks=pytest.mark.slow)])
def test_restore_fsdp8_checkpoint_on_another_mesh(mesh, devices, tmp_path,
                                                  fsdp8_run, data_dir,
                                                  cache_dir):
  # The run as it was after step 3's checkpoint: drop the later checkpoint.
  run_dir = tmp_path / 'resumed'
  shutil.copytree(fsdp8_run, run_dir)
  assert sorted(p.name for p in (run_dir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['3', '5']
  shutil.rmtree(run_dir / 'checkpoints' / '5')
  sizes = dict(zip(('data', 'fsdp', 'tensor'), mesh))
  args = harness.small_args(run_dir, data_dir, *STEPS,
                            'train.checkpoint_every=3',
                            *(f'mesh.{k}={v}' for k, v in sizes.items()))
  out = harness.run_train(args, devices=devices, jax_cache=cache_dir).check()
  assert 'resumed from step 3' in out
  _assert_same_losses(run_dir, fsdp8_run)
