"""Speed of the optimizer update alone, against a bytes-moved floor.

``python -m benchmarks.update_speed [--configs llama_60m,llama_130m]
[--optimizers ...] [--mode apply|update] [--repeats 30] [--markdown]``

What is timed, per optimizer (``train.optim.make_optimizer``: the trainer's
optimizer with its warmup-cosine schedule; gradient clipping off unless
``--grad-clip`` is given, so that only the optimizer is measured):

* ``--mode apply`` (default): ``params, state = f(params, state, grads)`` with
  ``f = tx.update`` then ``optax.apply_updates``, jitted, params and state
  DONATED (updated in place, as in the train step); the gradients are one
  fixed random tree (normal, std 1e-3), not donated, passed to every call.
* ``--mode update``: ``updates, state = tx.update(grads, state, params)``,
  state donated, params and grads not; the previous call's updates are passed
  in donated (and unused), so the new updates reuse their buffers instead of
  fresh memory each call (on CPU, first-touch page faults of a fresh output
  would otherwise dominate).

Every optimizer gets its own copy of the same initial parameters. Calls are
interleaved (per round, each optimizer in turn, the order rotated each round)
so that load drifts hit all alike; the median and the quartiles over the rounds
are reported. In its turn an optimizer makes ``--settle-calls`` untimed calls
(default 1; none for optimizers too slow for ``--repeats`` calls within
``--max-seconds``) and then the timed one, so that what the previous optimizer
left behind (its freed temporaries, hundreds of MB for Adafactor and Muon, whose
pages the next call must touch again) is not charged to it: the steady state is
what a training loop sees.
Each round also times three streaming kernels on a params-shaped tree,
donated: ``P * 1.0001`` (read + write), ``P + G`` and ``P - 1e-3 G`` (two reads
+ write); the copy bandwidth is the highest of their medians.

The floor is the bytes a single pass must move, over that bandwidth:

* apply: read the gradients, read and write the params, read and write every
  optimizer-state array once: ``|G| + 2 |P| + 2 |S|`` (the updates never reach
  memory when ``apply_updates`` is fused in). The column ``time / (floor +
  U)`` also counts the updates written once, ``|U| = |P|``, as the issue's
  wording of the floor does ("gradient in + update out + ... + params read and
  write").
* update: read the gradients, write the updates, read and write the state:
  ``|G| + |U| + 2 |S|`` (params not counted: no optimizer here needs them at
  weight decay 0, although Optax's AdamW still reads them).

For SCALE ``|S|`` is the LM head's momentum plus AdamW's moments of the 1-D
leaves; for AdamW it is ``2 |P|``. Clipping by the global norm (``--grad-clip``)
needs the whole gradient before any update can be written, so with it a
single-pass floor is not reachable: expect at least one more read of ``|G|``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import scale_optax
from benchmarks import common
from train import mesh as mesh_lib
from train.optim import make_optimizer
from train.state import make_setup

TARGET_VS_ADAMW = 0.5
TARGET_VS_FLOOR = 2.0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.update_speed',
      description=__doc__.split('\n')[0])
  common.add_common_args(parser, ('llama_60m', 'llama_130m'))
  parser.add_argument('--mode', choices=['apply', 'update'], default='apply',
                      help='apply: update + apply_updates with params and '
                      'state donated (default); update: tx.update alone')
  parser.add_argument('--repeats', type=int, default=30,
                      help='timed calls per optimizer (default 30)')
  parser.add_argument('--max-seconds', type=float, default=20.0,
                      help='cap on the timed calls of one optimizer on one '
                      'config, in seconds (slow ones get fewer repeats, at '
                      'least --min-repeats); default 20')
  parser.add_argument('--min-repeats', type=int, default=1,
                      help='timed calls at least, whatever --max-seconds '
                      'says (default 1: Muon takes seconds a call on CPU)')
  parser.add_argument('--settle-calls', type=int, default=1,
                      help='untimed calls of an optimizer before its timed '
                      'call in each round (default 1; see the docstring)')
  parser.add_argument('--grad-clip', type=float, default=None,
                      help='include clip_by_global_norm(VALUE) as the trainer '
                      'does (default: off)')
  parser.add_argument('--hlo-dir', default=None,
                      help='write each compiled update\'s HLO text here')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def _hlo_summary(text: str) -> str:
  entry = text[text.find('ENTRY'):]
  fusions = len(re.findall(r'= \S+ fusion\(', entry))
  loops = len(re.findall(r'\bwhile\(', entry))
  return f'{fusions} fusions' + (f', {loops} loops' if loops else '')


class Case:
  """One optimizer's compiled update and its threaded arguments."""

  def __init__(self, name: str, config, params: Any, grads: Any,
               mode: str):
    self.name = name
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                  config.rivals)
    setup = make_setup(config, mesh, tx, schedule)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)
    self.grads = grads
    self.mode = mode
    self.param_bytes = scale_optax.state_bytes(params)
    self.state_bytes = scale_optax.state_bytes(setup.abstract_opt_state)
    if mode == 'apply':
      def f(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s
      args, donate = (self.params, self.state, grads), (0, 1)
      self.floor_bytes = self.param_bytes * 3 + 2 * self.state_bytes
    else:
      def f(g, s, p, previous_updates):
        del previous_updates  # Donated: its buffers take the new updates.
        return tx.update(g, s, p)
      self.updates = jax.tree.map(jnp.zeros_like, params)
      args, donate = (grads, self.state, self.params, self.updates), (1, 3)
      self.floor_bytes = self.param_bytes * 2 + 2 * self.state_bytes
    start = time.perf_counter()
    # keep_unused: the donated previous updates must stay an argument.
    self.compiled = jax.jit(f, donate_argnums=donate, keep_unused=True
                            ).lower(*args).compile()
    self.compile_seconds = time.perf_counter() - start
    self.hlo = self.compiled.as_text()
    analysis = self.compiled.memory_analysis()
    self.temp_bytes = getattr(analysis, 'temp_size_in_bytes', None)
    self.times: list[float] = []
    self.target = 0
    self.settle = 0

  def call(self) -> Any:
    if self.mode == 'apply':
      self.params, self.state = self.compiled(self.params, self.state,
                                              self.grads)
      return self.params
    self.updates, self.state = self.compiled(self.grads, self.state,
                                             self.params, self.updates)
    return self.updates


class Bandwidth:
  """Streaming kernels on a params-shaped tree, donated.

  ``P <- P * 1.0001`` moves ``2 |P|`` bytes; ``P <- P + G`` and the axpy
  ``P <- P - 1e-3 G`` move ``3 |P|``; all over the update's array shapes.
  """

  KERNELS = {
      'P*1.0001': (2, lambda x, y: jax.tree.map(lambda a: a * 1.0001, x)),
      'P+G': (3, lambda x, y: jax.tree.map(jnp.add, x, y)),
      'P-1e-3*G': (3, lambda x, y: jax.tree.map(lambda a, b: a - 1e-3 * b,
                                                 x, y)),
  }

  def __init__(self, params: Any, grads: Any):
    self.nbytes = scale_optax.state_bytes(params)
    self.x = jax.tree.map(jnp.copy, params)
    self.y = grads
    self.fns = {k: jax.jit(f, donate_argnums=0)
                for k, (_, f) in self.KERNELS.items()}
    self.times: dict[str, list[float]] = {k: [] for k in self.KERNELS}
    for _ in range(2):
      self.run()
    for t in self.times.values():
      t.clear()

  def run(self) -> None:
    for name, fn in self.fns.items():
      def call(fn=fn):
        self.x = fn(self.x, self.y)
        return self.x
      self.times[name].append(common.timed(call))

  def gbps(self) -> dict[str, float]:
    """Median bandwidth of each kernel, GB/s."""
    return {k: self.KERNELS[k][0] * self.nbytes / common.median(t) / common.GB
            for k, t in self.times.items()}


def run_config(args: argparse.Namespace, cname: str) -> dict[str, Any]:
  overrides = ['mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=1',
               f'optimizer.grad_clip={args.grad_clip if args.grad_clip else "null"}']
  overrides += list(args.override)
  configs = {o: common.config_for(cname, overrides + [f'optimizer.name={o}'])
             for o in args.optimizers}
  first = configs[args.optimizers[0]]
  mesh = mesh_lib.make_mesh(first.mesh, jax.devices()[:1])
  tx0, schedule0 = make_optimizer(first.optimizer, first.train.steps,
                                  first.rivals)
  setup0 = make_setup(first, mesh, tx0, schedule0)
  params = setup0.init_params(args.seed)
  key = jax.random.key(args.seed + 1)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  grads = jax.tree.unflatten(treedef, [
      1e-3 * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])
  bandwidth = Bandwidth(params, grads)
  cases = []
  for oname in args.optimizers:
    case = Case(oname, configs[oname], params, grads, args.mode)
    first_call = common.timed(case.call)  # Warm-up (allocations, caches).
    case.target = max(args.min_repeats,
                      min(args.repeats, int(args.max_seconds / first_call)))
    # Only fast optimizers settle: a call of seconds (Muon) outlasts whatever
    # the previous optimizer left behind.
    case.settle = args.settle_calls if case.target == args.repeats else 0
    cases.append(case)
    if args.hlo_dir:
      import pathlib  # pylint: disable=g-import-not-at-top
      path = pathlib.Path(args.hlo_dir)
      path.mkdir(parents=True, exist_ok=True)
      (path / f'{cname}_{oname}_{args.mode}.txt').write_text(case.hlo)
  del params
  rounds = 0
  while any(len(c.times) < c.target for c in cases):
    shift = rounds % len(cases)
    for case in cases[shift:] + cases[:shift]:
      if len(case.times) < case.target:
        for _ in range(case.settle):
          jax.block_until_ready(case.call())
        case.times.append(common.timed(case.call))
    bandwidth.run()
    rounds += 1
  return {'cases': cases, 'param_bytes': cases[0].param_bytes,
          'rounds': rounds, 'bandwidth': bandwidth.gbps()}


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  common.check_optimizers(args.optimizers)
  clip = f'clip_by_global_norm({args.grad_clip})' if args.grad_clip else 'off'
  common.print_header('benchmarks.update_speed', {
      'mode': args.mode, 'gradient clipping': clip,
      'donated': ('params + state' if args.mode == 'apply'
                  else 'state + previous updates')})
  summary = []
  for cname in args.configs:
    out = run_config(args, cname)
    bws = out['bandwidth']
    bw = max(bws.values())
    cases = {c.name: c for c in out['cases']}
    adamw = cases.get('adamw')
    adamw_t = adamw and common.median(adamw.times)
    rows = []
    for c in out['cases']:
      t = common.median(c.times)
      q1, q3 = common.quartiles(c.times)
      floor_t = c.floor_bytes / (bw * common.GB)
      # The wording counts the updates written too (|U| = |P|).
      floor_u = (c.floor_bytes + c.param_bytes) / (bw * common.GB)
      rows.append([
          c.name, f'{t * 1e3:.1f}', f'{q1 * 1e3:.1f}-{q3 * 1e3:.1f}',
          len(c.times), common.ratio(t, adamw_t, 2),
          f'{c.state_bytes / common.MB:.1f}',
          f'{c.floor_bytes / common.MB:.0f}', f'{floor_t * 1e3:.1f}',
          f'{t / floor_t:.2f}',
          *([f'{t / floor_u:.2f}'] if args.mode == 'apply' else []),
          'n/a' if c.temp_bytes is None else f'{c.temp_bytes / common.MB:.1f}',
          _hlo_summary(c.hlo)])
      summary.append((cname, c.name, t, floor_t, floor_u, adamw_t))
    kernels = ', '.join(f'{k} {v:.1f}' for k, v in bws.items())
    print(f'\n{cname}: params {out["param_bytes"] / common.MB:.1f} MB; '
          f'bandwidth on the params tree (GB/s) {kernels}; floor at the '
          f'best, {bw:.1f} GB/s; {out["rounds"]} interleaved rounds')
    print(common.format_table(
        ['optimizer', 'median ms', 'IQR ms', 'calls', '/ AdamW',
         'state MB', 'floor MB', 'floor ms', 'time / floor']
        + (['time / (floor + U)'] if args.mode == 'apply' else [])
        + ['compiled temps MB', 'compiled HLO'], rows, args.markdown))
  print()
  for cname, oname, t, floor_t, floor_u, adamw_t in summary:
    if oname != 'scale':
      continue
    if adamw_t:
      print(f'target {cname}: SCALE update <= {TARGET_VS_ADAMW}x AdamW: '
            f'{t / adamw_t:.2f}x {common.verdict(t / adamw_t <= TARGET_VS_ADAMW)}')
    line = (f'target {cname}: SCALE within {TARGET_VS_FLOOR}x of the bytes '
            f'floor: {t / floor_t:.2f}x '
            f'{common.verdict(t / floor_t <= TARGET_VS_FLOOR)}')
    if args.mode == 'apply':
      line += (f'; counting the updates written as well: {t / floor_u:.2f}x '
               f'{common.verdict(t / floor_u <= TARGET_VS_FLOOR)}')
    print(line)
  print(f'load average at end: {common.load_average()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
