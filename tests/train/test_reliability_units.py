"""Fault tolerance, piece by piece and in process (issue 7): checkpoint
integrity and fallback, donation during an in-flight async save, skipped
non-finite steps, SCALE's arithmetic on extreme gradients, bad documents and
torn metrics. ``test_reliability.py`` has the end-to-end runs."""

from __future__ import annotations

import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import faults_util as fu
import scale_optax
from train import checkpoint as ckpt_lib
from train import compat
from train import data
from train import integrity
from train import mesh as mesh_lib
from train.config import DataConfig, load_config
from train.data import tfds_source
from train.data import tokenizer as tokenizer_lib
from train.metrics import MetricsWriter, read_records
from train.optim import make_optimizer
from train.prefetch import global_batch
from train.state import make_setup
from train.step import make_train_step


# ----------------------------------------------------------- checkpoints --

def _iterator(position: int = 0):
  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  for _ in range(position):
    next(it)
  return it


def _state(step: int) -> dict:
  return {'params': {'w': jnp.arange(4096, dtype=jnp.float32) * step,
                     'b': jnp.full((3, 5), step, jnp.bfloat16)},
          'step': jnp.asarray(step, jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), state)


@pytest.fixture
def saved(tmp_path):
  """A checkpoint folder with steps 1, 2, 3 (data positions 10, 20, 30)."""
  directory = tmp_path / 'checkpoints'
  c = ckpt_lib.Checkpointer(directory, keep=3)
  for step in (1, 2, 3):
    c.save(step, _state(step), _iterator(10 * step))
  c.close()
  return directory


def _restore(directory, step, keep=3):
  c = ckpt_lib.Checkpointer(directory, keep)
  it = _iterator()
  try:
    return c.restore(step, _abstract(_state(0)), it), next(it)
  finally:
    c.close()


def test_every_committed_checkpoint_has_a_manifest(saved):
  assert fu.committed_steps(saved) == [1, 2, 3]
  for step in (1, 2, 3):
    manifest = json.loads((saved / str(step) / integrity.MANIFEST).read_text())
    names = set(manifest['files'])
    assert 'data/process_0-of-1.json' in names
    assert any(n.startswith('state/') and '/d/' in n for n in names)
    assert integrity.verify_manifest(saved / str(step)) == []
  state, position = _restore(saved, 2)
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  assert position == 20  # The data iterator resumes where it was saved.


def test_orbax_alone_restores_flipped_array_bytes_silently(saved):
  """Why the manifest exists: without it, altered array data restores
  without any error, as wrong numbers."""
  fu.flip_bytes(fu.data_files(saved / '3')[0], count=8)
  (saved / '3' / integrity.MANIFEST).unlink()
  state, _ = _restore(saved, 3)
  assert not np.array_equal(state['params']['w'], _state(3)['params']['w'])


@pytest.mark.parametrize('damage, problem', [
    ('flip', 'SHA-256 differs (bytes altered)'),
    ('truncate', '(truncated or rewritten)'),
    ('delete', ': missing'),
    ('delete_data_item', 'data/process_0-of-1.json: missing'),
    ('garble_manifest', 'integrity.json is unreadable'),
])
def test_damage_is_an_error_naming_the_step_and_file(saved, damage, problem):
  step_dir = saved / '3'
  target = fu.data_files(step_dir)[0]
  if damage == 'flip':
    fu.flip_bytes(target)
  elif damage == 'truncate':
    fu.truncate(target)
  elif damage == 'delete':
    target.unlink()
  elif damage == 'delete_data_item':
    (step_dir / 'data' / 'process_0-of-1.json').unlink()
  else:
    (step_dir / integrity.MANIFEST).write_text('{"files": [')
  with pytest.raises(ckpt_lib.CheckpointCorruptError) as e:
    _restore(saved, 3)
  message = str(e.value)
  assert message.startswith(f'checkpoint at step 3 in {saved} is corrupt: ')
  assert problem in message
  if damage in ('flip', 'truncate', 'delete'):
    assert target.relative_to(step_dir).as_posix() in message


def test_restore_latest_falls_back_warns_and_sets_aside(saved):
  fu.flip_bytes(fu.data_files(saved / '3')[0])
  fu.truncate(fu.data_files(saved / '2')[0])
  warnings = []
  c = ckpt_lib.Checkpointer(saved, keep=3)
  it = _iterator()
  step, state = c.restore_latest(_abstract(_state(0)), it,
                                 warn=warnings.append)
  assert step == 1 and next(it) == 10
  np.testing.assert_array_equal(state['params']['w'], _state(1)['params']['w'])
  assert [w.split(' in ')[0] for w in warnings[:2]] == [
      'checkpoint at step 3', 'checkpoint at step 2']
  assert all('Trying an older checkpoint' in w for w in warnings[:2])
  assert sorted(p.name for p in (saved.parent / 'checkpoints.corrupt')
                .iterdir()) == ['2', '3']
  assert c.steps() == [1]
  # The steps set aside can be saved again.
  c.save(2, _state(2), _iterator(20))
  c.close()
  assert fu.committed_steps(saved) == [1, 2]


