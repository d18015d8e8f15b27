"""The trainer's step on one accelerator: tokens/s, MFU and peak memory.

``python -m benchmarks.accelerator [--out docs/benchmarks-gpu.md]`` times the
full train step (forward, backward, optimizer update: ``train.step``) of
LLaMA-60M and LLaMA-350M at the paper's sequence length 256, bf16 compute,
scanned layers, attention ``auto`` (cuDNN's fused kernel on a GPU), for SCALE,
AdamW and Muon, and writes a Markdown table with the device name.

Each (model, optimizer) runs in a fresh subprocess: a device's
``peak_bytes_in_use`` cannot be reset, so one process per configuration
gives each its own peak. Inside it, the step is compiled, run ``--warmup``
times, then ``--steps`` times, each step blocked on its result; the table
gives the median step's tokens/s, MFU (``train.perf``: model FLOPs per token
``6N + 6LTd`` against the chip's dense bf16 peak) and the peak device memory.
Batches are synthetic tokens in device memory (no data pipeline: nothing here
imports grain or TensorFlow Datasets). The per-step batch is fixed per model
(``BATCH``), without gradient accumulation.

The table file is rewritten after every configuration, so a run cut short
keeps what it measured; configurations that do not fit in ``--budget-s`` are
listed as not run (SCALE on both models runs first). With the defaults a run
takes at most ``--budget-s`` plus one ``--timeout-s``: 7 minutes. ``--smoke`` runs a tiny model on any backend in seconds
(for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ('llama_60m', 'llama_350m')
OPTIMIZERS = ('scale', 'adamw', 'muon')
SEQ_LEN = 256
# Sequences per step, sized to fit an 80 GB H100 without remat (the peak
# memory of each row is in docs/benchmarks-gpu.md).
BATCH = {'llama_60m': 128, 'llama_350m': 64}
SMOKE_OVERRIDES = ('model.vocab_size=256', 'model.d_model=64',
                   'model.n_layers=2', 'model.n_heads=2', 'model.d_ff=128',
                   'model.dtype=float32')
SMOKE_SEQ_LEN, SMOKE_BATCH = 32, 4
RESULT_PREFIX = 'RESULT '


def _config(model: str, optimizer: str, batch: int, seq_len: int,
            extra: Sequence[str]):
  from benchmarks.common import config_for  # pylint: disable=g-import-not-at-top
  return config_for(model, [
      'model.dtype=bfloat16', 'model.scan_layers=true',
      'model.attention=auto', f'data.seq_len={seq_len}',
      f'data.batch_size={batch}', f'optimizer.name={optimizer}',
      'mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=1', *extra])


def measure(model: str, optimizer: str, batch: int, seq_len: int,
            steps: int, warmup: int, peak_tflops: Optional[float],
            extra: Sequence[str] = ()) -> dict[str, Any]:
  """Compiles and times one configuration in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import perf  # pylint: disable=g-import-not-at-top
  from train.model import attention_implementation  # pylint: disable=g-import-not-at-top
  from train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from train.state import make_setup  # pylint: disable=g-import-not-at-top
  from train.step import make_train_step  # pylint: disable=g-import-not-at-top

  config = _config(model, optimizer, batch, seq_len, extra)
  device = jax.devices()[0]
  mesh = mesh_lib.make_mesh(config.mesh, [device])
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                scan_layers=config.model.scan_layers)
  setup = make_setup(config, mesh, tx, schedule)
  keys = jax.random.split(jax.random.key(0), 2)
  batches = []
  for key in keys:  # Two batches, alternated: no step sees a constant input.
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0,
                                config.model.vocab_size, dtype=jnp.int32)
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
  times = []
  with jax.set_mesh(mesh):
    params = setup.init_params(0)
    opt_state = setup.init_opt_state(params)
    start = time.perf_counter()
    step = make_train_step(setup).lower(params, opt_state,
                                        batches[0]).compile()
    compile_s = time.perf_counter() - start
    for i in range(warmup + steps):
      start = time.perf_counter()
      params, opt_state, metrics = step(params, opt_state, batches[i % 2])
      jax.block_until_ready(metrics)
      if i >= warmup:
        times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_s = batch * seq_len / step_s
  flops = perf.flops_per_token(config.model, seq_len)
  peak = perf.peak_flops_per_device(device, config.model.dtype, peak_tflops)
  stats = device.memory_stats() or {}
  return {
      'model': model, 'optimizer': optimizer, 'batch': batch,
      'seq_len': seq_len, 'steps': steps, 'step_s': step_s,
      'tokens_per_s': tokens_per_s,
      'mfu': perf.mfu(tokens_per_s, flops, peak),
      'peak_bytes': stats.get('peak_bytes_in_use'),
      'compile_s': compile_s, 'loss': float(metrics['loss']),
      'attention': attention_implementation(config.model, device),
      'dtype': config.model.dtype, 'param_dtype': config.model.param_dtype,
      'device': device.device_kind, 'platform': device.platform,
      'jax': jax.__version__, 'peak_tflops': None if peak is None
      else peak / 1e12,
  }


