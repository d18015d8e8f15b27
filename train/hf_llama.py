"""The Hugging Face LLaMA format: names, layouts, config, safetensors, tokenizer.

A :class:`~train.model.Llama` maps one to one onto ``transformers``'
``LlamaForCausalLM`` with ``num_key_value_heads == num_attention_heads``, no
biases, untied embeddings and plain rotary embeddings in the half-split
("rotate_half") layout both use, so the weights move unchanged; only the
matrices change layout (this project's kernels are ``[in, out]``, Hugging
Face's ``weight`` is ``[out, in]``)::

  embed/embedding                  model.embed_tokens.weight                  [V, d]
  layers/<i>/attn_norm/scale       model.layers.<i>.input_layernorm.weight    [d]
  layers/<i>/attn/q_proj/kernel    model.layers.<i>.self_attn.q_proj.weight   transposed
  ... k_proj, v_proj, o_proj       ... k_proj, v_proj, o_proj                 transposed
  layers/<i>/mlp_norm/scale        model.layers.<i>.post_attention_layernorm.weight
  layers/<i>/mlp/gate_proj/kernel  model.layers.<i>.mlp.gate_proj.weight      transposed
  ... up_proj, down_proj           ... up_proj, down_proj                     transposed
  final_norm/scale                 model.norm.weight                          [d]
  lm_head/kernel                   lm_head.weight                             transposed

The mapping is per layer (:data:`LAYER_TENSORS`), so a layout that stacks the
blocks on a leading axis reads layer ``i`` as a slice.

Numerics: in float32 the two models compute the same function (RMSNorm in
float32 times the weight, rotary angles ``p * theta ** (-2j / H)``, softmax
attention scaled by ``1/sqrt(H)``, SwiGLU), equal to float32 rounding. With a
bfloat16 compute dtype they differ by bfloat16 roundings: Hugging Face runs
the residual stream in the weights' dtype and multiplies the RMSNorm weight
after casting the normalized activations to it; this model multiplies in
float32 and keeps the LM head's accumulation in float32.

This module needs NumPy, ``ml_dtypes`` and ``safetensors`` (and JAX for
:func:`load_params`), not torch, orbax or the data pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_dtypes  # pylint: disable=unused-import  (registers bfloat16 with NumPy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import ModelConfig
from .errors import RunError


class HFFormatError(RunError):
  """A Hugging Face directory that does not hold this model (one line)."""


ARCHITECTURE = 'LlamaForCausalLM'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Weights that old Hugging Face LLaMA checkpoints carry but that hold no
# parameters (the rotary frequencies, recomputed from rope_theta).
_IGNORED = re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq')
_FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')  # safetensors' names


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter in both formats."""
  path: str        # this project's path, '/'-joined (``layers/0/attn/...``)
  hf_name: str     # Hugging Face's name
  transposed: bool  # [in, out] here, [out, in] there


# (path under layers/<i>/, name under model.layers.<i>., transposed)
LAYER_TENSORS = (
    ('attn_norm/scale', 'input_layernorm.weight', False),
    ('attn/q_proj/kernel', 'self_attn.q_proj.weight', True),
    ('attn/k_proj/kernel', 'self_attn.k_proj.weight', True),
    ('attn/v_proj/kernel', 'self_attn.v_proj.weight', True),
    ('attn/o_proj/kernel', 'self_attn.o_proj.weight', True),
    ('mlp_norm/scale', 'post_attention_layernorm.weight', False),
    ('mlp/gate_proj/kernel', 'mlp.gate_proj.weight', True),
    ('mlp/up_proj/kernel', 'mlp.up_proj.weight', True),
    ('mlp/down_proj/kernel', 'mlp.down_proj.weight', True),
)


def layer_tensors(i: int) -> list[Tensor]:
  """The tensors of block ``i``."""
  return [Tensor(f'layers/{i}/{sub}', f'model.layers.{i}.{name}', t)
          for sub, name, t in LAYER_TENSORS]