def test_damaged_checkpoint_without_manifest_is_set_aside(saved):
  """Without a manifest, orbax's own read error is the sign of damage."""
  (saved / '3' / integrity.MANIFEST).unlink()
  fu.truncate(fu.data_files(saved / '3')[0])
  warnings = []
  c = ckpt_lib.Checkpointer(saved, keep=3)
  step, _ = c.restore_latest(_abstract(_state(0)), _iterator(),
                             warn=warnings.append)
  c.close()
  assert step == 2
  assert warnings[0].startswith(f'checkpoint at step 3 in {saved} cannot be '
                                f'restored: ValueError: ')
  assert [p.name for p in (saved.parent / 'checkpoints.corrupt').iterdir()
          ] == ['3']


def _raised_from(error, cause):
  try:
    raise error from cause
  except type(error) as e:
    return e


@pytest.mark.parametrize('error, manifest', [
    (TypeError('a bug'), True),
    (TypeError('a bug'), False),
    (_raised_from(Exception('reading an array'), TypeError('a bug')), False),
    (ValueError('a read error of intact files'), True),
])
def test_other_restore_errors_propagate_and_move_nothing(
    saved, monkeypatch, error, manifest):
  """A bug, or any error reading a checkpoint whose files passed their
  integrity check, is not damage: it keeps its traceback, and the newest
  checkpoint stays where it is."""
  if not manifest:
    (saved / '3' / integrity.MANIFEST).unlink()
  c = ckpt_lib.Checkpointer(saved, keep=3)

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(c.manager, 'restore', fail)
  with pytest.raises(type(error), match=str(error)):
    c.restore_latest(_abstract(_state(0)), _iterator(),
                     warn=lambda m: pytest.fail(m))
  c.close()
  assert fu.committed_steps(saved) == [1, 2, 3]
  assert not (saved.parent / 'checkpoints.corrupt').exists()


def test_no_restorable_checkpoint_raises_listing_all(saved):
  for step in (1, 2, 3):
    fu.flip_bytes(fu.data_files(saved / str(step))[0])
  c = ckpt_lib.Checkpointer(saved, keep=3)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    c.restore_latest(_abstract(_state(0)), _iterator(), warn=lambda m: None)
  c.close()
  assert not isinstance(e.value, ckpt_lib.CheckpointCorruptError)
  assert 'tried steps 3, 2, 1' in str(e.value)
  assert 'Not starting from scratch' in str(e.value)
  assert fu.committed_steps(saved) == [1, 2, 3]  # Nothing moved or deleted.


def test_other_shapes_are_refused_without_fallback(saved):
  other = _state(0)
  other['params']['w'] = jnp.zeros((2048,))
  c = ckpt_lib.Checkpointer(saved, keep=3)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r'step 3 .*params/w: saved \(4096,\), expected '
                     r'\(2048,\)'):
    c.restore_latest(_abstract(other), _iterator(),
                     warn=lambda m: pytest.fail(m))
  c.close()
  assert fu.committed_steps(saved) == [1, 2, 3]


def test_another_process_count_is_refused_without_fallback(saved):
  for step in (1, 2, 3):  # As if saved by two processes.
    data_dir = saved / str(step) / 'data'
    (data_dir / 'process_0-of-1.json').rename(data_dir / 'process_0-of-2.json')
    (data_dir / 'process_1-of-2.json').write_text('{}')
    integrity.write_manifest(saved / str(step))
  c = ckpt_lib.Checkpointer(saved, keep=3)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r'step 3 .* saved by 2 process\(es\), this run has '
                     r'1: resume refused'):
    c.restore_latest(_abstract(_state(0)), _iterator(),
                     warn=lambda m: pytest.fail(m))
  c.close()
  assert fu.committed_steps(saved) == [1, 2, 3]


def test_checkpoints_without_manifest_still_restore(saved):
  (saved / '3' / integrity.MANIFEST).unlink()
  c = ckpt_lib.Checkpointer(saved, keep=3)
  assert c.verify(3) is False
  c.close()
  state, _ = _restore(saved, 3)
  np.testing.assert_array_equal(state['params']['w'], _state(3)['params']['w'])


def test_set_aside(tmp_path):
  assert ckpt_lib.set_aside(tmp_path / 'none', 'replaced') is None
  (tmp_path / 'c' / '5').mkdir(parents=True)
  moved = ckpt_lib.set_aside(tmp_path / 'c', 'replaced')
  assert moved.name.startswith('c.replaced-') and (moved / '5').is_dir()
  assert not (tmp_path / 'c').exists()


