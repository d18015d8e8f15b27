"""The training loop: set up, resume or initialize, step, evaluate, save.

``train(config)`` is the whole program behind ``python -m train``; it returns
the run's summary (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import signal
import sys
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import yaml

from train import data as data_lib
from train import hf_llama
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, set_aside
from train.config import Config, to_dict
from train.diagnostics import make_gradient_variance
from train.metrics import MetricsWriter, plot_losses
from train.model import attention_implementation, param_count
from train.optim import make_optimizer
from train.state import TrainSetup, make_setup, memory_report
from train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many consecutive non-finite steps)."""


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
  rows = setup.config.data.batch_size  # Global; each process holds its part.
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (rows,) + v.shape[1:]) for k, v in local.items()}


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

  def agreed(self) -> bool:
    """Whether any process was signalled; all processes get the same answer.

    With several processes the flags are all-gathered every step (a few bytes)
    so every process saves the same step and exits together; otherwise a
    process stopping alone would leave the others waiting in a collective.
    """
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self.reason is not None))
      if self.reason is None and np.asarray(flags).any():
        self.reason = 'stop requested on another process'
    return self.reason is not None


def train(config: Config, resume: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the training run described by ``config``."""
  t_start = time.time()
  mesh_lib.initialize_distributed(config.distributed)
  run_dir = run_directory(config)
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)

  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  attention_implementation(config.model)  # A config error before the data.
  # Process 0 builds the data set and tokenizer first; the others then open it.
  dataset = mesh_lib.main_process_first(
      lambda: data_lib.prepare(config.data, config.model.vocab_size),
      'prepare_data')
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                config.rivals,
                                scan_layers=config.model.scan_layers)
  setup = make_setup(config, mesh, tx, schedule)
  memory = memory_report(setup)
  say(f'model: {param_count(config.model):,} params',
      f'| param bytes {memory["param_bytes"]:,} | {config.optimizer.name} '
      f'state bytes {memory["opt_state_bytes"]:,} '
      f'({memory["opt_state_bytes"] / memory["param_bytes"]:.3f} x params) '
      f'| mesh {dict(mesh.shape)} on {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)')

  # Each process reads batch_size / process_count rows of each global batch.
  pindex, pcount = jax.process_index(), jax.process_count()
  train_iter = dataset.train_iter(config.data.batch_size, config.data.seq_len,
                                  seed=config.train.seed,
                                  process_index=pindex, process_count=pcount)
  eval_batches = dataset.eval_batches(config.data.batch_size,
                                      config.data.seq_len,
                                      config.train.eval_batches,
                                      process_index=pindex,
                                      process_count=pcount)

  if not resume:  # Old checkpoints must not mix with this run's.
    moved = mesh_lib.main_process_first(
        lambda: set_aside(run_dir / 'checkpoints', 'replaced') if is_main
        else None, 'set_aside_checkpoints')
    if moved:
      if (run_dir / 'metrics.jsonl').exists():  # Rewritten from step 0 below.
        shutil.copy2(run_dir / 'metrics.jsonl', moved / 'metrics.jsonl')
      say(f'--no-resume: moved the existing checkpoints (and a copy of '
          f'metrics.jsonl) to {moved}')
  checkpointer = Checkpointer(run_dir / 'checkpoints',
                              config.train.keep_checkpoints)
  # Newest restorable checkpoint; corrupt ones are reported and moved aside.
  warn = lambda m: print(f'warning: {m}', file=sys.stderr, flush=True)
  latest = (checkpointer.restore_latest(
      _abstract_train_state(setup), train_iter,
      warn=warn if is_main else log.warning) if resume else None)
  if latest is not None:
    restored = latest[1]
    params, opt_state = restored['params'], restored['opt_state']
    rng = restored['rng']
    start = int(restored['step'])
    say(f'resumed from step {start} ({checkpointer.directory})')
  else:
    if config.train.init_from:  # Checked against the model before reading.
      params = hf_llama.load_params(config.train.init_from, config.model,
                                    setup.abstract_params)
      say(f'initialized from the Hugging Face model {config.train.init_from}')
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
  diagnose = (make_gradient_variance(setup, config.train.diagnostics_microbatches)
              if config.train.diagnostics_every else None)
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
  tell = progress.write if is_main else (lambda *a, **k: None)  # Above the bar.
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, config.train.steps + 1):
        t0 = time.perf_counter()
        batch = _global_batch(setup, next(train_iter))
        if diagnose is not None and step % config.train.diagnostics_every == 0:
          # Before the step (which donates params); reads, never changes them.
          t_diag = time.perf_counter()
          writer.write('diagnostics', step,
                       tokens=(step - 1) * tokens_per_step,
                       **diagnose(params, batch))
          t0 += time.perf_counter() - t_diag  # Not counted as step time.
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
        if skips_in_a_row >= config.train.max_consecutive_skips:
          # Skipped steps left params and optimizer state unchanged: this
          # saves the last good state (a resume goes on after these batches).
          save(step)
          raise TrainingError(
              f'{skips_in_a_row} consecutive steps had a non-finite loss, '
              f'gradient or update (steps {step - skips_in_a_row + 1}-{step}, '
              f'train.max_consecutive_skips={config.train.max_consecutive_skips}'
              f'); stopped with the last good state (from step '
              f'{step - skips_in_a_row}) saved as the checkpoint of step '
              f'{step}. Lower optimizer.learning_rate or check the data.')
        if step % config.train.eval_every == 0 or step == config.train.steps:
          eval_result = evaluate(setup, eval_step, params, eval_batches)
          writer.write('eval', step, tokens=tokens, **eval_result)
          tell(f'step {step}: eval loss {eval_result["loss"]:.4f}, '
               f'perplexity {eval_result["perplexity"]:.2f}')
        stopping = stop.agreed()
        if step % config.train.checkpoint_every == 0 or \
            step == config.train.steps or stopping:
          save(step)
        if stopping:
          tell(f'{stop.reason}: checkpoint saved at step {step}, exiting.')
          break
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)

  final_step = step if config.train.steps > start else start
  if not eval_result and not stop.reason:  # Resumed a finished run: report
    # its final quality. (Not when preempted: exit within the grace period.)
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
