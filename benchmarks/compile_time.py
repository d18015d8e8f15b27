"""Compile time of the train step against depth, scanned and unrolled layers.

``python -m benchmarks.compile_time`` compiles the full train step (forward,
backward, SCALE update; abstract inputs, nothing allocated) of LLaMA-350M
(24 layers) and of its depth-scaled twin with LLaMA-60M's depth (8 layers,
350M's widths), once with ``model.scan_layers=true`` and once unrolled, and
reports each compile time and the ratio 24 layers / 8 layers per layout.
Unrolled, the program holds every layer, so compile time grows with depth
(a ratio near 3); scanned, it holds one block (a ratio near 1).

The four compiles run interleaved in one process, ``--repeats`` rounds, and
the median is reported, so machine load affects both layouts alike.
``--smoke`` uses tiny widths (seconds, for tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import common
from train import mesh as mesh_lib
from train.optim import make_optimizer
from train.state import make_setup
from train.step import make_train_step

DEEP, SHALLOW = 24, 8  # llama_350m's depth, llama_60m's depth.
SMOKE_OVERRIDES = ('model.vocab_size=256', 'model.d_model=64',
                   'model.n_heads=2', 'model.d_ff=128', 'data.seq_len=32',
                   'data.batch_size=2')


def compile_seconds(config) -> float:
  """Seconds to lower and compile the train step of ``config``."""
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                scan_layers=config.model.scan_layers)
  setup = make_setup(config, mesh, tx, schedule)
  tokens = jax.ShapeDtypeStruct(
      (config.data.batch_size, config.data.seq_len), jnp.int32,
      sharding=mesh_lib.batch_sharding(mesh, config.mesh))
  batch = {'inputs': tokens, 'targets': tokens}
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    make_train_step(setup).lower(setup.abstract_params,
                                 setup.abstract_opt_state, batch).compile()
  return time.perf_counter() - start


def measure(model: str, repeats: int, overrides: Sequence[str],
            depths: tuple[int, int] = (DEEP, SHALLOW)
            ) -> dict[tuple[bool, int], float]:
  """Median compile seconds per (scanned, layers)."""
  cases = [(scan, layers) for scan in (True, False) for layers in depths]
  times: dict[tuple[bool, int], list[float]] = {c: [] for c in cases}
  for _ in range(repeats):
    for scan, layers in cases:
      config = common.config_for(model, [
          f'model.scan_layers={str(scan).lower()}',
          f'model.n_layers={layers}', 'mesh.data=1', 'mesh.fsdp=1',
          'mesh.tensor=1', *overrides])
      times[(scan, layers)].append(compile_seconds(config))
  return {c: statistics.median(t) for c, t in times.items()}


def report(model: str, medians: dict[tuple[bool, int], float],
           depths: tuple[int, int], markdown: bool) -> str:
  deep_n, shallow_n = depths
  rows = []
  for scan in (True, False):
    deep, shallow = medians[(scan, deep_n)], medians[(scan, shallow_n)]
    rows.append(['scanned' if scan else 'unrolled', f'{shallow:.1f}',
                 f'{deep:.1f}', f'{deep / shallow:.2f}'])
  return common.format_table(
      ['layers', f'{model} at {shallow_n} layers (s)',
       f'{model} at {deep_n} layers (s)', f'ratio {deep_n}/{shallow_n}'],
      rows, markdown)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.compile_time',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='llama_350m')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--depths', type=common.split_list,
                      default=[str(DEEP), str(SHALLOW)],
                      help=f'the deep and the shallow depth (default '
                      f'{DEEP},{SHALLOW})')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny widths, one round')
  parser.add_argument('--markdown', action='store_true')
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  overrides = [*(SMOKE_OVERRIDES if args.smoke else ()), *args.override]
  repeats = 1 if args.smoke else args.repeats
  common.print_header('compile time of the train step: scanned vs unrolled')
  depths = tuple(int(d) for d in args.depths)
  if len(depths) != 2 or min(depths) < 1:
    raise SystemExit(f'--depths: two positive layer counts, got {args.depths}')
  medians = measure(args.config, repeats, overrides, depths)
  print(report(args.config, medians, depths, args.markdown))
  return 0


if __name__ == '__main__':
  sys.exit(main())