def test_donating_step_during_in_flight_async_save(tmp_path, monkeypatch):
  """The write of the arrays is held back 1.5 s after ``save`` returns while a
  jitted step donates and overwrites the saved buffers; the checkpoint still
  holds the values at save time."""
  module, name = compat.orbax_array_writer()
  monkeypatch.setattr(module, name, fu.slowed(getattr(module, name), 1.5))
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 3 + 1, s),
                 donate_argnums=0)
  state = _state(7)
  expected = jax.tree.map(np.array, state)
  c = ckpt_lib.Checkpointer(tmp_path / 'checkpoints', keep=2)
  t0 = time.perf_counter()
  c.save(7, state, _iterator(70))
  returned = time.perf_counter() - t0
  for _ in range(5):
    state = step(state)
    jax.block_until_ready(state)
  assert not np.array_equal(state['params']['w'], expected['params']['w'])
  c.wait()
  assert time.perf_counter() - t0 >= 1.5 > returned  # It was in flight.
  c.close()
  got, position = _restore(tmp_path / 'checkpoints', 7, keep=2)
  fu.assert_same_arrays(fu.flat_arrays(got), fu.flat_arrays(expected),
                        'checkpoint vs state at save time')
  assert position == 70


# ------------------------------------------------------- non-finite steps --

@pytest.fixture(scope='module')
def tiny_setup():
  config = load_config('configs/tiny.yaml', [
      'model.d_model=64', 'model.n_layers=2', 'model.d_ff=176',
      'model.vocab_size=512', 'data.seq_len=64', 'data.batch_size=8'])
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  setup = make_setup(config, mesh, tx, schedule)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 512, (8, 65), dtype=np.int32)
  batch = global_batch(setup, {'inputs': tokens[:, :-1],
                               'targets': tokens[:, 1:]})
  init = jax.tree.map(np.array, setup.init_params(0))
  return setup, batch, make_train_step(setup), init


def _run_step(setup, step_fn, batch, init, edit=None):
  """One step from initial params edited by ``edit``; returns (params and
  state before as NumPy, params and state after, metrics)."""
  with jax.set_mesh(setup.mesh):
    params = jax.device_put(init, setup.param_shardings)
    if edit is not None:
      params = edit(params)
    opt_state = setup.init_opt_state(params)
    before = jax.tree.map(np.array, (params, opt_state))
    new_params, new_opt, metrics = step_fn(params, opt_state, batch)
    after = jax.tree.map(np.array, (new_params, new_opt))
  return before, after, jax.device_get(metrics)


def _same(a, b) -> bool:
  return all(np.array_equal(x, y, equal_nan=True) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _set(params, path, fn):
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = fn(node[path[-1]])
  return params


@pytest.mark.parametrize('case', ['finite', 'nan_param', 'inf_embedding'])
def test_non_finite_loss_or_gradient_skips_the_update(tiny_setup, case):
  setup, batch, step_fn, init = tiny_setup
  token = int(np.asarray(batch['inputs'])[0, 0])
  edit = {
      'finite': None,
      'nan_param': lambda p: _set(p, ('lm_head', 'kernel'),
                                  lambda k: k.at[3, 7].set(jnp.nan)),
      'inf_embedding': lambda p: _set(p, ('embed', 'embedding'),
                                      lambda e: e.at[token].set(jnp.inf)),
  }[case]
  before, after, metrics = _run_step(setup, step_fn, batch, init, edit)
  if case == 'finite':
    assert metrics['skipped'] == 0 and np.isfinite(metrics['loss'])
    assert not _same(before, after)  # (lr is 0 at step 1: state moves.)
  else:
    assert metrics['skipped'] == 1
    assert not (np.isfinite(metrics['loss']) and
                np.isfinite(metrics['grad_norm']))
    assert _same(before, after)  # Params and optimizer state unchanged.


def test_optimizer_making_nan_from_finite_gradients_is_skipped(tiny_setup):
  """Finite loss and gradients, but the update is NaN: the new params are
  checked too, so the state is not poisoned."""
  setup, batch, _, init = tiny_setup
  nan_update = optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None: (jax.tree.map(lambda x: x * jnp.nan, u), s))
  tx = optax.chain(setup.tx, nan_update)
  bad = make_setup(setup.config, setup.mesh, tx, setup.schedule)
  before, after, metrics = _run_step(bad, make_train_step(bad), batch, init)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  assert metrics['skipped'] == 1
  assert _same(before, after)


