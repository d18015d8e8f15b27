"""Multi-process (multi-host) training.

Unit tests of ``train.distributed`` and of ``train.mesh.check_batch``, then a real run: two
``python -m train`` processes on localhost, 4 simulated CPU devices each (one
8-device mesh, gloo collectives across the processes), trained for 5 steps
with a checkpoint at step 3, then restarted as if killed after step 3 (the
later checkpoint removed) on another mesh shape. The restarted processes must
resume at step 3 and repeat the uninterrupted run's losses. The run itself is
checked against an independent one-device replay on the rows each process's
pipeline gives: the processes read disjoint halves of every global batch.

(Two processes read different document shards than one process does, so the
two-process losses are compared with the two-process uninterrupted run, not
with a one-process run.)
"""

import json
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import harness
import replay_util as ru
from train import data as data_lib
from train import distributed
from train import mesh as mesh_lib
from train.config import ConfigError, DistributedConfig, load_config

# ----------------------------------------------------------- unit tests ----


def test_single_process_by_default():
  assert distributed.distributed_arguments(DistributedConfig(), {}) is None
  assert distributed.distributed_arguments(
      DistributedConfig(), {'SLURM_NTASKS': '1'}) is None
  assert distributed.distributed_arguments(
      DistributedConfig(num_processes=1), {}) is None


def test_arguments_from_config_then_environment():
  config = DistributedConfig(coordinator_address='127.0.0.1:1234',
                             num_processes=2, process_id=1,
                             local_device_ids='0,1')
  env = {'JAX_COORDINATOR_ADDRESS': 'other:1', 'JAX_NUM_PROCESSES': '8',
         'JAX_PROCESS_ID': '5'}
  assert distributed.distributed_arguments(config, env) == {
      'coordinator_address': '127.0.0.1:1234', 'num_processes': 2,
      'process_id': 1, 'local_device_ids': [0, 1]}
  assert distributed.distributed_arguments(DistributedConfig(), env) == {
      'coordinator_address': 'other:1', 'num_processes': 8, 'process_id': 5,
      'local_device_ids': None}
  # A cluster launcher with several tasks: jax detects the values itself.
  assert distributed.distributed_arguments(
      DistributedConfig(), {'SLURM_NTASKS': '4'}) == {
          'coordinator_address': None, 'num_processes': None,
          'process_id': None, 'local_device_ids': None}
  assert distributed.distributed_arguments(
      DistributedConfig(), {'TPU_WORKER_HOSTNAMES': 'a,b'}) is not None


@pytest.mark.parametrize('config,env,key', [
    (DistributedConfig(num_processes=2, process_id=2), {},
     'distributed.process_id'),
    (DistributedConfig(num_processes=0), {}, 'distributed.num_processes'),
    (DistributedConfig(), {'JAX_NUM_PROCESSES': 'two'}, 'JAX_NUM_PROCESSES'),
    (DistributedConfig(num_processes=2, local_device_ids='0;1'), {},
     'distributed.local_device_ids'),
])
def test_bad_distributed_values(config, env, key):
  with pytest.raises(ConfigError, match=key):
    distributed.distributed_arguments(config, env)