def tensors(n_layers: int, layer_major: bool = True) -> list[Tensor]:
  """Every parameter in file order: embedding, blocks, final norm, head.

  The blocks come layer by layer (Hugging Face's order), or with
  ``layer_major=False`` kind by kind (every layer's ``q_proj``, then every
  ``k_proj``...): the order that reads each leaf of a stacked checkpoint once.
  """
  blocks = [layer_tensors(i) for i in range(n_layers)]
  groups = blocks if layer_major else list(zip(*blocks))
  return ([Tensor('embed/embedding', 'model.embed_tokens.weight', False)]
          + [t for group in groups for t in group]
          + [Tensor('final_norm/scale', 'model.norm.weight', False),
             Tensor('lm_head/kernel', 'lm_head.weight', True)])


_LAYER_PATH = re.compile(r'layers/(\d+)/(.+)')


def stacked_path(path: str) -> Optional[tuple[str, int]]:
  """``layers/3/attn/q_proj/kernel`` -> ``('layers/attn/q_proj/kernel', 3)``:
  the leaf and index of a block param in the stacked (``model.scan_layers``)
  layout; None for a param outside the blocks."""
  match = _LAYER_PATH.fullmatch(path)
  return (f'layers/{match.group(2)}', int(match.group(1))) if match else None


def is_stacked(paths: Iterable[str]) -> bool:
  """Whether param ``paths`` hold the blocks stacked on a leading axis."""
  return any(p.startswith('layers/') and not _LAYER_PATH.fullmatch(p)
             for p in paths)


def param_shapes(config: ModelConfig, stacked: bool = False
                 ) -> dict[str, tuple[int, ...]]:
  """This project's parameter shapes by path, from the config alone.

  ``stacked``: the blocks' params as ``layers/<name>`` with a leading axis of
  ``n_layers`` (``model.scan_layers``), instead of ``layers/<i>/<name>``.
  """
  v, d, f = config.vocab_size, config.d_model, config.d_ff
  layer = {'attn_norm/scale': (d,), 'attn/q_proj/kernel': (d, d),
           'attn/k_proj/kernel': (d, d), 'attn/v_proj/kernel': (d, d),
           'attn/o_proj/kernel': (d, d), 'mlp_norm/scale': (d,),
           'mlp/gate_proj/kernel': (d, f), 'mlp/up_proj/kernel': (d, f),
           'mlp/down_proj/kernel': (f, d)}
  shapes = {'embed/embedding': (v, d), 'final_norm/scale': (d,),
            'lm_head/kernel': (d, v)}
  if stacked:
    shapes.update({f'layers/{k}': (config.n_layers,) + s
                   for k, s in layer.items()})
  else:
    for i in range(config.n_layers):
      shapes.update({f'layers/{i}/{k}': s for k, s in layer.items()})
  return shapes