EXTREME = {
    'zeros': lambda shape, dt: jnp.zeros(shape, dt),
    'zero_columns': lambda shape, dt: jnp.ones(shape, dt).at[..., ::2].set(0),
    'tiny': lambda shape, dt: jnp.full(shape, 1e-30, dt),  # squares underflow
    'subnormal': lambda shape, dt: jnp.full(shape, jnp.finfo(dt).smallest_subnormal, dt),
    'huge': lambda shape, dt: jnp.full(shape, 1e30, dt),  # squares overflow
    'max': lambda shape, dt: jnp.full(shape, jnp.finfo(dt).max, dt).at[0].multiply(-1),
}


_SCALE = scale_optax.scale(1e-3, weight_decay=0.1)
_SCALE_UPDATE = jax.jit(_SCALE.update)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('kind', list(EXTREME))
def test_scale_never_makes_nan_from_finite_gradients(kind, dtype):
  params = {'embed': {'embedding': jnp.ones((32, 8), dtype)},
            'layers': {'0': {'mlp': {'kernel': jnp.ones((8, 16), dtype)},
                             'norm': {'scale': jnp.ones((8,), dtype)}}},
            'lm_head': {'kernel': jnp.ones((8, 32), dtype)}}
  state = _SCALE.init(params)
  update = _SCALE_UPDATE  # Compiled once per dtype.
  grads = jax.tree.map(lambda p: EXTREME[kind](p.shape, dtype), params)
  assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
      assert jnp.isfinite(u).all(), (kind, path)
      assert u.dtype == dtype
    for path, s in jax.tree_util.tree_leaves_with_path(state):
      assert not jnp.isnan(s).any(), (kind, path)
    assert all(jnp.isfinite(p).all() for p in jax.tree.leaves(params))


# -------------------------------------------------------------- bad data --

ODD_DOCS = (['', '   ', '\n\n', 'caf\xe9 na\xefve \u2603 \U0001F600 text.'] +
            [f'Plain document {i}: the quick brown fox jumps. ' * (1 + i % 4)
             for i in range(40)])
BAD_BYTES = [b'valid start \xff\xfe\xc3( broken utf-8 \x80 end',
             b'\xed\xa0\x80 surrogate', b'']


class OddText(tfds_source.EmbeddedText, skip_registration=True):
  """Empty and whitespace-only documents, non-ASCII text, invalid UTF-8."""
  name = 'odd_text'
  docs = ODD_DOCS

  def documents(self):
    return self.docs

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {'text': BAD_BYTES[i % 3] if i % 5 == 0 else text}


class EmptyText(OddText, skip_registration=True):
  name = 'empty_text'
  docs = [''] * 60

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {'text': text}


def _odd_dataset(tmp_path, builder_cls):
  tfds_source.prepare_builder(builder_cls(data_dir=os.fspath(tmp_path),
                                          file_format='array_record'))
  model = tmp_path / 'spm.model'
  tokenizer_lib.write_atomic(model, tokenizer_lib.train_bpe(
      [d for d in ODD_DOCS if d.strip()], 120))
  return DataConfig(name=builder_cls.name, data_dir=os.fspath(tmp_path),
                    tokenizer=os.fspath(model))


def test_empty_and_invalid_utf8_documents_are_handled(tmp_path):
  ds = data.prepare(_odd_dataset(tmp_path, OddText), vocab_size=128)
  texts = [ds.sources['train'][i]['text'] for i in
           range(ds.num_documents('train'))]
  assert b'' in texts and any(b'\xff' in t for t in texts)
  tokenize = ds.tokenize_fn('train')
  lengths = [len(tokenize(i)) for i in range(len(texts))]
  assert min(lengths) == 1  # An empty document is just EOS.
  it = ds.train_iter(4, 32, seed=0)
  for _ in range(20):  # Several epochs: no hang, no crash, valid ids.
    batch = next(it)
    assert batch['inputs'].shape == (4, 32)
    assert 0 <= batch['inputs'].min() and batch['inputs'].max() < 128
    np.testing.assert_array_equal(batch['inputs'][:, 1:],
                                  batch['targets'][:, :-1])


def test_all_empty_data_set_is_refused(tmp_path):
  config = _odd_dataset(tmp_path, EmptyText)
  ds = data.prepare(config, vocab_size=128)
  with pytest.raises(data.SplitTooSmallError, match=r"Split 'train' has \d+ "
                     r'tokens in \d+ documents, fewer than one batch needs'):
    ds.train_iter(4, 32, seed=0)


# ---------------------------------------------------------------- metrics --

def test_metrics_survive_a_torn_line(tmp_path):
  writer = MetricsWriter(tmp_path)
  for step in range(1, 6):
    writer.write('train', step, loss=float(step))
  writer.close()
  with writer.path.open('a') as f:
    f.write('{"kind": "train", "step": 6, "lo')  # Killed mid-write.
  MetricsWriter(tmp_path).truncate_after(3)
  assert [r['step'] for r in read_records(writer.path)] == [1, 2, 3]
  assert writer.path.read_text().endswith('}\n')
