"""``python -m train [--config configs/NAME.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import resolve_config_path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m train',
      description='Pretrain a LLaMA with SCALE (or a baseline optimizer).')
  parser.add_argument('--config', default='tiny',
                      help='YAML config: a path or a name in configs/ '
                      '(default: tiny, the embedded data set).')
  resume = parser.add_mutually_exclusive_group()
  resume.add_argument('--resume', dest='resume', action='store_true',
                      default=True, help='continue from the latest '
                      'checkpoint in train.run_dir (the default)')
  resume.add_argument('--no-resume', dest='resume', action='store_false',
                      help='start from scratch even if checkpoints exist')
  parser.add_argument('--dry-run', action='store_true',
                      help='compile the train step abstractly and print the '
                      'per-device memory, without data or training')
  parser.add_argument('overrides', nargs='*', metavar='key=value',
                      help='dotted overrides, e.g. optimizer.learning_rate=3e-3')
  return parser.parse_args(argv)


def _run_errors() -> tuple[type[Exception], ...]:
  from . import data  # pylint: disable=g-import-not-at-top
  from .checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from .hf_llama import HFFormatError  # pylint: disable=g-import-not-at-top
  from .loop import TrainingError  # pylint: disable=g-import-not-at-top
  # OSError: a missing tokenizer file, an unwritable data_dir or run_dir, a
  # full disk; the message names the file.
  return (CheckpointError, TrainingError, HFFormatError,
          data.UnknownDatasetError,
          data.DatasetNotPreparedError, data.TokenizerError,
          data.SplitTooSmallError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  run_errors = _run_errors()
  from .config import ConfigError, load_config  # pylint: disable=g-import-not-at-top
  try:
    config = load_config(resolve_config_path(args.config), args.overrides)
    if args.dry_run:
      from .dry_run import dry_run, format_report  # pylint: disable=g-import-not-at-top
      from .recipe import describe  # pylint: disable=g-import-not-at-top
      print(describe(config, resolve_config_path(args.config)))
      print(format_report(config, dry_run(config)))
    else:
      from .loop import train  # pylint: disable=g-import-not-at-top
      train(config, resume=args.resume)
  except ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  except run_errors as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
