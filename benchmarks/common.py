"""Helpers shared by the benchmarks: configs, devices, timing, tables."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax

from train.__main__ import resolve_config_path
from train.config import Config, load_config
from train.optim import KNOWN

GB = 1e9      # Decimal gigabytes, as the paper reports memory.
MB = 1e6
LLAMA_CONFIGS = ('llama_60m', 'llama_130m', 'llama_350m', 'llama_1b',
                 'llama_7b')
OPTIMIZERS_DEFAULT = ('scale', 'adamw', 'sgd', 'muon', 'adafactor')


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() in ('gpu', 'cuda', 'rocm')


def compute_dtype(choice: str) -> str:
  """``auto``: bfloat16 on a GPU (the paper's setting), float32 on CPU.

  XLA:CPU has no fast bfloat16 matmuls, so CPU timings use float32.
  """
  if choice != 'auto':
    return choice
  return 'bfloat16' if on_gpu() else 'float32'


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
  """``--dtype``, read with :func:`compute_dtype`."""
  parser.add_argument('--dtype', default='auto',
                      choices=['auto', 'float32', 'bfloat16'],
                      help='compute dtype (auto: bfloat16 on a GPU, float32 '
                      'on CPU)')


def config_for(name: str, overrides: Sequence[str] = ()) -> Config:
  """Loads ``configs/<name>.yaml`` (or a path) with dotted overrides."""
  return load_config(resolve_config_path(name), list(overrides))


def split_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def check_optimizers(names: Sequence[str]) -> None:
  unknown = [n for n in names if n not in KNOWN]
  if unknown:
    raise SystemExit(f'unknown optimizer(s) {unknown}; known: '
                     f'{", ".join(KNOWN)}')


def add_common_args(parser: argparse.ArgumentParser, configs: Sequence[str],
                    optimizers: Sequence[str] = OPTIMIZERS_DEFAULT) -> None:
  parser.add_argument('--configs', type=split_list, default=list(configs),
                      help='comma-separated config names in configs/ (or '
                      f'paths); default: {",".join(configs)}')
  parser.add_argument('--optimizers', type=split_list,
                      default=list(optimizers),
                      help='comma-separated optimizer names of '
                      f'train.optim; default: {",".join(optimizers)}')
  parser.add_argument('--markdown', action='store_true',
                      help='print the tables as Markdown')
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE',
                      help='a dotted config override applied to every config '
                      '(repeatable), e.g. model.n_layers=2')


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {
      'date': datetime.date.today().isoformat(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'device': f'{len(jax.devices())} x {dev.device_kind}',
      'cpus': os.cpu_count(),
      'python': platform.python_version(),
  }


def load_average() -> str:
  try:
    one, five, _ = os.getloadavg()
  except OSError:
    return 'n/a'
  return f'{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs'


def print_header(title: str, extra: Optional[dict[str, Any]] = None) -> None:
  env = environment()
  if extra:
    env.update(extra)
  print(f'== {title}')
  print('   ' + ', '.join(f'{k} {v}' for k, v in env.items()))
  print(f'   load average at start: {load_average()}')


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 markdown: bool = False) -> str:
  """A plain-text (right-aligned columns) or Markdown table."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  if markdown:
    lines = ['| ' + ' | '.join(cells[0]) + ' |',
             '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in cells[1:]]
    return '\n'.join(lines)
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  fmt = lambda r: '  '.join(c.rjust(w) if i else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  lines = [fmt(cells[0]), '  '.join('-' * w for w in widths)]
  lines += [fmt(r) for r in cells[1:]]
  return '\n'.join(lines)


def timed(fn: Callable[[], Any]) -> float:
  """Seconds for one call of ``fn``, blocking on its result."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
  """The 25th and 75th percentiles (the sample itself when it is short)."""
  if len(xs) < 4:
    return min(xs), max(xs)
  q = statistics.quantiles(xs, n=4, method='inclusive')
  return q[0], q[2]


def ratio(a: Optional[float], b: Optional[float], digits: int = 3) -> str:
  if a is None or b is None or b == 0:
    return 'n/a'
  return f'{a / b:.{digits}f}'


def verdict(ok: bool) -> str:
  return 'MET' if ok else 'MISSED'
