"""The official release's training recipe, and each llama_* config against it.

``python -m train.recipe`` prints a Markdown table (the README's): one row per
size, every recipe value as the config sets it, marked where it differs from
the authors'. The authors' values live here, once, with the file of the
official release (OptimAI-Lab/Minimalist_LLM_Pretraining, commit f5bd4e7)
that sets each; tests/train/test_recipe.py checks every config against them.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Optional, Sequence

from .config import Config, load_config
from .errors import cli

SIZES = ('60m', '130m', '350m', '1b', '7b')

# (config key, column title, source file in the official release).
KEYS: tuple[tuple[str, str, str], ...] = (
    ('optimizer.learning_rate', 'matrix lr', 'scripts/<size>_scale.sh --lr'),
    ('optimizer.vector_learning_rate', '1-D AdamW lr',
     'scripts/<size>_scale.sh --adam_lr (default 2e-2 in '
     'mem_eff_pt/utils/args.py)'),
    ('train.steps', 'steps', 'scripts/<size>_scale.sh --num_training_steps'),
    ('optimizer.warmup_ratio', 'warmup',
     'scripts/<size>_scale.sh --warmup_steps / --num_training_steps'),
    ('optimizer.min_lr_ratio', 'final lr',
     'mem_eff_pt/utils/args.py --min_lr_ratio'),
    ('data.batch_size', 'batch', 'scripts/<size>_scale.sh --total_batch_size'),
    ('data.seq_len', 'seq', 'mem_eff_pt/utils/args.py --max_length'),
    ('model.vocab_size', 'vocab',
     'torchrun_main_DDP.py (T5-base tokenizer)'),
    ('optimizer.momentum', 'momentum', 'scripts/<size>_scale.sh --momentum'),
    ('optimizer.weight_decay', 'wd', 'scripts/<size>_scale.sh --weight_decay'),
    ('optimizer.b1', 'b1', 'mem_eff_pt/utils/args.py --adam_beta_1'),
    ('optimizer.b2', 'b2', 'mem_eff_pt/utils/args.py --adam_beta_2'),
    ('optimizer.eps', 'eps', 'mem_eff_pt/utils/train_utils.py adamw_eps'),
    ('optimizer.vector_adam', '1-D Adam form',
     'mem_eff_pt/pt_scale/scale_optimizer.py'),
    ('optimizer.grad_clip', 'clip',
     'mem_eff_pt/utils/args.py --grad_clipping 0.0 (off)'),
    ('model.param_dtype', 'weights+state',
     'scripts/<size>_scale.sh --dtype bfloat16; torchrun_main_DDP.py casts '
     'the model'),
    ('data.packing', 'packing',
     'torchrun_main_DDP.py preprocess_batched (pad/truncate to max_length)'),
    ('train.eval_tokens', 'eval tokens',
     'torchrun_main_DDP.py evaluate_model target_eval_tokens'),
)

_SHARED: dict[str, Any] = {
    'optimizer.warmup_ratio': 0.1, 'optimizer.min_lr_ratio': 0.1,
    'data.batch_size': 512, 'data.seq_len': 256, 'model.vocab_size': 32000,
    'optimizer.momentum': 0.9, 'optimizer.weight_decay': 0.0,
    'optimizer.b1': 0.9, 'optimizer.b2': 0.999, 'optimizer.eps': 1e-8,
    'optimizer.vector_adam': 'authors', 'optimizer.grad_clip': None,
    'model.param_dtype': 'bfloat16', 'data.packing': False,
    'train.eval_tokens': 10_000_000,
}
_PER_SIZE: dict[str, tuple[float, float, int]] = {
    # size: (lr, adam_lr, num_training_steps)
    '60m': (1e-3, 2e-2, 11_000),
    '130m': (1e-3, 2e-2, 20_000),
    '350m': (1e-3, 2e-2, 60_000),
    '1b': (2e-4, 1e-3, 100_000),
    '7b': (1e-4, 1e-3, 150_000),
}

AUTHORS: dict[str, dict[str, Any]] = {
    size: {**_SHARED, 'optimizer.learning_rate': lr,
           'optimizer.vector_learning_rate': adam_lr, 'train.steps': steps}
    for size, (lr, adam_lr, steps) in _PER_SIZE.items()
}


def config_path(size: str) -> str:
  """``configs/llama_<size>.yaml``."""
  from .__main__ import resolve_config_path  # pylint: disable=g-import-not-at-top
  return str(resolve_config_path(f'llama_{size}'))


def value(config: Config, key: str) -> Any:
  """``config``'s value at a dotted ``section.name`` key."""
  section, name = key.split('.')
  return getattr(getattr(config, section), name)


def differences(config: Config, size: str) -> dict[str, tuple[Any, Any]]:
  """``{key: (config's value, authors' value)}`` where they differ."""
  return {key: (value(config, key), want)
          for key, want in AUTHORS[size].items()
          if value(config, key) != want}


def _fmt(x: Any) -> str:
  if x is None:
    return 'none'
  if isinstance(x, bool):
    return 'yes' if x else 'no'
  if isinstance(x, float):
    return f'{x:g}'
  if isinstance(x, int) and x >= 10_000:
    return f'{x:,}'
  return str(x)


def recipe_lines(config: Config, size: Optional[str] = None) -> list[str]:
  """One line per recipe value of ``config``, with the authors' for ``size``."""
  lines = []
  for key, title, source in KEYS:
    got = value(config, key)
    line = f'  {title:<14} {_fmt(got):<10} ({key})'
    if size is not None:
      want = AUTHORS[size][key]
      mark = 'as the authors' if got == want else f'AUTHORS: {_fmt(want)}'
      line += f'  {mark}; {source.replace("<size>", size)}'
    lines.append(line)
  return lines


def describe(config: Config, path: str) -> str:
  """The recipe of ``config``; compared with the authors' when ``path`` is a
  ``llama_<size>`` config."""
  size = pathlib.Path(path).stem.removeprefix('llama_')
  size = size if size in AUTHORS else None
  head = (f'recipe (against the official release\'s {size} run):'
          if size else 'recipe:')
  return '\n'.join([head] + recipe_lines(config, size))


def markdown_table(sizes: Sequence[str] = SIZES) -> str:
  """Each llama_* config against the authors' values (``x (authors y)``)."""
  head = ['config'] + [title for _, title, _ in KEYS]
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for size in sizes:
    config = load_config(config_path(size))
    cells = [f'llama_{size}']
    for key, _, _ in KEYS:
      got, want = value(config, key), AUTHORS[size][key]
      cells.append(_fmt(got) if got == want
                   else f'**{_fmt(got)}** (authors {_fmt(want)})')
    rows.append('| ' + ' | '.join(cells) + ' |')
  sources = sorted({source.split(' ')[0] for _, _, source in KEYS})
  return '\n'.join(rows + [
      '', 'Values from the configs (`python -m train.recipe`); bold where a '
      'config departs from the official release (OptimAI-Lab/'
      'Minimalist_LLM_Pretraining: ' + ', '.join(f'`{s}`' for s in sources)
      + ').'])


@cli
def main(argv: Optional[Sequence[str]] = None) -> int:
  del argv
  print(markdown_table())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
