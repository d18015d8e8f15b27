"""Formulations of the column RMS that ``column_normalize`` needs, timed.

``python -m benchmarks.column_reduction [--shapes 512x32000,32000x512,...]
[--repeats 20] [--dtype float32] [--markdown]``

Each formulation computes ``G / max(sqrt(mean_i G[i, j]^2), eps)`` for one
``[fan_in, fan_out]`` gradient, jitted, the gradient donated (so the output
reuses its buffer, as in the train step). They differ only in how the sum of
squares over axis 0 is written:

* ``sum``: ``jnp.sum(G * G, axis=0)``, the plain reduction;
* ``matvec``: ``ones[fan_in] @ (G * G)`` at ``Precision.HIGHEST``;
* ``transposed``: ``jnp.sum((G * G).T, axis=1)``, a reduction over the minor
  axis of the transpose;
* ``blocks``: what ``scale_optax.mean_square`` does: the rows added
  elementwise in blocks of 8 consecutive rows, pass after pass, down to one;
* ``row_loop``: a ``fori_loop`` adding one row at a time (unrolled by 8),
  which the library used on single-CPU-device runs before ``blocks``.

Calls are interleaved (per round each formulation once, order rotated) and
the median and quartiles over rounds are reported, with the bandwidth of the
``3 |G|`` bytes a single pass needs at least (read G for the RMS, read it
again and write the result). The shapes default to the LM heads, embeddings
and MLP kernels of llama_60m and llama_1b.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import scale_optax
from benchmarks import common

DEFAULT_SHAPES = ('512x32000', '32000x512', '512x1376', '1376x512',
                  '2048x32000', '5461x2048')
EPS = 1e-8


def _sum(g: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(g), axis=0, keepdims=True)


def _matvec(g: jax.Array) -> jax.Array:
  ones = jnp.ones((1, g.shape[0]), g.dtype)
  return jnp.matmul(ones, jnp.square(g), precision=jax.lax.Precision.HIGHEST)


def _transposed(g: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(g.T), axis=1)[None]


def _blocks(g: jax.Array) -> jax.Array:
  return scale_optax.mean_square(g, (0,)) * g.shape[0]


def _row_loop(g: jax.Array) -> jax.Array:
  def add_row(i, acc):
    row = jax.lax.dynamic_index_in_dim(g, i, 0, keepdims=False)
    return acc + row * row
  total = jax.lax.fori_loop(0, g.shape[0], add_row,
                            jnp.zeros(g.shape[1:], g.dtype), unroll=8)
  return total[None]


# name -> fn(G) giving sum_i G[i, j]^2 with shape [1, fan_out].
SUMS_OF_SQUARES: dict[str, Callable[[jax.Array], jax.Array]] = {
    'sum': _sum, 'matvec': _matvec, 'transposed': _transposed,
    'row_loop': _row_loop, 'blocks': _blocks}


def _normalizer(sum_of_squares: Callable[[jax.Array], jax.Array]):
  def normalize(g):
    g32 = g.astype(jnp.float32)
    rms = jnp.sqrt(sum_of_squares(g32) / g.shape[0])
    return (g32 / jnp.maximum(rms, EPS)).astype(g.dtype)
  return jax.jit(normalize, donate_argnums=0)


def parse_shape(text: str) -> tuple[int, int]:
  rows, cols = text.lower().split('x')
  return int(rows), int(cols)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.column_reduction',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', type=common.split_list,
                      default=list(DEFAULT_SHAPES),
                      help='comma-separated FAN_INxFAN_OUT shapes; default: '
                      + ','.join(DEFAULT_SHAPES))
  parser.add_argument('--repeats', type=int, default=20,
                      help='interleaved rounds (default 20)')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='gradient dtype (the RMS is float32 either way)')
  parser.add_argument('--markdown', action='store_true')
  return parser.parse_args(argv)


def run_shape(shape: tuple[int, int], dtype: str, repeats: int
              ) -> list[list[str]]:
  g0 = jax.random.normal(jax.random.key(0), shape, dtype)
  g64 = np.asarray(g0, np.float64)
  want = g64 / np.sqrt(np.mean(g64 ** 2, axis=0, keepdims=True))
  tol = 2e-2 if dtype == 'bfloat16' else 1e-5
  fns = {k: _normalizer(f) for k, f in SUMS_OF_SQUARES.items()}
  buffers = {}
  for name, fn in fns.items():
    out = fn(jnp.copy(g0))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol,
                               atol=tol, err_msg=name)
    buffers[name] = out
  times: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      def call(name=name):
        buffers[name] = fns[name](buffers[name])
        return buffers[name]
      times[name].append(common.timed(call))
  nbytes = 3 * g0.size * g0.dtype.itemsize
  best = min(common.median(t) for t in times.values())
  library = common.median(times['blocks'])
  rows = []
  for name, ts in times.items():
    t = common.median(ts)
    q1, q3 = common.quartiles(ts)
    rows.append([f'{shape[0]}x{shape[1]}', name, f'{t * 1e3:.2f}',
                 f'{q1 * 1e3:.2f}-{q3 * 1e3:.2f}',
                 f'{nbytes / t / common.GB:.1f}', f'{t / best:.2f}',
                 f'{t / library:.2f}'])
  return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  common.print_header('benchmarks.column_reduction',
                      {'dtype': args.dtype, 'rounds': args.repeats})
  rows = []
  for text in args.shapes:
    rows += run_shape(parse_shape(text), args.dtype, args.repeats)
  print(common.format_table(
      ['shape', 'formulation', 'median ms', 'IQR ms', 'GB/s (3|G|)',
       '/ fastest', '/ blocks'], rows, args.markdown))
  print(f'load average at end: {common.load_average()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
