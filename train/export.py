"""``python -m train.export``: a run's checkpoint as a Hugging Face LLaMA.

``python -m train.export --run-dir RUN [--step N] --out DIR`` writes ``DIR``
with ``config.json`` (``LlamaForCausalLM``), the weights as
``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` files and
``model.safetensors.index.json`` above ``--max-shard-size``), and the run's
SentencePiece model as a ``LlamaTokenizer`` (``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``). Load it with
``transformers.LlamaForCausalLM.from_pretrained(DIR)``.

The reverse is the trainer's ``train.init_from`` key: a run that starts with no
checkpoint takes its weights from a Hugging Face LLaMA directory of the same
shape (:func:`train.hf_llama.load_params`).

The checkpoint is read one parameter at a time (orbax restores each array
whole on the host, whatever mesh or number of processes saved it), and at most
one safetensors file's tensors are held at once. Nothing is left in ``--out``
unless the export succeeds: the files are written to a hidden folder beside
it, renamed at the end.

Exit codes: 0 done, 1 a bad run directory, step, tokenizer or output path
(one line on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import hf_llama
from .config import ConfigError, Config, ModelConfig, load_config
from .errors import RunError, cli, prog

DTYPES = ('float32', 'bfloat16', 'float16')


class ExportError(RunError):
  """The export cannot be made (one line naming the culprit)."""


# ------------------------------------------------------------------- run dir


def run_config(run_dir: pathlib.Path) -> Config:
  """The run's config (``<run_dir>/config.yaml``, written by the trainer)."""
  path = run_dir / 'config.yaml'
  if not path.is_file():
    raise ExportError(f'{run_dir} is not a run directory: it has no '
                      f'config.yaml.')
  try:
    return load_config(path)
  except ConfigError as e:
    raise ExportError(f'{path}: {e}') from None


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  """The committed steps under ``<run_dir>/checkpoints`` (orbax's folders)."""
  directory = run_dir / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.is_dir() and p.name.isdigit())


def step_directory(run_dir: pathlib.Path, step: Optional[int]) -> pathlib.Path:
  """The checkpoint of ``step`` (default: the latest), checked for integrity."""
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise ExportError(f'run directory {run_dir} has no checkpoint '
                      f'({run_dir / "checkpoints"} holds no step).')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f'run directory {run_dir} has no checkpoint at step '
                      f'{step} (it has {", ".join(map(str, steps))}).')
  directory = run_dir / 'checkpoints' / str(step)
  from .integrity import verify_manifest  # pylint: disable=g-import-not-at-top
  problems = verify_manifest(directory)
  if problems:
    raise ExportError(f'checkpoint {directory} is corrupt: '
                      f'{"; ".join(problems[:8])}.')
  return directory


