"""The training loop's overhead: ``python -m train`` against a bare loop.

``python -m benchmarks.loop_overhead [--config tiny] [--steps N] [--repeats R]
[--clock wall|cpu] [--override KEY=VALUE ...]``

Both run the same jitted train step (``train.step.make_train_step``) on the
same model, optimizer and batches:

- loop: the trainer of ``python -m train`` (``train.loop.Trainer``) for
  ``--steps`` steps from scratch, with one evaluation and one checkpoint at
  the end; its own tokens/s (``summary.json``), which leaves out the first
  (compiling) step, the evaluation and the checkpoint;
- bare: the same ``--steps`` batches read from the data set into device
  memory first, then ``params, opt_state, _ = step(params, opt_state, batch)``
  in a Python loop, blocked once at the end; the first step (compiling) is
  not timed.

The two alternate ``--repeats`` times (order swapped each round); reported:
each side's median tokens/s and the median of the per-round ratios
loop / bare. The target is a ratio of at least 0.97. The default shapes are
a small model with a small batch, so the per-step host work of the loop
(data, metrics, logging) shows against a short step.

``--clock wall`` (the default) times both in wall seconds: the figure the
target is about, to be taken on an otherwise idle machine. ``--clock cpu``
times both in CPU seconds of the whole process (all its threads): on a CPU
whose cores the step keeps busy, the loop's host work costs exactly its CPU
time, and other programs' load changes the ratio much less than it changes
wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax

from benchmarks import common
from train import data as data_lib
from train import mesh as mesh_lib
from train.console import Console
from train.loop import Trainer
from train.optim import make_optimizer
from train.prefetch import global_batch
from train.state import make_setup
from train.step import make_train_step

TARGET = 0.97
SMALL = ('model.d_model=128', 'model.n_layers=2', 'model.n_heads=4',
         'model.d_ff=352', 'data.batch_size=4', 'data.seq_len=64',
         'train.eval_tokens=256', 'train.progress=false', 'train.log_every=10')


CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.loop_overhead',
      description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='tiny',
                      help='config name in configs/ or path (default: tiny, '
                      'with the small shapes of SMALL)')
  parser.add_argument('--steps', type=int, default=300,
                      help='steps per run (default 300)')
  parser.add_argument('--repeats', type=int, default=3,
                      help='rounds of loop and bare runs (default 3)')
  parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                      help='time in wall seconds (default) or in CPU seconds '
                      'of the process (less sensitive to other load)')
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE',
                      help='a dotted config override after SMALL (repeatable)')
  return parser.parse_args(argv)


def loop_tokens_per_s(overrides: Sequence[str], steps: int,
                      clock: Callable[[], float]) -> float:
  """tokens/s that the trainer reports for a fresh run of ``steps`` steps."""
  with tempfile.TemporaryDirectory() as run_dir:
    config = common.config_for(overrides[0], [
        *overrides[1:], f'train.steps={steps}', f'train.eval_every={steps}',
        f'train.checkpoint_every={steps}', f'train.run_dir={run_dir}'])
    summary = Trainer(config, Console(main=True), resume=False,
                      clock=clock).run()
  return summary['tokens_per_s']


def bare_tokens_per_s(overrides: Sequence[str], steps: int,
                      clock: Callable[[], float]) -> float:
  """tokens/s of the jitted step alone over the run's batches in memory."""
  config = common.config_for(overrides[0], [*overrides[1:],
                                            f'train.steps={steps}'])
  mesh = mesh_lib.make_mesh(config.mesh)
  dataset = data_lib.prepare(config.data, config.model.vocab_size)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  setup = make_setup(config, mesh, tx, schedule)
  it = dataset.train_iter(config.data.batch_size, config.data.seq_len,
                          seed=config.train.seed)
  step = make_train_step(setup)
  params = setup.init_params(config.train.seed)
  opt_state = setup.init_opt_state(params)
  with jax.set_mesh(mesh):
    batches = jax.block_until_ready(
        [global_batch(setup, next(it)) for _ in range(steps)])
    params, opt_state, metrics = step(params, opt_state, batches[0])
    jax.block_until_ready(metrics)
    start = clock()
    for batch in batches[1:]:
      params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready((params, metrics))
    elapsed = clock() - start
  tokens = (steps - 1) * config.data.batch_size * config.data.seq_len
  return tokens / elapsed


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  overrides = [args.config, *SMALL, *args.override]
  config = common.config_for(args.config, [*SMALL, *args.override])
  common.print_header('loop overhead: python -m train vs a bare step loop', {
      'model': f'd{config.model.d_model} L{config.model.n_layers} '
               f'vocab {config.model.vocab_size}',
      'batch': f'{config.data.batch_size} x {config.data.seq_len}',
      'steps': args.steps, 'clock': args.clock})
  unit = 'tokens/s' if args.clock == 'wall' else 'tokens per CPU s'
  rounds = []
  for r in range(args.repeats):
    order = (('loop', loop_tokens_per_s), ('bare', bare_tokens_per_s))
    result = {name: fn(overrides, args.steps, CLOCKS[args.clock])
              for name, fn in (order if r % 2 == 0 else order[::-1])}
    rounds.append(result)
    print(f'round {r + 1}: loop {result["loop"]:,.0f} {unit}, bare '
          f'{result["bare"]:,.0f} {unit}, ratio '
          f'{result["loop"] / result["bare"]:.3f}', flush=True)
  ratio = common.median([x['loop'] / x['bare'] for x in rounds])
  print(f'median: loop {common.median([x["loop"] for x in rounds]):,.0f} '
        f'{unit}, bare {common.median([x["bare"] for x in rounds]):,.0f} '
        f'{unit}, ratio loop / bare {ratio:.3f}')
  print(f'target: ratio >= {TARGET}: {common.verdict(ratio >= TARGET)}')
  print(json.dumps({'loop_over_bare': ratio, 'clock': args.clock,
                    'rounds': rounds}))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
