"""``python -m train [--config configs/NAME.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def resolve_config_path(name: str) -> pathlib.Path:
  """Accepts a path, or a bare name from the project's configs/ folder."""
  path = pathlib.Path(name)
  if path.exists() or path.suffix in ('.yaml', '.yml'):
    return path
  return CONFIG_DIR / f'{name}.yaml'


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
  parser.add_argument('overrides', nargs='*', metavar='key=value',
                      help='dotted overrides, e.g. optimizer.learning_rate=3e-3')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  from train.config import ConfigError, load_config  # pylint: disable=g-import-not-at-top
  try:
    config = load_config(resolve_config_path(args.config), args.overrides)
    from train.loop import train  # pylint: disable=g-import-not-at-top
    train(config, resume=args.resume)
  except ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