def test_initialize_uses_gloo_on_cpu_and_binds_loopback(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  previous = jax.config.jax_cpu_collectives_implementation
  try:
    jax.config.update('jax_cpu_collectives_implementation', None)
    assert not distributed.initialize_distributed(DistributedConfig(), {})
    assert not calls
    assert distributed.initialize_distributed(
        DistributedConfig(coordinator_address='127.0.0.1:5000',
                          num_processes=2, process_id=0), {})
    assert jax.config.jax_cpu_collectives_implementation == 'gloo'
  finally:
    jax.config.update('jax_cpu_collectives_implementation', previous)
  assert calls == [{'coordinator_address': '127.0.0.1:5000',
                    'num_processes': 2, 'process_id': 0,
                    'local_device_ids': None,
                    'coordinator_bind_address': '127.0.0.1:5000'}]


def test_main_process_first(monkeypatch):
  events = []
  monkeypatch.setattr(distributed, 'sync_processes',
                      lambda name: events.append(('barrier', name)))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    result = distributed.main_process_first(
        lambda index=index: events.append(('work', index)) or index, 'prep')
    assert result == index
  assert events == [('work', 0), ('barrier', 'prep'), ('barrier', 'prep'),
                    ('work', 1)]


def test_sync_processes_waits_at_a_new_barrier_each_call(monkeypatch):
  waits = []
  monkeypatch.setattr(distributed.ocp_multihost, 'get_barrier_sync_fn',
                      lambda: lambda **kw: waits.append(kw))
  distributed.sync_processes('one')
  assert not waits  # One process: nothing to wait for.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  distributed.sync_processes('prep', timeout_s=5)
  distributed.sync_processes('prep', timeout_s=5)
  assert [w['timeout_ms'] for w in waits] == [5000, 5000]
  assert waits[0]['key'] != waits[1]['key']
  assert all('prep' in w['key'] for w in waits)


class _FakeSharding:
  """Rows [0, 4) on this process's two devices, each replicated twice."""

  def addressable_devices_indices_map(self, shape):
    del shape
    return {d: (slice(2 * (d % 2), 2 * (d % 2) + 2), slice(None))
            for d in range(4)}


def test_check_batch_needs_each_process_to_own_its_rows(monkeypatch):
  config = load_config(None, ['data.batch_size=8', 'mesh.fsdp=1'])
  mesh = mesh_lib.make_mesh(config.mesh)
  assert mesh_lib.local_batch_rows(_FakeSharding(), 8) == [0, 1, 2, 3]
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(mesh_lib, 'batch_sharding', lambda *a: _FakeSharding())
  mesh_lib.check_batch(config, mesh)  # 4 rows = 8 / 2 processes: fine.
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(ConfigError, match='mesh.rules.batch'):
    mesh_lib.check_batch(config, mesh)


# ------------------------------------------------ two real processes ----

STEPS = ('train.steps=5', 'train.eval_every=5', 'train.checkpoint_every=3')


def _start_two_processes(run_dir, data_dir, cache_dir, *args):
  """Starts ``python -m train`` as processes 0 and 1 of one run."""
  port = harness.free_loopback_port()
  procs = []
  for i in range(2):
    args_i = harness.small_args(
        run_dir, data_dir, *args,
        f'distributed.coordinator_address=127.0.0.1:{port}',
        'distributed.num_processes=2', f'distributed.process_id={i}')
    procs.append(harness.start(
        ['-m', 'train', *args_i], devices=4, jax_cache=cache_dir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _two_processes(run_dir, data_dir, cache_dir, *args, timeout=240,
                   procs=None):
  """Runs (or waits for) processes 0 and 1; returns their outputs."""
  if procs is None:
    procs = _start_two_processes(run_dir, data_dir, cache_dir, *STEPS, *args)
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outputs = [p.communicate()[0] for p in procs]
    pytest.fail('two-process run timed out:\n' + '\n'.join(
        f'--- process {i}:\n{o[-3000:]}' for i, o in enumerate(outputs)))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}:\n{out[-5000:]}'
  return outputs


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """5 steps on 2 processes x 4 devices (checkpoints at 3 and 5).

  Returns the run directory, the data directory and the two outputs.
  """
  cache_dir = harness.compile_cache_dir(tmp_path_factory)
  root = tmp_path_factory.mktemp('two_processes')
  # A fresh data directory: process 0 prepares it while process 1 waits.
  data_dir = root / 'data'
  straight = root / 'straight'
  outs = _two_processes(straight, data_dir, cache_dir)
  return straight, data_dir, outs


def test_two_processes_train_and_checkpoint(two_process_run):
  straight, _, outs = two_process_run
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 cpu device(s), " \
         "2 process(es)" in outs[0]
  assert 'summary:' in outs[0] and 'summary:' not in outs[1]

  # Process 0 alone wrote each record once; the batch is the global batch.
  train_records = harness.records(straight, 'train')
  assert [r['step'] for r in train_records] == [1, 2, 3, 4, 5]
  assert [r['tokens'] for r in train_records] == [512 * s for s in range(1, 6)]
  loss = harness.losses(straight)
  assert all(np.isfinite(v) and 4 < v < 8 for v in loss.values()), loss
  (evaluation,) = harness.records(straight, 'eval')
  assert evaluation['eval_tokens'] == 2 * 8 * 64  # 2 global batches of 8x64.

  # Every process saved its part: sharded arrays and its data position.
  checkpoints = straight / 'checkpoints'
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) \
      == ['3', '5']
  data_files = sorted(p.name for p in (checkpoints / '3' / 'data').iterdir()
                      if p.suffix == '.json')
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']
  for f in data_files:  # Each process's own iterator position.
    assert json.loads((checkpoints / '3' / 'data' / f).read_text())


def test_each_process_reads_its_own_part_of_every_batch(two_process_run):
  """The rows the two processes read are disjoint and together make the
  global batch the run trained and evaluated on: the run's losses, gradient
  norms and eval loss equal a one-device replay on the two pipelines' rows."""
  straight, data_dir, _ = two_process_run
  config = ru.cli_config(*harness.small_args(straight, data_dir), *STEPS)
  dataset = data_lib.prepare(config.data, harness.VOCAB)
  ru.assert_run_matches_replay(straight, config, dataset, processes=2)


@pytest.mark.slow
def test_two_processes_resume_on_another_mesh(two_process_run, tmp_path,
                                              tmp_path_factory):
  straight, data_dir, _ = two_process_run
  cache_dir = harness.compile_cache_dir(tmp_path_factory)
  loss = harness.losses(straight)
  (evaluation,) = harness.records(straight, 'eval')
  # Both processes killed after step 3's checkpoint: restart them, on a mesh
  # with tensor parallelism across the two processes.
  resumed = tmp_path / 'resumed'
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '5')
  outs = _two_processes(resumed, data_dir, cache_dir, 'mesh.data=2',
                        'mesh.fsdp=2', 'mesh.tensor=2')
  assert 'resumed from step 3' in outs[0]
  again = harness.losses(resumed)
  assert sorted(again) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([again[s] for s in (4, 5)],
                             [loss[s] for s in (4, 5)], rtol=2e-5)
  (evaluation_again,) = harness.records(resumed, 'eval')
  np.testing.assert_allclose(evaluation_again['loss'], evaluation['loss'],
                             rtol=2e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(
    tmp_path_factory, tmp_path):
  cache_dir = harness.compile_cache_dir(tmp_path_factory)
  data_dir = harness.shared_data_dir(tmp_path_factory)
  run_dir = tmp_path / 'run'
  procs = _start_two_processes(
      run_dir, data_dir, cache_dir, 'train.steps=10000',
      'train.eval_every=10000', 'train.checkpoint_every=10000',
      'train.log_every=1', 'train.progress=false')
  deadline = time.monotonic() + 180
  while len(harness.records(run_dir, 'train')) < 3:
    assert time.monotonic() < deadline and all(
        p.poll() is None for p in procs), 'the run did not reach step 3'
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # Preemption notice to one host only.
  outs = _two_processes(run_dir, data_dir, cache_dir, procs=procs, timeout=120)
  summary = json.loads((run_dir / 'summary.json').read_text())
  assert summary['stopped_by'] == 'stop requested on another process'
  assert 'SIGTERM: checkpoint saved' not in outs[0]
  step = summary['steps']
  assert 3 <= step < 10000
  data = run_dir / 'checkpoints' / str(step) / 'data'
  assert sorted(p.name for p in data.iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json', 'process_1-of-2.json']
