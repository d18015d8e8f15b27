"""The study's cost, from a measurement: ``python -m train.study --estimate``.

Each optimizer of the study compiles its sweep model's train step and runs it
``steps`` times on random tokens (the trainer's own ``train.step`` on this
process's devices), timing the wall clock and the process's CPU time (user +
system, every thread) of the compile and of the steps. A planned run then
costs ``compile + (steps + diagnostic steps + evaluations) * step``, where
an evaluation of ``eval_tokens`` tokens counts as a third of the training
time of as many tokens (forward only) and a diagnostic step as one training
step; data loading and checkpoints are left out (small next to the steps
for the study's model). CPU time is the figure to quote on a shared machine:
other processes' load stretches the wall clock more than it changes the CPU
seconds a step needs.

The plan: every sweep run; ``2 * neighbours + 1`` long runs per optimizer and
sweep seed (a best rate at the end of its grid has fewer neighbours, and the
walk past a best long rate at the edge of the long runs adds one per grid
step: neither is known before the runs, so neither is counted);
``(len(always) + top) * extra seeds`` finalist runs at the mean long-run cost
(which optimizers they are is decided by the study).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

from ..config import Config
from .config import LONG, SWEEP, Study, run_config


@dataclasses.dataclass(frozen=True)
class Speed:
  """One optimizer's measured cost on the study model, in seconds."""
  optimizer: str
  step_s: float         # wall per training step
  step_cpu_s: float     # process CPU per training step
  compile_s: float      # wall of the first call (compile + one step)
  compile_cpu_s: float  # its CPU


def _clock() -> tuple[float, float]:
  t = os.times()
  return time.perf_counter(), t.user + t.system


