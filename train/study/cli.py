"""The command line of ``python -m train.study``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

from ..errors import UsageError, cli, prog
from .config import DEFAULT_CONFIG, QUICK_CONFIG, load_study
from .estimate import estimate_study
from .report import write_report
from .run import prepare_data, run_study


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=prog(__package__),
      description='Run a grid of trainer runs (optimizers x learning rates x '
      'seeds; short sweep, then long runs), resuming finished runs, and '
      'write a results page, tables and plots.')
  parser.add_argument('--config', default=None,
                      help=f'study YAML (default: configs/{DEFAULT_CONFIG.name})')
  parser.add_argument('--quick', action='store_true',
                      help=f'the few-minute variant '
                      f'(configs/{QUICK_CONFIG.name})')
  parser.add_argument('--jobs', type=int, default=1,
                      help='parallel trainer processes (default 1: in '
                      'sequence, in this process)')
  parser.add_argument('--hours', type=float, default=None,
                      help='start only the runs expected to end within this '
                      'many hours (a run takes as long as its phase\'s '
                      'longest finished run) and leave the others to the next '
                      'call, which then exits 3: a run cut short on this '
                      'machine is lost on another')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--report-only', action='store_true',
                    help='only rewrite the report from the finished runs')
  mode.add_argument('--estimate', type=int, nargs='?', const=20, default=None,
                    metavar='STEPS',
                    help='time STEPS steps (default 20) of each optimizer and '
                    'print the study\'s total time; trains nothing else')
  return parser.parse_args(argv)


@cli
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.quick and args.config:
    raise UsageError('give either --quick or --config')
  if args.jobs < 1:
    raise UsageError(f'--jobs must be >= 1, got {args.jobs}')
  if args.hours is not None and not args.hours > 0:
    raise UsageError(f'--hours must be > 0, got {args.hours}')
  if args.estimate is not None and args.estimate < 1:
    raise UsageError(f'--estimate must time >= 1 steps, got {args.estimate}')
  path = QUICK_CONFIG if args.quick else (args.config or DEFAULT_CONFIG)
  say = lambda *a: print(time.strftime('%H:%M:%S'), *a, flush=True)
  study = load_study(path)
  if args.report_only:
    write_report(study, say=say)
    return 0
  if args.estimate is not None:
    prepare_data(study, say)
    cost = estimate_study(study, args.estimate, say)
    out = study.ledger_dir / 'estimate.json'  # Kept in git, as the runs.
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cost, indent=2) + '\n')
    say(f'estimate: {out}')
    return 0
  outcome = run_study(study, jobs=args.jobs, say=say, hours=args.hours)
  if outcome['errors'] or outcome['stopped']:
    return 1
  return 3 if outcome['deferred'] else 0