class CheckpointParams:
  """The parameters of one checkpoint, restored one array at a time."""

  def __init__(self, step_dir: pathlib.Path, config: ModelConfig):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = step_dir / 'state'
    self._checkpointer = ocp.PyTreeCheckpointer()
    try:
      tree = self._checkpointer.metadata(self.directory).item_metadata
    # A file orbax cannot read or parse, or JSON of another structure.
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ExportError(f'checkpoint {step_dir} has no readable parameters '
                        f'({type(e).__name__}: {str(e)[:200]}).') from None
    # orbax answers None where it finds no metadata it can read.
    if tree is None or 'params' not in tree:
      raise ExportError(f'checkpoint {step_dir} has no readable parameters '
                        f'({self.directory} holds no "params" tree).')
    params = tree['params']
    from scale_optax import path_str  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    saved = {path_str(p): leaf for p, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]}
    # model.scan_layers: block params stacked on a leading layer axis.
    self.stacked = hf_llama.is_stacked(saved)
    if self.stacked != config.scan_layers:
      raise ExportError(f'checkpoint {step_dir} holds '
                        f'{"stacked" if self.stacked else "unrolled"} layers, '
                        f'its config.yaml has model.scan_layers='
                        f'{str(config.scan_layers).lower()}.')
    self._cached: tuple[Optional[str], Any] = (None, None)
    expected = hf_llama.param_shapes(config, stacked=self.stacked)
    problems = [f'{p}: shape {list(saved[p].shape)}, expected {list(s)}'
                for p, s in expected.items()
                if p in saved and tuple(saved[p].shape) != s]
    problems += [f'{p}: missing' for p in expected if p not in saved]
    problems += [f'{p}: not a parameter of the model' for p in saved
                 if p not in expected]
    if problems:
      raise ExportError(f'checkpoint {step_dir} does not hold the model of its '
                        f'config.yaml: {"; ".join(problems[:8])}.')
    self.dtypes = {p: np.dtype(leaf.dtype) for p, leaf in saved.items()}

  def read(self, path: str) -> np.ndarray:
    """The parameter at ``path`` (``layers/0/attn/q_proj/kernel``) on the host.

    In a stacked checkpoint this is a slice of the stacked leaf, which is
    kept until another leaf is read (read them in
    ``hf_llama.tensors(n, layer_major=False)`` order to read each once).
    """
    if self.stacked and hf_llama.stacked_path(path):
      leaf, index = hf_llama.stacked_path(path)
      if self._cached[0] != leaf:
        self._cached = (None, None)  # Free it before reading the next.
        self._cached = (leaf, self._restore(leaf))
      return self._cached[1][index]
    return self._restore(path)

  def _restore(self, path: str) -> np.ndarray:
    ocp = self._ocp
    item: dict[str, Any] = {}
    args: dict[str, Any] = {}
    node_item, node_args = item, args
    *parents, leaf = ['params'] + path.split('/')
    for key in parents:
      node_item = node_item.setdefault(key, {})
      node_args = node_args.setdefault(key, {})
    node_item[leaf] = 0
    node_args[leaf] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = self._checkpointer.restore(
        self.directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
    for key in parents + [leaf]:
      restored = restored[key]
    return np.asarray(restored)


# ----------------------------------------------------------------- tokenizer


def run_tokenizer(config: Config, override: Optional[str]) -> bytes:
  """The SentencePiece model the run trained with, checked like the trainer.

  ``override`` (``--tokenizer``), else ``data.tokenizer``, else the BPE model
  the trainer cached for the embedded data set under ``data.data_dir``.
  Relative paths of the run's config are taken from the current directory.
  """
  from . import data as data_lib  # pylint: disable=g-import-not-at-top
  from .data import tfds_source, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = override or config.data.tokenizer
  try:
    if path is None:
      builder = tfds_source.open_builder(config.data.name, config.data.data_dir)
      path = data_lib.tokenizer_path(config.data.data_dir, builder,
                                     config.model.vocab_size)
    tokenizer_lib.load(path, config.model.vocab_size)
  except (data_lib.TokenizerError, data_lib.UnknownDatasetError,
          data_lib.DatasetNotPreparedError, OSError) as e:
    where, hint = (('--tokenizer', '') if override else
                   ("the run's tokenizer", ' Pass --tokenizer PATH.model.'))
    raise ExportError(f'{where}: {e}{hint}') from None
  return pathlib.Path(path).read_bytes()


# -------------------------------------------------------------------- export


def write_hf_model(out_dir: pathlib.Path, read: Callable[[str], np.ndarray],
                   dtypes: dict[str, np.dtype], config: ModelConfig,
                   tokenizer_proto: Optional[bytes], dtype: Optional[str],
                   max_shard_bytes: int, layer_major: bool = True) -> None:
  """Writes a Hugging Face LLaMA directory into the existing ``out_dir``.

  Args:
    out_dir: an existing, empty directory.
    read: ``path -> np.ndarray``, this project's parameter at ``path`` in its
      own layout; called once per parameter.
    dtypes: the stored dtype of every parameter path.
    config: the model.
    tokenizer_proto: a SentencePiece model, or None to write no tokenizer.
    dtype: the dtype to store (``'bfloat16'``...); None keeps the stored one
      (which must then be one dtype for all).
    max_shard_bytes: the size limit of one safetensors file.
    layer_major: the order of the blocks' tensors in the files (and of the
      calls to ``read``): layer by layer, or kind by kind (see
      :func:`train.hf_llama.tensors`).
  """
  stored = {np.dtype(d).name for d in dtypes.values()}
  if dtype is None:
    if len(stored) != 1:
      raise ExportError(f'the parameters have several dtypes {sorted(stored)}'
                        f'; pass --dtype.')
    dtype = stored.pop()
  if dtype not in DTYPES:
    raise ExportError(f'dtype {dtype!r} cannot be exported (one of {DTYPES}).')
  target = np.dtype(dtype)
  table = hf_llama.tensors(config.n_layers, layer_major)
  shapes = hf_llama.param_shapes(config)
  by_name = {t.hf_name: t for t in table}

  def read_hf(name: str) -> np.ndarray:
    t = by_name[name]
    array = read(t.path).astype(target, copy=False)
    return array.T if t.transposed else array

  specs = [(t.hf_name, (hf_llama.hf_shape(t, shapes[t.path]), target))
           for t in table]
  hf_llama.write_weights(out_dir, specs, read_hf, max_shard_bytes)
  ids = hf_llama.SpecialIds()
  if tokenizer_proto is not None:
    files, ids = hf_llama.tokenizer_files(tokenizer_proto, config.max_seq_len)
    for name, data in files.items():
      (out_dir / name).write_bytes(data)
  (out_dir / 'config.json').write_text(
      json.dumps(hf_llama.hf_config(config, dtype, ids), indent=2) + '\n')


def write_atomically(out: pathlib.Path,
                     fill: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Runs ``fill(tmp)`` on a new folder beside ``out``, then renames it.

  ``out`` must not exist or be an empty directory. On any failure the
  folder is removed and ``out`` is untouched.
  """
  out = out.absolute()
  if out.exists() and not (out.is_dir() and not any(out.iterdir())):
    raise ExportError(f'--out {out} already exists and is not an empty '
                      f'directory; choose a new one.')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.partial-{uuid.uuid4().hex[:8]}')
  tmp.mkdir()
  try:
    fill(tmp)
    if out.exists():
      out.rmdir()
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike,
               step: Optional[int] = None, dtype: Optional[str] = None,
               max_shard_bytes: int = hf_llama.parse_size('5GB'),
               tokenizer: Optional[str] = None) -> pathlib.Path:
  """Exports step ``step`` (default: the latest) of a run; returns ``out``."""
  run_dir = pathlib.Path(run_dir)
  config = run_config(run_dir)
  step_dir = step_directory(run_dir, step)
  params = CheckpointParams(step_dir, config.model)
  proto = run_tokenizer(config, tokenizer)
  return write_atomically(pathlib.Path(out), lambda tmp: write_hf_model(
      tmp, params.read, params.dtypes, config.model, proto, dtype,
      max_shard_bytes, layer_major=not params.stacked))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=prog(__spec__.name),
      description='Export a run\'s checkpoint as a Hugging Face LLaMA '
      '(LlamaForCausalLM) directory. The reverse: start a run from one with '
      'the config key train.init_from=DIR.')
  parser.add_argument('--run-dir', required=True,
                      help='the run directory (train.run_dir of the run)')
  parser.add_argument('--step', type=int, default=None,
                      help='the checkpoint step (default: the latest)')
  parser.add_argument('--out', required=True,
                      help='the directory to write (must not exist, or be '
                      'empty)')
  parser.add_argument('--dtype', choices=DTYPES, default=None,
                      help='the stored dtype (default: the checkpoint\'s)')
  parser.add_argument('--max-shard-size', default='5GB',
                      help='split the weights into files of at most this '
                      'size, with an index (default: 5GB)')
  parser.add_argument('--tokenizer', default=None,
                      help='the SentencePiece model file (default: the run\'s)')
  args = parser.parse_args(argv)
  try:
    args.max_shard_bytes = hf_llama.parse_size(args.max_shard_size)
  except ValueError as e:
    parser.error(f'--max-shard-size: {e}')
  return args


@cli
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  # Orbax warns that a checkpoint's item folder has no step metadata: it
  # lives one level up, where the trainer's CheckpointManager wrote it.
  logging.getLogger('absl').setLevel(logging.ERROR)
  out = export_run(args.run_dir, args.out, args.step, args.dtype,
                   args.max_shard_bytes, args.tokenizer)
  print(f'exported {args.run_dir} to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
