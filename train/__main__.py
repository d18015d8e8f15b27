"""``python -m train [--config configs/NAME.yaml] [key=value ...]``.

Exit codes (:mod:`train.errors`): 0 done, 2 a bad config or argument, 1 a
run error (bad data, tokenizer or checkpoint, a diverged run); each error is
one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import load_config, resolve_config_path
from .errors import cli, prog


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=prog(__package__),
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


@cli
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  config = load_config(resolve_config_path(args.config), args.overrides)
  if args.dry_run:
    from .dry_run import dry_run, format_report  # pylint: disable=g-import-not-at-top
    from .recipe import describe  # pylint: disable=g-import-not-at-top
    print(describe(config, resolve_config_path(args.config)))
    print(format_report(config, dry_run(config)))
  else:
    from .loop import train  # pylint: disable=g-import-not-at-top
    train(config, resume=args.resume)
  return 0


if __name__ == '__main__':
  sys.exit(main())
