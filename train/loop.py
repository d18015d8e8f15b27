"""The training loop: set up, resume or initialize, step, evaluate, save.

``train(config)`` is the whole program behind ``python -m train``; it returns
the run's summary (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from train import data as data_lib
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.config import Config, DistributedConfig, to_dict
from train.metrics import MetricsWriter, plot_losses
from train.optim import make_optimizer
from train.state import TrainSetup, make_setup, memory_report
from train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many consecutive non-finite steps)."""


def initialize_distributed(config: DistributedConfig) -> None:
  """Calls ``jax.distributed.initialize`` when the config asks for several processes."""
  if config.coordinator_address is None and config.num_processes is None:
    return
  local_ids = None
  if config.local_device_ids:
    local_ids = [int(i) for i in config.local_device_ids.split(',')]
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes, process_id=config.process_id,
      local_device_ids=local_ids)


def run_directory(config: Config) -> pathlib.Path:
  """``train.run_dir`` with ``{optimizer}`` replaced by the optimizer's name."""
  return pathlib.Path(config.train.run_dir.format(
      optimizer=config.optimizer.name))


def _abstract_train_state(setup: TrainSetup) -> dict[str, Any]:
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype,
                                              sharding=setup.replicated)
  return {'params': setup.abstract_params,
          'opt_state': setup.abstract_opt_state,
          'step': scalar(jnp.int32),
          'rng': jax.ShapeDtypeStruct((2,), jnp.uint32,
                                      sharding=setup.replicated)}


