"""Export to the Hugging Face LLaMA format and back (no torch needed)."""

import dataclasses
import json
import pathlib

import grain
import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import export_test_util as eu
from scale_optax import path_str
from train import export, hf_llama
from train.checkpoint import Checkpointer
from train.config import Config, DataConfig, to_dict
from train.model import Llama


def _export(out, params, config, dtype=None, max_shard_bytes=10**9,
            tokenizer=None):
  return export.write_atomically(pathlib.Path(out), lambda tmp: (
      export.write_hf_model(tmp, params.__getitem__,
                            {p: a.dtype for p, a in params.items()}, config,
                            tokenizer, dtype, max_shard_bytes)))


def _hf_tensors(directory):
  files = sorted(pathlib.Path(directory).glob('*.safetensors'))
  out = {}
  for file in files:
    with safe_open(str(file), framework='np') as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def test_mapping_covers_every_param_with_its_shape():
  config = eu.tiny_config()
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  shapes = {path_str(p): leaf.shape for p, leaf in
            jax.tree_util.tree_flatten_with_path(
                nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}
  assert hf_llama.param_shapes(config) == shapes
  table = hf_llama.tensors(config.n_layers)
  assert sorted(t.path for t in table) == sorted(shapes)
  assert len({t.hf_name for t in table}) == len(table)


@pytest.mark.parametrize('param_dtype,shard_bytes', [
    ('float32', 10**9), ('bfloat16', 20_000)])
def test_round_trip_keeps_every_weight_and_the_logits_bitwise(
    tmp_path, param_dtype, shard_bytes):
  config = eu.tiny_config(param_dtype=param_dtype)
  params = eu.random_params(config, seed=3)
  out = _export(tmp_path / 'hf', params, config, max_shard_bytes=shard_bytes)
  written = {p.name for p in out.iterdir()}
  if shard_bytes < 10**9:
    assert hf_llama.INDEX_FILE in written
    assert len([n for n in written if n.endswith('.safetensors')]) > 2
  else:
    assert written == {'config.json', hf_llama.SINGLE_FILE}
  loaded = hf_llama.load_params(out, config, eu.abstract_params(config))
  flat = {path_str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(loaded)[0]}
  assert flat.keys() == params.keys()
  for path, value in params.items():
    assert flat[path].dtype == value.dtype, path
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  tokens = eu.tokens(config)
  before = eu.logits(eu.model_with(config, params), tokens)
  after = eu.logits(eu.model_with(config, flat), tokens)
  assert np.array_equal(before, after)


def test_export_uses_hugging_face_names_layouts_and_config(tmp_path):
  config = eu.tiny_config()
  params = eu.random_params(config)
  out = _export(tmp_path / 'hf', params, config)
  hf = _hf_tensors(out)
  assert len(hf) == 3 + 9 * config.n_layers
  np.testing.assert_array_equal(hf['model.embed_tokens.weight'],
                                params['embed/embedding'])
  np.testing.assert_array_equal(hf['lm_head.weight'],
                                params['lm_head/kernel'].T)
  np.testing.assert_array_equal(hf['model.layers.1.self_attn.q_proj.weight'],
                                params['layers/1/attn/q_proj/kernel'].T)
  np.testing.assert_array_equal(hf['model.layers.0.mlp.down_proj.weight'],
                                params['layers/0/mlp/down_proj/kernel'].T)
  np.testing.assert_array_equal(
      hf['model.layers.1.post_attention_layernorm.weight'],
      params['layers/1/mlp_norm/scale'])
  np.testing.assert_array_equal(hf['model.norm.weight'],
                                params['final_norm/scale'])
  cfg = json.loads((out / 'config.json').read_text())
  assert cfg['architectures'] == ['LlamaForCausalLM']
  assert (cfg['vocab_size'], cfg['hidden_size'], cfg['intermediate_size'],
          cfg['num_hidden_layers'], cfg['num_attention_heads'],
          cfg['num_key_value_heads'], cfg['head_dim']) == (96, 32, 80, 2, 4, 4,
                                                           8)
  assert cfg['rope_theta'] == cfg['rope_parameters']['rope_theta'] == 500.0
  assert cfg['rms_norm_eps'] == 1e-5 and cfg['max_position_embeddings'] == 64
  assert cfg['tie_word_embeddings'] is False
  assert cfg['torch_dtype'] == cfg['dtype'] == 'float32'


def test_dtype_option_casts_the_stored_weights(tmp_path):
  config = eu.tiny_config()
  params = eu.random_params(config)
  out = _export(tmp_path / 'hf', params, config, dtype='bfloat16')
  hf = _hf_tensors(out)
  assert hf['lm_head.weight'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      hf['lm_head.weight'],
      params['lm_head/kernel'].T.astype(ml_dtypes.bfloat16))
  assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'


def test_tied_hugging_face_model_imports_the_embedding_as_head(tmp_path):
  config = eu.tiny_config()
  params = eu.random_params(config)
  out = _export(tmp_path / 'hf', params, config)
  hf = _hf_tensors(out)
  del hf['lm_head.weight']
  save_file(hf, out / hf_llama.SINGLE_FILE, metadata={'format': 'pt'})
  cfg = json.loads((out / 'config.json').read_text())
  (out / 'config.json').write_text(json.dumps(
      {**cfg, 'tie_word_embeddings': True}))
  read = hf_llama.open_hf(out, config)
  np.testing.assert_array_equal(read('lm_head/kernel'),
                                params['embed/embedding'].T)


# ----------------------------------------------------- import: bad input --


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  config = eu.tiny_config()
  return _export(tmp_path_factory.mktemp('hf') / 'model',
                 eu.random_params(config), config), config


def _copy_with(exported_dir, tmp_path, config_changes=None, tensors=None):
  """A copy of the export with config.json fields and tensors replaced."""
  out = tmp_path / 'changed'
  out.mkdir()
  cfg = json.loads((exported_dir / 'config.json').read_text())
  cfg.update(config_changes or {})
  (out / 'config.json').write_text(json.dumps(cfg))
  hf = _hf_tensors(exported_dir)
  hf.update(tensors or {})
  save_file({k: v for k, v in hf.items() if v is not None},
            out / hf_llama.SINGLE_FILE, metadata={'format': 'pt'})
  return out


@pytest.mark.parametrize('changes,message', [
    ({'intermediate_size': 96},
     'intermediate_size=96 (expected 80: model.d_ff)'),
    ({'num_key_value_heads': 2}, 'grouped-query attention'),
    ({'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 500.0}},
     "rope type='llama3'"),
    ({'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2'},
     "architecture ['GPT2LMHeadModel'] is not LlamaForCausalLM"),
])
def test_import_refuses_another_architecture_or_shape(exported, tmp_path,
                                                      changes, message):
  directory, config = exported
  changed = _copy_with(directory, tmp_path, config_changes=changes)
  with pytest.raises(hf_llama.HFFormatError) as e:
    hf_llama.open_hf(changed, config)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_import_names_a_tensor_of_the_wrong_shape_or_missing(exported,
                                                             tmp_path):
  directory, config = exported
  gate = 'model.layers.1.mlp.gate_proj.weight'
  changed = _copy_with(directory, tmp_path, tensors={
      gate: np.zeros((32, 80), np.float32),
      'model.layers.0.self_attn.k_proj.weight': None,
      'model.norm.weight': np.ones(32, np.int32),
      'model.extra.weight': np.zeros((2,), np.float32)})
  with pytest.raises(hf_llama.HFFormatError) as e:
    hf_llama.open_hf(changed, config)
  text = str(e.value)
  assert f'{gate}: shape [32, 80], expected [80, 32]' in text
  assert 'model.layers.0.self_attn.k_proj.weight: missing' in text
  assert 'model.extra.weight: not a parameter of this model' in text
  assert 'model.norm.weight: dtype I32, not a float' in text


def test_import_of_a_directory_without_a_model(tmp_path):
  with pytest.raises(hf_llama.HFFormatError, match='no config.json'):
    hf_llama.open_hf(tmp_path, eu.tiny_config())


@pytest.mark.parametrize('saved', ['nothing', 'no_params'])
def test_checkpoint_without_parameters_is_named(tmp_path, saved):
  import orbax.checkpoint as ocp
  step_dir = tmp_path / '7'
  if saved == 'no_params':
    ocp.PyTreeCheckpointer().save(step_dir / 'state',
                                  {'opt_state': {'count': np.zeros(())}})
  else:
    (step_dir / 'state').mkdir(parents=True)
  with pytest.raises(export.ExportError,
                     match=f'checkpoint {step_dir} has no readable parameters'):
    export.CheckpointParams(step_dir, eu.tiny_config())


# ------------------------------------------- python -m train.export CLI --


def _stack(params):
  """``layers/<i>/<name>`` entries stacked as ``layers/<name>`` [L, ...]."""
  out, layers = {}, {}
  for path, value in params.items():
    parts = hf_llama.stacked_path(path)
    if parts:
      layers.setdefault(parts[0], {})[parts[1]] = value
    else:
      out[path] = value
  out.update({leaf: np.stack([by_index[i] for i in range(len(by_index))])
              for leaf, by_index in layers.items()})
  return out


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _save_run(root: pathlib.Path, model_config, steps, tokenizer: bytes,
              stacked=False):
  root.mkdir(exist_ok=True)
  (root / 'tok.model').write_bytes(tokenizer)
  config = dataclasses.replace(
      Config(), model=model_config,
      data=DataConfig(tokenizer=str(root / 'tok.model'), seq_len=32))
  config = dataclasses.replace(
      config, train=dataclasses.replace(config.train, run_dir=str(root)))
  (root / 'config.yaml').write_text(yaml.safe_dump(to_dict(config)))
  checkpointer = Checkpointer(root / 'checkpoints', keep=5, async_save=False)
  saved = {}
  for step in steps:
    params = eu.random_params(
        dataclasses.replace(model_config, scan_layers=False), seed=step)
    state = {'params': _nest(_stack(params) if stacked else params),
             'opt_state': {'mu': np.zeros(3, np.float32)},
             'step': np.int32(step), 'rng': np.zeros(2, np.uint32)}
    checkpointer.save(step, state,
                      iter(grain.MapDataset.range(10).to_iter_dataset()))
    saved[step] = params
  checkpointer.close()
  return saved


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('run')
  saved = _save_run(root, eu.tiny_config(), (1, 2), eu.tiny_tokenizer())
  return root, saved


def _main(capsys, *args):
  code = export.main([str(a) for a in args])
  return code, capsys.readouterr().err.strip()


def test_cli_exports_the_latest_or_a_given_step(run, tmp_path, capsys):
  root, saved = run
  config = eu.tiny_config()
  for step, out in ((None, tmp_path / 'latest'), (1, tmp_path / 'one')):
    args = ['--run-dir', root, '--out', out] + (['--step', step] if step
                                                 else [])
    assert _main(capsys, *args) == (0, '')
    read = hf_llama.open_hf(out, config)
    for path, value in saved[step or 2].items():
      np.testing.assert_array_equal(read(path), value, err_msg=path)
  assert not list(tmp_path.glob('.*partial*'))


def test_cli_writes_the_tokenizer_and_its_special_ids(run, tmp_path, capsys):
  root, _ = run
  out = tmp_path / 'hf'
  assert _main(capsys, '--run-dir', root, '--out', out)[0] == 0
  assert (out / 'tokenizer.model').read_bytes() == (
      root / 'tok.model').read_bytes()
  tok = json.loads((out / 'tokenizer_config.json').read_text())
  assert tok['tokenizer_class'] == 'LlamaTokenizer'
  assert (tok['eos_token'], tok['pad_token'], tok['unk_token']) == (
      '</s>', '<pad>', '<unk>')
  assert tok['add_bos_token'] is False and tok['bos_token'] is None
  cfg = json.loads((out / 'config.json').read_text())
  assert (cfg['bos_token_id'], cfg['eos_token_id'], cfg['pad_token_id']) == (
      None, 1, 0)
  special = json.loads((out / 'special_tokens_map.json').read_text())
  assert special['eos_token'] == '</s>'


def test_cli_bad_inputs_exit_1_with_one_line_and_write_nothing(
    run, tmp_path, capsys):
  root, _ = run
  out = tmp_path / 'out'
  empty_run = tmp_path / 'empty_run'
  empty_run.mkdir()
  (empty_run / 'config.yaml').write_text((root / 'config.yaml').read_text())
  cases = [
      (['--run-dir', tmp_path / 'nowhere'], 'is not a run directory'),
      (['--run-dir', empty_run], 'has no checkpoint'),
      (['--run-dir', root, '--step', 7],
       'has no checkpoint at step 7 (it has 1, 2)'),
      (['--run-dir', root, '--tokenizer', tmp_path / 'none.model'],
       'none.model'),
  ]
  for args, message in cases:
    code, err = _main(capsys, *args, '--out', out)
    assert code == 1 and message in err and '\n' not in err, (args, err)
    assert not out.exists()
  assert list(tmp_path.iterdir()) == [empty_run]


def test_cli_refuses_to_overwrite_and_bad_sizes(run, tmp_path, capsys):
  root, _ = run
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('mine')
  code, err = _main(capsys, '--run-dir', root, '--out', tmp_path / 'out')
  assert code == 1 and 'already exists' in err
  assert [p.name for p in (tmp_path / 'out').iterdir()] == ['keep.txt']
  with pytest.raises(SystemExit) as e:
    export.main(['--run-dir', str(root), '--out', str(tmp_path / 'x'),
                 '--max-shard-size', 'lots'])
  assert e.value.code == 2


def test_a_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
  root, _ = run
  calls = []

  def failing_read(self, path):
    calls.append(path)
    if len(calls) == 5:
      raise OSError('disk full')
    return original(self, path)

  original = export.CheckpointParams.read
  monkeypatch.setattr(export.CheckpointParams, 'read', failing_read)
  with pytest.raises(OSError, match='disk full'):
    export.export_run(root, tmp_path / 'out', max_shard_bytes=10_000)
  assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_layout_other_than_the_config_or_corrupt(
    run, tmp_path, capsys):
  root, _ = run
  scanned = tmp_path / 'scanned'
  scanned.mkdir()
  raw = yaml.safe_load((root / 'config.yaml').read_text())
  raw['model']['scan_layers'] = True
  (scanned / 'config.yaml').write_text(yaml.safe_dump(raw))
  (scanned / 'checkpoints').symlink_to(root / 'checkpoints')
  code, err = _main(capsys, '--run-dir', scanned, '--out', tmp_path / 'a')
  assert code == 1 and ('holds unrolled layers, its config.yaml has '
                        'model.scan_layers=true') in err

  corrupt = tmp_path / 'corrupt'
  _save_run(corrupt, eu.tiny_config(), (3,), eu.tiny_tokenizer())
  chunk = max((p for p in (corrupt / 'checkpoints' / '3' / 'state').rglob('*')
               if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0xFF
  chunk.write_bytes(bytes(data))
  code, err = _main(capsys, '--run-dir', corrupt, '--out', tmp_path / 'b')
  assert code == 1 and 'is corrupt' in err and 'SHA-256' in err
  assert not (tmp_path / 'b').exists()


def test_checkpoint_of_another_model_is_refused(run, tmp_path, capsys):
  root, _ = run
  other = tmp_path / 'other'
  other.mkdir()
  raw = yaml.safe_load((root / 'config.yaml').read_text())
  raw['model']['d_ff'] = 96
  (other / 'config.yaml').write_text(yaml.safe_dump(raw))
  (other / 'checkpoints').symlink_to(root / 'checkpoints')
  code, err = _main(capsys, '--run-dir', other, '--out', tmp_path / 'a')
  assert code == 1 and 'does not hold the model of its config.yaml' in err
  assert 'layers/0/mlp/gate_proj/kernel: shape [32, 80], expected [32, 96]' \
      in err


def test_stacked_checkpoint_exports_the_same_files(run, tmp_path, capsys,
                                                   monkeypatch):
  # model.scan_layers saves each block param once, [n_layers, ...].
  root, _ = run
  stacked = tmp_path / 'stacked'
  _save_run(stacked, eu.tiny_config(scan_layers=True), (2,),
            eu.tiny_tokenizer(), stacked=True)
  restored = []
  original = export.CheckpointParams._restore  # pylint: disable=protected-access
  monkeypatch.setattr(export.CheckpointParams, '_restore',
                      lambda self, path: restored.append(path) or
                      original(self, path))
  for source, out in ((root, tmp_path / 'a'), (stacked, tmp_path / 'b')):
    restored.clear()
    assert _main(capsys, '--run-dir', source, '--out', out,
                 '--max-shard-size', '40KB') == (0, '')
    assert len(restored) == len(set(restored))  # Each leaf read once.
  assert len(restored) == 3 + len(hf_llama.LAYER_TENSORS)
  unrolled, scanned = _hf_tensors(tmp_path / 'a'), _hf_tensors(tmp_path / 'b')
  assert unrolled.keys() == scanned.keys()
  for name, value in unrolled.items():
    np.testing.assert_array_equal(scanned[name], value, err_msg=name)
  index = json.loads((tmp_path / 'b' / hf_llama.INDEX_FILE).read_text())
  assert index['weight_map'].keys() == unrolled.keys()


def test_scanned_model_imports_and_exports_the_same_weights(exported,
                                                            tmp_path):
  directory, config = exported
  scanned = eu.tiny_config(scan_layers=True)
  expected = _stack(eu.random_params(config))  # What `exported` holds.
  loaded = hf_llama.load_params(directory, scanned,
                                eu.abstract_params(scanned))
  flat = {path_str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(loaded)[0]}
  assert flat.keys() == expected.keys()
  assert flat['layers/attn/q_proj/kernel'].shape == (config.n_layers, 32, 32)
  for path, value in expected.items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  tokens = eu.tokens(config)
  np.testing.assert_allclose(
      eu.logits(eu.model_with(scanned, flat), tokens),
      eu.logits(eu.model_with(config, eu.random_params(config)), tokens),
      rtol=1e-5, atol=1e-5)