def _child_command(args: argparse.Namespace, model: str, optimizer: str
                   ) -> list[str]:
  command = [sys.executable, '-m', 'benchmarks.accelerator', '--one', model,
             optimizer, '--steps', str(args.steps), '--warmup',
             str(args.warmup)]
  if args.smoke:
    command.append('--smoke')
  if args.peak_tflops is not None:
    command += ['--peak-tflops', str(args.peak_tflops)]
  return command


def _run_child(command: list[str], timeout: float) -> dict[str, Any]:
  """Runs one configuration's subprocess; its result, or why there is none."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p)}
  try:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  for line in done.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  print(f'--- {" ".join(command[3:])} failed (exit {done.returncode}), its '
        f'stderr ends:\n{done.stderr[-3000:]}\n---', flush=True)
  tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
  return {'error': f'exit {done.returncode}: {tail[:300]}'}


def _cell(value: Optional[float], fmt: str) -> str:
  return 'n/a' if value is None else format(value, fmt)


def table(results: Sequence[dict[str, Any]]) -> str:
  """The Markdown table of the results, one row per configuration, by model
  (in the order given) then optimizer."""
  models = list(dict.fromkeys(r['model'] for r in results))
  results = sorted(results, key=lambda r: models.index(r['model']))
  lines = ['| model | optimizer | batch x seq | tokens/s | MFU | peak memory '
           '(GB) | step (ms) | compile (s) | attention |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    if 'error' in r:
      lines.append(f'| {r["model"]} | {r["optimizer"]} | | '
                   f'{r["error"]} | | | | | |')
      continue
    peak_gb = None if r['peak_bytes'] is None else r['peak_bytes'] / 1e9
    lines.append(
        f'| {r["model"]} | {r["optimizer"]} | {r["batch"]} x {r["seq_len"]} '
        f'| {r["tokens_per_s"]:,.0f} | '
        f'{"n/a" if r["mfu"] is None else format(r["mfu"], ".1%")} | '
        f'{_cell(peak_gb, ".2f")} | {r["step_s"] * 1e3:.1f} | '
        f'{r["compile_s"]:.1f} | {r["attention"]} |')
  return '\n'.join(lines)


def document(results: Sequence[dict[str, Any]], command: str,
             elapsed_s: float, complete: bool) -> str:
  done = [r for r in results if 'error' not in r]
  first = done[0] if done else {}
  device = first.get('device', 'unknown (no configuration finished)')
  peak = first.get('peak_tflops')
  return '\n'.join([
      '# The train step on one accelerator',
      '',
      f'Device: **{device}** ({first.get("platform", "?")}), jax '
      f'{first.get("jax", "?")}; peak used for MFU: '
      f'{"unknown" if peak is None else f"{peak:g} TFLOP/s"} (dense bf16).',
      f'Command: `{command}` ({elapsed_s:.0f} s'
      f'{"" if complete else ", INCOMPLETE: see the rows"}).',
      '',
      f'Full train step (forward, backward, update) of `train.step`, compute '
      f'{first.get("dtype", "bfloat16")}, params '
      f'{first.get("param_dtype", "?")}, scanned layers, no remat, one '
      f'device, synthetic tokens; the median of the timed steps after the '
      f'warm-up. MFU counts model FLOPs `6N + 6LTd` per token (train/perf.py).'
      f' Peak memory is `memory_stats()["peak_bytes_in_use"]` of a fresh '
      f'process per row.',
      '',
      table(results),
      '',
  ])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.accelerator', description=__doc__.split(
          '\n\n')[0])
  parser.add_argument('--out', default='docs/benchmarks-gpu.md',
                      help='Markdown output path (rewritten after each row)')
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS))
  parser.add_argument('--steps', type=int, default=20,
                      help='timed steps per configuration (median taken)')
  parser.add_argument('--warmup', type=int, default=3,
                      help='steps run after compiling, not timed')
  parser.add_argument('--budget-s', type=float, default=270.0,
                      help='no new configuration starts after this many '
                      'seconds (default 270)')
  parser.add_argument('--timeout-s', type=float, default=150.0,
                      help='limit on one configuration\'s subprocess')
  parser.add_argument('--peak-tflops', type=float, default=None,
                      help='the device\'s peak TFLOP/s, over the built-in '
                      'table of chips (train.perf)')
  parser.add_argument('--smoke', action='store_true',
                      help='a tiny float32 model, batch 4 x 32, one model: '
                      'checks the whole path on any backend in seconds')
  parser.add_argument('--one', nargs=2, metavar=('MODEL', 'OPTIMIZER'),
                      help=argparse.SUPPRESS)  # The per-row subprocess.
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.one:
    model, optimizer = args.one
    batch, seq_len = ((SMOKE_BATCH, SMOKE_SEQ_LEN) if args.smoke
                      else (BATCH.get(model, 64), SEQ_LEN))
    extra = SMOKE_OVERRIDES if args.smoke else ()
    try:
      result = measure(model, optimizer, batch, seq_len, args.steps,
                       args.warmup, args.peak_tflops, extra)
    except Exception as e:  # pylint: disable=broad-except
      if 'cudnn' not in repr(e).lower():
        raise
      # A cuDNN without the fused kernel must not cost the whole table.
      result = measure(model, optimizer, batch, seq_len, args.steps,
                       args.warmup, args.peak_tflops,
                       (*extra, 'model.attention=xla'))
      result['attention'] = 'xla (cudnn failed)'
      print(f'cudnn attention failed, measured with xla: {e!r:.500}',
            file=sys.stderr)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0

  command = 'python -m benchmarks.accelerator ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  models = [m for m in args.models.split(',') if m]
  if args.smoke:
    models = models[:1]
  optimizers = [o for o in args.optimizers.split(',') if o]
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  results: list[dict[str, Any]] = []
  # Optimizer-major, so that a run cut short has SCALE on both models first.
  for optimizer in optimizers:
    for model in models:
      elapsed = time.perf_counter() - start
      if elapsed > args.budget_s:
        result = {'error': f'not run (--budget-s {args.budget_s:g} spent)'}
      else:
        result = _run_child(_child_command(args, model, optimizer),
                            args.timeout_s)
      results.append({'model': model, 'optimizer': optimizer, **result})
      row = table(results[-1:]).splitlines()[-1]
      print(f'[{time.perf_counter() - start:.0f} s] {row}', flush=True)
      out.write_text(document(results, command,
                              time.perf_counter() - start, complete=False))
  text = document(results, command, time.perf_counter() - start,
                  complete=all('error' not in r for r in results))
  out.write_text(text)
  print(text)
  print(f'written to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