def hf_shape(tensor: Tensor, shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(reversed(shape)) if tensor.transposed else tuple(shape)


# ---------------------------------------------------------------- config.json


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids of the tokenizer (None: the tokenizer has no such token)."""
  bos: Optional[int] = None
  eos: Optional[int] = None
  pad: Optional[int] = None


def hf_config(config: ModelConfig, dtype: str,
              ids: SpecialIds = SpecialIds()) -> dict[str, Any]:
  """``config.json`` of ``LlamaForCausalLM`` for this model.

  Both spellings of the rope base and the dtype are written: ``rope_theta``
  and ``torch_dtype`` (transformers 4), ``rope_parameters`` and ``dtype``
  (transformers 5).
  """
  return {
      'architectures': [ARCHITECTURE],
      'model_type': 'llama',
      'vocab_size': config.vocab_size,
      'hidden_size': config.d_model,
      'intermediate_size': config.d_ff,
      'num_hidden_layers': config.n_layers,
      'num_attention_heads': config.n_heads,
      'num_key_value_heads': config.n_heads,
      'head_dim': config.d_model // config.n_heads,
      'hidden_act': 'silu',
      'max_position_embeddings': config.max_seq_len,
      'initializer_range': config.init_std,
      'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_theta,
      'rope_scaling': None,
      'rope_parameters': {'rope_type': 'default',
                          'rope_theta': config.rope_theta},
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'pretraining_tp': 1,
      'tie_word_embeddings': False,
      'use_cache': True,
      'bos_token_id': ids.bos,
      'eos_token_id': ids.eos,
      'pad_token_id': ids.pad,
      'torch_dtype': dtype,
      'dtype': dtype,
  }


def _rope_type(hf: Mapping[str, Any]) -> str:
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  return params.get('rope_type', params.get('type', 'default'))


def _rope_theta(hf: Mapping[str, Any]) -> Any:
  params = hf.get('rope_parameters') or {}
  return params.get('rope_theta', hf.get('rope_theta', 10000.0))


def check_hf_config(hf: Mapping[str, Any], config: ModelConfig,
                    where: str) -> None:
  """Raises :class:`HFFormatError` unless ``hf`` describes this model.

  One line lists every mismatching field next to the run's config key.
  """
  arch = hf.get('architectures') or []
  if ARCHITECTURE not in arch and hf.get('model_type') != 'llama':
    raise HFFormatError(f'{where}: architecture {arch or hf.get("model_type")}'
                        f' is not {ARCHITECTURE}.')
  heads = hf.get('num_attention_heads')
  expected = [
      ('vocab_size', hf.get('vocab_size'), 'model.vocab_size',
       config.vocab_size),
      ('hidden_size', hf.get('hidden_size'), 'model.d_model', config.d_model),
      ('intermediate_size', hf.get('intermediate_size'), 'model.d_ff',
       config.d_ff),
      ('num_hidden_layers', hf.get('num_hidden_layers'), 'model.n_layers',
       config.n_layers),
      ('num_attention_heads', heads, 'model.n_heads', config.n_heads),
      ('num_key_value_heads', hf.get('num_key_value_heads', heads),
       'model.n_heads (grouped-query attention is not supported)',
       config.n_heads),
      ('head_dim', hf.get('head_dim') or config.d_model // config.n_heads,
       'model.d_model / model.n_heads', config.d_model // config.n_heads),
      ('rms_norm_eps', hf.get('rms_norm_eps'), 'model.norm_eps',
       config.norm_eps),
      ('rope_theta', _rope_theta(hf), 'model.rope_theta', config.rope_theta),
      ('rope type', _rope_type(hf), 'plain rotary embeddings', 'default'),
      ('hidden_act', hf.get('hidden_act', 'silu'), 'SwiGLU', 'silu'),
      ('attention_bias', hf.get('attention_bias', False), 'no biases', False),
      ('mlp_bias', hf.get('mlp_bias', False), 'no biases', False),
  ]
  problems = [f'{name}={value!r} (expected {want!r}: {key})'
              for name, value, key, want in expected if value != want]
  if problems:
    raise HFFormatError(f'{where} does not match the model: '
                        + '; '.join(problems) + '.')


# ---------------------------------------------------------------- safetensors


def parse_size(text: str) -> int:
  """``'5GB'`` -> 5e9 bytes (also KB, MB, KiB, MiB, GiB, or plain bytes)."""
  units = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9,
           'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*', str(text))
  if not match or match.group(2).upper() not in units:
    raise ValueError(f'size {text!r}: expected a number with an optional unit '
                     f'(B, KB, MB, GB, KiB, MiB, GiB), e.g. 5GB.')
  size = int(float(match.group(1)) * units[match.group(2).upper()])
  if size <= 0:
    raise ValueError(f'size {text!r} must be positive.')
  return size


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int
                ) -> list[list[str]]:
  """Groups named tensors, in order, into files of at most ``max_bytes``.

  A tensor larger than the limit gets a file of its own.
  """
  shards: list[list[str]] = [[]]
  used = 0
  for name, size in sizes:
    if shards[-1] and used + size > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  return shards


def write_weights(out_dir: pathlib.Path, specs: Sequence[tuple[str, Any]],
                  read: Callable[[str], np.ndarray], max_shard_bytes: int
                  ) -> list[str]:
  """Writes the safetensors file(s), and the index when there are several.

  Args:
    out_dir: an existing directory.
    specs: ``(hf_name, (shape, dtype))`` for every tensor, in file order.
    read: ``hf_name -> np.ndarray`` in Hugging Face layout; called once per
      tensor, one shard at a time, so at most one shard is held in memory.
    max_shard_bytes: the size limit of one file.

  Returns:
    The file names written.
  """
  nbytes = {name: math.prod(shape) * np.dtype(dtype).itemsize
            for name, (shape, dtype) in specs}
  shards = plan_shards(list(nbytes.items()), max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
            for k in range(len(shards))])
  mode = _file_mode()
  for file, shard in zip(names, shards):
    save_file({name: np.ascontiguousarray(read(name)) for name in shard},
              out_dir / file, metadata={'format': 'pt'})
    (out_dir / file).chmod(mode)  # safetensors creates files as 0600.
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(nbytes.values())},
             'weight_map': {name: file for file, shard in zip(names, shards)
                            for name in shard}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n')
    names.append(INDEX_FILE)
  return names


def _file_mode() -> int:
  """The mode ``open()`` gives a new file under the current umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


class HFWeights:
  """The safetensors weights of a Hugging Face directory, read lazily."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    index = directory / INDEX_FILE
    if index.is_file():
      try:
        self.files = dict(json.loads(index.read_text())['weight_map'])
      except (ValueError, KeyError, TypeError) as e:
        raise HFFormatError(f'{index} is not a safetensors index '
                            f'({type(e).__name__}: {e}).') from None
    elif (directory / SINGLE_FILE).is_file():
      with self._open(SINGLE_FILE) as f:
        self.files = {name: SINGLE_FILE for name in f.keys()}
    else:
      raise HFFormatError(f'{directory} has neither {SINGLE_FILE} nor '
                          f'{INDEX_FILE} (only safetensors weights are read).')

  def _open(self, file: str):
    path = self.directory / file
    try:
      return safe_open(os.fspath(path), framework='np')
    except Exception as e:  # safetensors raises its own error types.
      raise HFFormatError(f'{path} is not a readable safetensors file '
                          f'({type(e).__name__}: {e}).') from None

  def header(self, name: str) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype)`` of a tensor, without reading it (dtype as ``F32``)."""
    with self._open(self.files[name]) as f:
      view = f.get_slice(name)
      return tuple(view.get_shape()), view.get_dtype()

  def read(self, name: str) -> np.ndarray:
    with self._open(self.files[name]) as f:
      return f.get_tensor(name)


# ------------------------------------------------------------------ tokenizer


def tokenizer_files(model_proto: bytes, max_length: int
                    ) -> tuple[dict[str, bytes], SpecialIds]:
  """The files that load a SentencePiece model as a ``LlamaTokenizer``.

  The trainer encodes documents as their pieces followed by EOS, with no BOS,
  so the tokenizer adds neither.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  ids = SpecialIds(bos=sp.bos_id() if sp.bos_id() >= 0 else None,
                   eos=sp.eos_id() if sp.eos_id() >= 0 else None,
                   pad=sp.pad_id() if sp.pad_id() >= 0 else None)
  special = {'bos_token': piece(sp.bos_id()), 'eos_token': piece(sp.eos_id()),
             'unk_token': piece(sp.unk_id()), 'pad_token': piece(sp.pad_id())}
  # A missing token is written as null: left out, LlamaTokenizer would add
  # its default ('<s>') to the vocabulary.
  config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False,
            'add_eos_token': False, 'legacy': True, 'sp_model_kwargs': {},
            'model_max_length': max_length,
            'clean_up_tokenization_spaces': False, **special}
  special = {k: v for k, v in special.items() if v is not None}
  dump = lambda x: (json.dumps(x, indent=2) + '\n').encode()
  return ({'tokenizer.model': model_proto,
           'tokenizer_config.json': dump(config),
           'special_tokens_map.json': dump(special)}, ids)


# -------------------------------------------------------------------- import


def open_hf(directory: str | os.PathLike, config: ModelConfig
            ) -> Callable[[str], np.ndarray]:
  """Checks a Hugging Face LLaMA directory against ``config``; returns a reader.

  Everything is checked before any weight is read: ``config.json`` field by
  field, then every tensor's name and shape. A tied model
  (``tie_word_embeddings``, no ``lm_head.weight``) gets the embedding as its
  head.

  Returns:
    ``path -> np.ndarray``: the parameter at this project's ``path``
    (``layers/0/attn/q_proj/kernel``), in this project's layout, in the dtype
    stored in the file.

  Raises:
    HFFormatError: one line naming the file, field or tensor that differs.
  """
  directory = pathlib.Path(directory)
  where = f'Hugging Face model {directory}'
  config_file = directory / 'config.json'
  if not config_file.is_file():
    raise HFFormatError(f'{where}: no config.json (not a Hugging Face model '
                        f'directory).')
  try:
    hf = json.loads(config_file.read_text())
  except ValueError as e:
    raise HFFormatError(f'{config_file} does not parse: {e}.') from None
  check_hf_config(hf, config, where)
  weights = HFWeights(directory)
  table = {t.hf_name: t for t in tensors(config.n_layers)}
  shapes = param_shapes(config)
  tied = hf.get('tie_word_embeddings', False) and (
      'lm_head.weight' not in weights.files)
  if tied:
    table['lm_head.weight'] = dataclasses.replace(
        table['lm_head.weight'], hf_name='model.embed_tokens.weight')
  problems = []
  for name, t in table.items():
    want = hf_shape(t, shapes[t.path])
    if t.hf_name not in weights.files:
      problems.append(f'{name}: missing')
      continue
    shape, dtype = weights.header(t.hf_name)
    if shape != want:
      problems.append(f'{name}: shape {list(shape)}, expected {list(want)}')
    if dtype not in _FLOAT_DTYPES:
      problems.append(f'{name}: dtype {dtype}, not a float')
  problems += [f'{name}: not a parameter of this model'
               for name in weights.files
               if name not in table and not _IGNORED.fullmatch(name)]
  if problems:
    shown = '; '.join(problems[:8])
    more = f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''
    raise HFFormatError(f'{where} does not match the model: {shown}{more}.')
  by_path = {t.path: t for t in table.values()}

  def read(path: str) -> np.ndarray:
    t = by_path[path]
    array = weights.read(t.hf_name)
    return array.T if t.transposed else array

  return read


def load_params(directory: str | os.PathLike, config: ModelConfig,
                abstract_params: Any) -> Any:
  """The parameters of a Hugging Face LLaMA, placed like ``abstract_params``.

  Each leaf is read, cast to the abstract leaf's dtype and placed with its
  sharding one at a time (every process reads the whole leaf and keeps its
  shards), so the host never holds more than one leaf. A stacked block leaf
  (``model.scan_layers``) is read layer by layer and stacked.

  Args:
    directory: the Hugging Face model directory.
    config: the model it must match.
    abstract_params: ``jax.ShapeDtypeStruct`` leaves with shardings (the
      trainer's ``TrainSetup.abstract_params``).

  Raises:
    HFFormatError: the directory does not hold this model.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from scale_optax import path_str  # pylint: disable=g-import-not-at-top
  read = open_hf(directory, config)

  def host(path: str, shape: tuple[int, ...]) -> np.ndarray:
    if is_stacked([path]):  # model.scan_layers: layer i at index i.
      sub = path[len('layers/'):]
      return np.stack([read(f'layers/{i}/{sub}') for i in range(shape[0])])
    return read(path)

  def place(path, abstract):
    array = np.asarray(host(path_str(path), abstract.shape), abstract.dtype)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                        lambda index: array[index])

  return jax.tree_util.tree_map_with_path(place, abstract_params)