def measure(config: Config, steps: int) -> Speed:
  """Compiles and times ``steps`` train steps of ``config`` on random tokens."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from .. import mesh as mesh_lib
  from ..optim import make_optimizer
  from ..state import make_setup
  from ..step import make_train_step
  # pylint: enable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                config.rivals,
                                scan_layers=config.model.scan_layers)
  setup = make_setup(config, mesh, tx, schedule)
  rng = np.random.default_rng(0)
  d = config.data
  tokens = rng.integers(0, config.model.vocab_size,
                        size=(2, d.batch_size, d.seq_len + 1), dtype=np.int32)
  batches = [{'inputs': t[:, :-1], 'targets': t[:, 1:]} for t in tokens]
  with jax.set_mesh(mesh):
    params = setup.init_params(config.train.seed)
    opt_state = setup.init_opt_state(params)
    step = make_train_step(setup)
    wall0, cpu0 = _clock()
    params, opt_state, metrics = step(params, opt_state, batches[0])
    jax.block_until_ready(metrics)
    wall1, cpu1 = _clock()
    for i in range(steps):  # Blocked on each step, as the trainer's loop.
      params, opt_state, metrics = step(params, opt_state, batches[i % 2])
      jax.block_until_ready(metrics)
    wall2, cpu2 = _clock()
  return Speed(config.optimizer.name, (wall2 - wall1) / steps,
               (cpu2 - cpu1) / steps, wall1 - wall0, cpu1 - cpu0)


def run_seconds(config: Config, speed: Speed) -> tuple[float, float]:
  """Estimated ``(wall, CPU)`` seconds of one run of ``config``."""
  t = config.train
  tokens_per_step = config.data.batch_size * config.data.seq_len
  evals = ((t.steps // t.eval_every + bool(t.steps % t.eval_every))
           * t.eval_tokens / tokens_per_step / 3)  # Each eval_every + last.
  diagnostics = t.steps // t.diagnostics_every if t.diagnostics_every else 0
  steps = t.steps + diagnostics + evals
  return (speed.compile_s + steps * speed.step_s,
          speed.compile_cpu_s + steps * speed.step_cpu_s)


def plan(study: Study) -> dict[str, dict[str, int]]:
  """Runs per optimizer and phase (see the module docstring)."""
  seeds = len(study.seeds)
  out = {}
  for name, rates in study.optimizers.items():
    out[name] = {SWEEP: len(rates) * seeds}
    if study.long_train is not None:
      out[name][LONG] = min(len(rates), 2 * study.long_neighbours + 1) * seeds
  return out


def _covers(study: Study, estimate: dict[str, Any]) -> bool:
  """Whether ``estimate`` measured every optimizer of ``study`` in each of
  its phases (else it was measured for another study)."""
  per_opt = estimate['optimizers']
  return all(name in per_opt and f'{phase}_run_cpu_s' in per_opt[name]
             for name in study.optimizers for phase in study.phases)


def _run_cpu_s(row: dict[str, Any], estimate: dict[str, Any]) -> float:
  return estimate['optimizers'][row['optimizer']][f'{row["phase"]}_run_cpu_s']


def remaining(study: Study, rows: list[dict[str, Any]],
              estimate: dict[str, Any]) -> Optional[tuple[int, float]]:
  """``(runs, CPU seconds)`` left at ``estimate``'s rates.

  ``rows`` are the rows of every run planned so far (``all_specs``); the
  unfinished ones count in full (a run resumed half-way counts whole), plus
  :func:`plan`'s long runs of each optimizer still in its sweep and the
  finalists' runs until they are planned. Walk steps not yet queued are
  not counted. None when ``estimate`` lacks one of the study's optimizers.
  """
  if not _covers(study, estimate):
    return None
  left = [r for r in rows if r['status'] == 'missing']
  runs = len(left)
  cpu = sum(_run_cpu_s(r, estimate) for r in left)
  per_opt = estimate['optimizers']
  if study.long_train is not None:
    planned = {r['optimizer'] for r in rows if r['phase'] == LONG}
    swept = {r['optimizer'] for r in rows if r['phase'] == SWEEP} - {
        r['optimizer'] for r in left if r['phase'] == SWEEP}
    for name, count in plan(study).items():
      # Swept and no long run planned: every rate diverged, nothing follows.
      if name not in planned and name not in swept:
        runs += count[LONG]
        cpu += count[LONG] * per_opt[name]['long_run_cpu_s']
  if not any(r['seed'] not in study.seeds for r in rows):
    runs += estimate['finalist_runs']
    cpu += estimate['finalist_runs'] * estimate['finalist_run_cpu_s']
  return runs, cpu


def spent(study: Study, rows: list[dict[str, Any]], estimate: dict[str, Any]
          ) -> Optional[dict[str, tuple[int, float]]]:
  """The finished runs (done or diverged) per kind, ``'sweep'``, ``'long'``
  (walk steps included) and ``'finalist'`` (a seed beyond the study's),
  each ``(runs, CPU seconds)`` at ``estimate``'s rates: what the study has
  cost so far, and, once it is whole, what running it again from scratch
  costs. A run counts whole (a diverged one ended early). None as for
  :func:`remaining`."""
  if not _covers(study, estimate):
    return None
  out = {}
  for row in rows:
    if row['status'] == 'missing':
      continue
    kind = 'finalist' if row['seed'] not in study.seeds else row['phase']
    runs, cpu = out.get(kind, (0, 0.0))
    out[kind] = (runs + 1, cpu + _run_cpu_s(row, estimate))
  return out


def estimate_study(study: Study, steps: int = 20,
                   say: Callable[..., None] = print) -> dict[str, Any]:
  """Measures every optimizer and returns the study's estimated cost:
  ``{'optimizers': {name: {...}}, 'finalist_runs': n, 'wall_s': ...,
  'cpu_s': ..., ...}``."""
  runs = plan(study)
  n_final = min(len(study.finalists_always) + study.finalists_top,
                len(study.optimizers)) * len(
                    [s for s in study.finalist_seeds if s not in study.seeds])
  per_opt, finals, wall, cpu = {}, [], 0.0, 0.0
  load = os.getloadavg()[0]
  for name, rates in study.optimizers.items():
    lr = sorted(rates)[len(rates) // 2]
    speed = measure(run_config(study, SWEEP, name, lr, study.seeds[0]), steps)
    entry = {**dataclasses.asdict(speed), 'runs': runs[name],
             'wall_s': 0.0, 'cpu_s': 0.0}
    for phase, count in runs[name].items():
      run_wall, run_cpu = run_seconds(
          run_config(study, phase, name, lr, study.seeds[0]), speed)
      entry[f'{phase}_run_cpu_s'] = run_cpu
      entry['wall_s'] += count * run_wall
      entry['cpu_s'] += count * run_cpu
      if phase == study.final_phase:
        finals.append((run_wall, run_cpu))
    per_opt[name] = entry
    wall += entry['wall_s']
    cpu += entry['cpu_s']
    say(f'{name}: {speed.step_s * 1e3:.1f} ms/step wall, '
        f'{speed.step_cpu_s * 1e3:.1f} ms CPU; compile {speed.compile_s:.0f} '
        f's; runs {runs[name]}: {entry["cpu_s"] / 3600:.2f} CPU hours')
  final_wall = sum(w for w, _ in finals) / len(finals)
  final_cpu = sum(c for _, c in finals) / len(finals)
  wall += n_final * final_wall
  cpu += n_final * final_cpu
  load = max(load, os.getloadavg()[0])
  say(f'{n_final} finalist runs: {n_final * final_cpu / 3600:.2f} CPU hours. '
      f'Total: {cpu / 3600:.1f} CPU hours; {wall / 3600:.1f} hours wall in '
      f'sequence at this machine\'s load ({os.cpu_count()} cores, load '
      f'average up to {load:.1f})')
  return {'optimizers': per_opt, 'finalist_runs': n_final,
          'finalist_run_cpu_s': final_cpu, 'wall_s': wall, 'cpu_s': cpu,
          'measured_steps': steps, 'cpu_count': os.cpu_count(),
          'load_average': load}
