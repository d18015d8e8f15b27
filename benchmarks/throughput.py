"""Tokens per second of the full train step, per optimizer.

``python -m benchmarks.throughput [--configs tiny,llama_60m] [--optimizers ...]
[--batch-size N] [--repeats N] [--markdown]``

The step is the trainer's (``train.step.make_train_step``): forward, loss,
gradients, the optimizer as ``train.optim.make_optimizer`` builds it (with the
config's gradient clipping and schedule), ``apply_updates``, and the
non-finite-step guard; params and optimizer state donated. Every optimizer
starts from the same parameters and steps on one fixed batch of random tokens
(the data pipeline is not timed). Steps are interleaved: each round runs
``--steps-per-round`` steps of every optimizer (order rotated each round), each
step blocked on its loss; a round's time per step gives that round's tokens/s.
Reported: the median over rounds, the quartiles, the ratio of medians to
AdamW's and plain SGD's, and the median of the per-round paired ratios (each
against the same round's AdamW / SGD, which ran within seconds of it). On CPU
also the process CPU time per step (all of XLA's threads), which other
processes' load disturbs less than wall-clock time, and its paired ratio to
SGD's.

Default batch: on CPU the config's own batch for ``tiny`` and 2 sequences for
the paper's LLaMA configs (their 512 would take minutes a step); on a GPU the
config's batch for ``tiny`` and 32 sequences otherwise. Compute dtype: bfloat16
on a GPU, float32 on CPU (``--dtype``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import common
from train import mesh as mesh_lib
from train.model import param_count
from train.optim import make_optimizer
from train.state import make_setup
from train.step import make_train_step

TARGET_SGD_GAP = 0.03


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.throughput',
      description=__doc__.split('\n')[0])
  common.add_common_args(parser, ('tiny', 'llama_60m'))
  parser.add_argument('--batch-size', type=int, default=None,
                      help='sequences per step for every config (default: '
                      'see the module docstring)')
  parser.add_argument('--seq-len', type=int, default=None,
                      help='tokens per sequence (default: the config\'s)')
  common.add_dtype_arg(parser)
  parser.add_argument('--repeats', type=int, default=10,
                      help='interleaved rounds per config (default 10)')
  parser.add_argument('--steps-per-round', type=int, default=1,
                      help='steps of each optimizer per round (default 1)')
  parser.add_argument('--max-seconds', type=float, default=20.0,
                      help='cap on one optimizer\'s timed steps per config; '
                      'a slower optimizer drops out of later rounds after '
                      '--min-repeats (default 20)')
  parser.add_argument('--min-repeats', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def _batch_size(args: argparse.Namespace, cname: str, config) -> int:
  if args.batch_size is not None:
    return args.batch_size
  if cname == 'tiny' or not cname.startswith('llama'):
    return config.data.batch_size
  return 32 if common.on_gpu() else 2


class Case:
  """One optimizer's compiled train step and its threaded state."""

  def __init__(self, config, batch: dict[str, jax.Array], seed: int):
    self.name = config.optimizer.name
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    self.mesh = mesh
    tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                  config.rivals,
                                  scan_layers=config.model.scan_layers)
    setup = make_setup(config, mesh, tx, schedule)
    with jax.set_mesh(mesh):
      self.params = setup.init_params(seed)
      self.state = setup.init_opt_state(self.params)
      start = time.perf_counter()
      self.step = make_train_step(setup).lower(
          self.params, self.state, batch).compile()
      self.compile_seconds = time.perf_counter() - start
    self.batch = batch
    self.times: list[float] = []   # Seconds per step, one entry per round.
    self.cpu_times: list[float] = []  # Process CPU seconds per step.
    self.target = 0
    self.loss = None

  def run(self, steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps, each blocked on its loss.

    Returns:
      Wall-clock seconds and process CPU seconds (all threads) per step.
    """
    start, cpu = time.perf_counter(), time.process_time()
    with jax.set_mesh(self.mesh):
      for _ in range(steps):
        self.params, self.state, metrics = self.step(
            self.params, self.state, self.batch)
        self.loss = float(metrics['loss'])
    return ((time.perf_counter() - start) / steps,
            (time.process_time() - cpu) / steps)


def run_config(args: argparse.Namespace, cname: str, dtype: str
               ) -> dict[str, Any]:
  overrides = [f'model.dtype={dtype}', 'mesh.data=1', 'mesh.fsdp=1',
               'mesh.tensor=1'] + list(args.override)
  base = common.config_for(cname, overrides)
  batch_size = _batch_size(args, cname, base)
  seq_len = args.seq_len or base.data.seq_len
  overrides += [f'data.batch_size={batch_size}', f'data.seq_len={seq_len}']
  base = common.config_for(cname, overrides)
  n_params = param_count(base.model)
  repeats, steps = args.repeats, args.steps_per_round
  tokens = jax.random.randint(jax.random.key(args.seed), (batch_size, seq_len),
                              0, base.model.vocab_size, dtype=jnp.int32)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1)}
  cases = []
  for oname in args.optimizers:
    config = common.config_for(cname, overrides + [f'optimizer.name={oname}'])
    case = Case(config, batch, args.seed)
    case.run(1)                        # Warm-up: first execution.
    first, _ = case.run(1)
    case.target = max(args.min_repeats,
                      min(repeats, int(args.max_seconds / (first * steps))))
    cases.append(case)
  rounds, cpu_rounds = [], []          # {optimizer: seconds per step}
  while any(len(c.times) < c.target for c in cases):
    shift = len(rounds) % len(cases)
    this, this_cpu = {}, {}
    for case in cases[shift:] + cases[:shift]:
      if len(case.times) < case.target:
        wall, cpu = case.run(steps)
        case.times.append(wall)
        case.cpu_times.append(cpu)
        this[case.name], this_cpu[case.name] = wall, cpu
    rounds.append(this)
    cpu_rounds.append(this_cpu)
  return {'cases': cases, 'rounds': rounds, 'cpu_rounds': cpu_rounds,
          'tokens': batch_size * seq_len,
          'batch': f'{batch_size} x {seq_len}', 'params': n_params,
          'steps': steps}


def _paired(rounds: list[dict[str, float]], name: str, ref: str
            ) -> Optional[list[float]]:
  """Per-round throughput ratios name/ref (= time ref / time name)."""
  pairs = [r[ref] / r[name] for r in rounds if name in r and ref in r]
  return pairs or None


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  common.check_optimizers(args.optimizers)
  dtype = common.compute_dtype(args.dtype)
  common.print_header('benchmarks.throughput', {'compute dtype': dtype})
  verdicts = []
  for cname in args.configs:
    out = run_config(args, cname, dtype)
    med = {c.name: out['tokens'] / common.median(c.times)
           for c in out['cases']}
    rows = []
    for c in out['cases']:
      tps = [out['tokens'] / t for t in c.times]
      q1, q3 = common.quartiles(tps)
      cells = [c.name, f'{med[c.name]:.0f}', f'{q1:.0f}-{q3:.0f}',
               len(c.times), f'{common.median(c.times) * 1e3:.1f}']
      for ref in ('adamw', 'sgd'):
        pairs = _paired(out['rounds'], c.name, ref)
        cells.append(common.ratio(med[c.name], med.get(ref)))
        if pairs:
          p1, p3 = common.quartiles(pairs)
          cells.append(f'{common.median(pairs):.3f} ({p1:.3f}-{p3:.3f})')
        else:
          cells.append('n/a')
      if not common.on_gpu():
        pairs = _paired(out['cpu_rounds'], c.name, 'sgd')
        cells.append(f'{common.median(c.cpu_times) * 1e3:.0f}')
        cells.append('n/a' if not pairs else f'{common.median(pairs):.3f}')
      cells.append(f'{c.compile_seconds:.1f}')
      rows.append(cells)
    print(f'\n{cname}: {out["params"] / 1e6:.2f}M params, batch '
          f'{out["batch"]} = {out["tokens"]} tokens a step, {dtype}; '
          f'{len(out["rounds"])} interleaved rounds of {out["steps"]} '
          f'step(s) per optimizer')
    cpu_cols = [] if common.on_gpu() else ['CPU ms/step',
                                           '/ SGD by CPU time (paired)']
    print(common.format_table(
        ['optimizer', 'tokens/s', 'IQR', 'rounds', 'ms/step',
         '/ AdamW', '/ AdamW paired (IQR)', '/ SGD', '/ SGD paired (IQR)']
        + cpu_cols + ['compile s'], rows, args.markdown))
    if 'scale' in med:
      for ref, floor, what in [
          ('adamw', 1.0, "tokens/s >= AdamW's"),
          ('sgd', 1 - TARGET_SGD_GAP,
           f"within {TARGET_SGD_GAP:.0%} of plain SGD's tokens/s")]:
        if ref not in med:
          continue
        parts = []
        for label, key in [('wall clock', 'rounds'), ('CPU time', 'cpu_rounds')]:
          if key == 'cpu_rounds' and common.on_gpu():
            continue
          pairs = _paired(out[key], 'scale', ref)
          value = common.median(pairs)
          parts.append(f'{label} {value:.3f}x {common.verdict(value >= floor)}')
        verdicts.append(f'target {cname}: SCALE {what} (paired medians): '
                        + '; '.join(parts))
  print()
  print('\n'.join(verdicts))
  print(f'load average at end: {common.load_average()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