def _global_batch(setup: TrainSetup, local: dict[str, np.ndarray]
                  ) -> dict[str, jax.Array]:
  sharding = mesh_lib.batch_sharding(setup.mesh, setup.config.mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def evaluate(setup: TrainSetup, eval_step: Any, params: Any,
             batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Mean token loss and perplexity over the evaluation batches."""
  loss_sum, tokens = 0.0, 0.0
  for batch in batches:
    out = eval_step(params, _global_batch(setup, batch))
    loss_sum += float(out['loss_sum'])
    tokens += float(out['tokens'])
  loss = loss_sum / tokens
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'eval_tokens': int(tokens)}


class _StopFlag:
  """Set by SIGTERM (preemption) or Ctrl-C; the loop saves and exits."""

  def __init__(self):
    self.reason: Optional[str] = None

  def __call__(self, signum, frame):
    del frame
    self.reason = signal.Signals(signum).name

  def install(self) -> dict[int, Any]:
    return {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}


def train(config: Config, resume: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the training run described by ``config``."""
  t_start = time.time()
  initialize_distributed(config.distributed)
  run_dir = run_directory(config)
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)

  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  dataset = data_lib.prepare(config.data, config.model.vocab_size)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  setup = make_setup(config, mesh, tx, schedule)
  memory = memory_report(setup)
  say(f'model: {memory["param_bytes"] / 4:,.0f} params' if
      config.model.param_dtype == 'float32' else 'model:',
      f'| param bytes {memory["param_bytes"]:,} | {config.optimizer.name} '
      f'state bytes {memory["opt_state_bytes"]:,} '
      f'({memory["opt_state_bytes"] / memory["param_bytes"]:.3f} x params) '
      f'| mesh {dict(mesh.shape)} on {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)')

  pindex, pcount = jax.process_index(), jax.process_count()
  local_batch = config.data.batch_size // pcount
  train_iter = dataset.train_iter(local_batch, config.data.seq_len,
                                  seed=config.train.seed,
                                  process_index=pindex, process_count=pcount)
  eval_batches = dataset.eval_batches(local_batch, config.data.seq_len,
                                      config.train.eval_batches,
                                      process_index=pindex,
                                      process_count=pcount)

  checkpointer = Checkpointer(run_dir / 'checkpoints',
                              config.train.keep_checkpoints)
  latest = checkpointer.latest_step() if resume else None
  if latest is not None:
    restored = checkpointer.restore(latest, _abstract_train_state(setup),
                                    train_iter)
    params, opt_state = restored['params'], restored['opt_state']
    rng = restored['rng']
    start = int(restored['step'])
    say(f'resumed from step {start} ({checkpointer.directory})')
  else:
    params = setup.init_params(config.train.seed)
    opt_state = setup.init_opt_state(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)),
                         setup.replicated)
    start = 0
  if is_main:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(to_dict(config)))

  writer = MetricsWriter(run_dir)
  writer.truncate_after(start)
  train_step = make_train_step(setup)
  eval_step = make_eval_step(setup)
  tokens_per_step = config.data.batch_size * config.data.seq_len

  def save(step: int) -> None:
    checkpointer.save(step, {'params': params, 'opt_state': opt_state,
                             'step': jnp.asarray(step, jnp.int32), 'rng': rng},
                      train_iter)

  stop = _StopFlag()
  previous_handlers = stop.install()
  eval_result: dict[str, float] = {}
  step_time, timed_steps, skips_in_a_row = 0.0, 0, 0
  progress = _progress(config, start, enabled=is_main and config.train.progress)
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, config.train.steps + 1):
        t0 = time.perf_counter()
        batch = _global_batch(setup, next(train_iter))
        params, opt_state, metrics = train_step(params, opt_state, batch)
        metrics = jax.device_get(metrics)  # One sync per step (see DESIGN §4).
        if step > start + 1:  # The first step compiles.
          step_time += time.perf_counter() - t0
          timed_steps += 1
        tokens = step * tokens_per_step
        skips_in_a_row = skips_in_a_row + 1 if metrics['skipped'] else 0
        tok_s = timed_steps * tokens_per_step / step_time if step_time else 0.0
        if step % config.train.log_every == 0 or metrics['skipped']:
          writer.write('train', step, tokens=tokens,
                       loss=float(metrics['loss']),
                       grad_norm=float(metrics['grad_norm']),
                       learning_rate=float(schedule(step - 1)),
                       skipped=int(metrics['skipped']), tokens_per_s=tok_s)
        progress.update(1)
        progress.set_postfix(loss=f'{float(metrics["loss"]):.3f}',
                             tok_s=f'{tok_s:,.0f}', refresh=False)
        if skips_in_a_row > config.train.max_consecutive_skips:
          save(step)
          raise TrainingError(
              f'{skips_in_a_row} consecutive steps had a non-finite loss or '
              f'gradient (last at step {step}); stopped with the last good '
              f'state saved at step {step}. Lower optimizer.learning_rate or '
              f'check the data.')
        if step % config.train.eval_every == 0 or step == config.train.steps:
          eval_result = evaluate(setup, eval_step, params, eval_batches)
          writer.write('eval', step, tokens=tokens, **eval_result)
          progress.write(f'step {step}: eval loss {eval_result["loss"]:.4f}, '
                         f'perplexity {eval_result["perplexity"]:.2f}')
        if step % config.train.checkpoint_every == 0 or \
            step == config.train.steps or stop.reason:
          save(step)
        if stop.reason:
          progress.write(f'{stop.reason}: checkpoint saved at step {step}, '
                         f'exiting.')
          break
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)

  final_step = step if config.train.steps > start else start
  if not eval_result:  # Resumed a finished run: report its final quality.
    with jax.set_mesh(mesh):
      eval_result = evaluate(setup, eval_step, params, eval_batches)
  summary = {
      'optimizer': config.optimizer.name,
      'steps': final_step,
      'tokens': final_step * tokens_per_step,
      'eval_loss': eval_result.get('loss'),
      'eval_perplexity': eval_result.get('perplexity'),
      'tokens_per_s': (timed_steps * tokens_per_step / step_time
                       if step_time else None),
      'wall_s': time.time() - t_start,
      'stopped_by': stop.reason,
      **memory,
  }
  if is_main:
    (run_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
    if writer.path.exists():
      plot_losses(writer.path, run_dir / 'loss.png',
                  f'{config.optimizer.name}: LLaMA d{config.model.d_model} '
                  f'L{config.model.n_layers}')
    say(_summary_line(summary, run_dir))
  return summary


def _summary_line(s: dict[str, Any], run_dir: pathlib.Path) -> str:
  ppl = (f'{s["eval_perplexity"]:.2f}' if s['eval_perplexity'] is not None
         else 'n/a')
  tps = f'{s["tokens_per_s"]:,.0f}' if s['tokens_per_s'] else 'n/a'
  return (f'summary: {s["optimizer"]} | step {s["steps"]} | '
          f'{s["tokens"]:,} tokens | eval perplexity {ppl} | {tps} tokens/s | '
          f'{s["wall_s"]:.0f} s | state {s["opt_state_bytes"]:,} B | '
          f'outputs in {run_dir}')


def _progress(config: Config, start: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.train.steps, initial=start, disable=not enabled,
              unit='step', dynamic_ncols=True)
