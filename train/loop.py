"""The training loop: set up, resume or initialize, step, evaluate, save.

``train(config)`` is the whole program behind ``python -m train``; it returns
the run's summary (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import yaml

from . import data as data_lib
from . import distributed
from . import hf_llama
from . import mesh as mesh_lib
from . import perf
from .checkpoint import Checkpointer, set_aside
from .config import Config, to_dict
from .diagnostics import make_gradient_variance
from .errors import RunError
from .metrics import MetricsWriter, plot_losses
from .model import attention_implementation, param_count
from .optim import make_optimizer
from .prefetch import DevicePrefetch
from .state import TrainSetup, make_setup, memory_report
from .step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingError(RunError):
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
  """Set by SIGTERM (preemption) or Ctrl-C; the loop saves and exits.

  One process acts on its signal at the next step. Several processes agree
  every ``every`` steps (an all-gather of a few bytes, the loop's only
  collective besides the steps): all then save the same step and exit
  together, where a process stopping alone would leave the others waiting in
  a collective.
  """

  def __init__(self, every: int):
    self.every = every
    self.signal: Optional[str] = None  # This process's own signal.
    self.reason: Optional[str] = None  # Set once every process agrees.

  def __call__(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def install(self) -> dict[int, Any]:
    return {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

  def agreed(self, step: int) -> bool:
    """Whether to stop after ``step``; every process gets the same answer."""
    if jax.process_count() == 1:
      self.reason = self.signal
    elif step % self.every == 0:
      flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
      if np.asarray(flags).any():
        self.reason = self.signal or 'stop requested on another process'
    return self.reason is not None


class _Throughput:
  """Training speed, not counting the first step (it compiles), evaluation,
  checkpoints and diagnostics (inside :meth:`paused`).

  The clock starts when the first step's metrics are read and advances each
  time a later step's are; tokens/s per device and MFU follow from it.
  """

  def __init__(self, config: Config, start: int, tokens_per_step: int):
    self.first = start + 1
    self.tokens_per_step = tokens_per_step
    self.devices = jax.device_count()
    self.flops_per_token = perf.flops_per_token(config.model,
                                                config.data.seq_len)
    self.peak = perf.peak_flops_per_device(
        jax.devices()[0], jnp.dtype(config.model.dtype),
        config.train.peak_tflops)
    self.t0: Optional[float] = None
    self.paused_s = 0.0
    self.timed_steps, self.elapsed_s = 0, 0.0

  def step_done(self, step: int) -> None:
    now = time.perf_counter()
    if self.t0 is None:
      self.t0, self.paused_s = now, 0.0
      return
    self.timed_steps = step - self.first
    self.elapsed_s = now - self.t0 - self.paused_s

  @contextlib.contextmanager
  def paused(self):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.paused_s += time.perf_counter() - t

  @property
  def step_s(self) -> Optional[float]:
    return self.elapsed_s / self.timed_steps if self.timed_steps else None

  def rates(self) -> dict[str, Optional[float]]:
    """``tokens_per_s`` (all devices), ``tokens_per_s_per_device`` and
    ``mfu`` (None where unknown)."""
    if not self.step_s:
      return {'tokens_per_s': None, 'tokens_per_s_per_device': None,
              'mfu': None}
    tok_s = self.tokens_per_step / self.step_s
    per_device = tok_s / self.devices
    return {'tokens_per_s': tok_s, 'tokens_per_s_per_device': per_device,
            'mfu': perf.mfu(per_device, self.flops_per_token, self.peak)}


def expected_duration(config: Config, step: int, step_s: float,
                      elapsed_s: float, eval_batches: int) -> str:
  """The line announcing the run's expected wall time after ``step``.

  The remaining evaluations are estimated at a third of a train step per
  eval batch (a forward pass of the same batch).
  """
  t = config.train
  remaining = t.steps - step
  evals = len([s for s in range(step + 1, t.steps + 1)
               if s % t.eval_every == 0 or s == t.steps])
  left = remaining * step_s + evals * eval_batches * step_s / 3
  minutes = lambda s: f'{s / 60:.1f} min'
  return (f'expected duration: about {minutes(elapsed_s + left)} in all, '
          f'{minutes(left)} from now ({step_s * 1e3:.0f} ms per step '
          f'measured, {remaining} steps and {evals} evaluations to go)')


class _StepMonitor:
  """Reads each step's metrics one step late, logs them, counts skips.

  Reading step ``N - 1``'s metrics after dispatching step ``N`` keeps the
  devices busy (step ``N`` is queued while the host waits) and bounds the
  steps in flight to two. On several CPU devices each step is read at once:
  XLA:CPU's collectives can deadlock on 2 cores with sharded programs in
  flight side by side (DESIGN.md section 4). When one more skipped step
  would reach ``train.max_consecutive_skips``, each step is read at once, so the
  run stops with nothing dispatched after the last skipped step: its state is
  still the last good one.
  """

  def __init__(self, config: Config, schedule: Any, writer: MetricsWriter,
               progress: Any, clock: _Throughput,
               save: Callable[[int], None], tell: Callable[[str], None],
               t_start: float, eval_batches: int):
    self.config, self.schedule, self.writer = config, schedule, writer
    self.progress, self.clock, self.save, self.tell = (progress, clock, save,
                                                       tell)
    self.t_start = t_start
    self.eval_batches = eval_batches
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.pending: Optional[tuple[int, dict[str, jax.Array]]] = None
    self.skips_in_a_row = 0
    self.announced = False
    self.one_in_flight = (jax.default_backend() == 'cpu'
                          and jax.device_count() > 1)

  def dispatched(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.flush()
    self.pending = (step, metrics)
    if (self.one_in_flight or self.skips_in_a_row + 1
        >= self.config.train.max_consecutive_skips):
      self.flush()

  def flush(self) -> None:
    """Reads the pending step's metrics (waits for that step)."""
    if self.pending is not None:
      step, metrics = self.pending
      self.pending = None
      self._read(step, jax.device_get(metrics))

  def _read(self, step: int, metrics: dict[str, Any]) -> None:
    t = self.config.train
    self.clock.step_done(step)
    skipped = int(metrics['skipped'])
    self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
    rates = self.clock.rates()
    if step % t.log_every == 0 or skipped:
      self.writer.write('train', step, tokens=step * self.tokens_per_step,
                        loss=float(metrics['loss']),
                        grad_norm=float(metrics['grad_norm']),
                        learning_rate=float(self.schedule(step - 1)),
                        skipped=skipped, **rates)
    self.progress.update(1)
    self.progress.set_postfix(loss=f'{float(metrics["loss"]):.3f}',
                              tok_s=f'{rates["tokens_per_s"] or 0:,.0f}',
                              refresh=False)
    if not self.announced and self.clock.timed_steps >= 5:
      self.announced = True
      self.tell(expected_duration(self.config, step, self.clock.step_s,
                                  time.time() - self.t_start,
                                  self.eval_batches))
    if self.skips_in_a_row >= t.max_consecutive_skips:
      # Skipped steps left params and optimizer state unchanged: this
      # saves the last good state (a resume goes on after these batches).
      self.save(step)
      n = self.skips_in_a_row
      raise TrainingError(
          f'{n} consecutive steps had a non-finite loss, gradient or update '
          f'(steps {step - n + 1}-{step}, train.max_consecutive_skips='
          f'{t.max_consecutive_skips}); stopped with the last good state '
          f'(from step {step - n}) saved as the checkpoint of step {step}. '
          f'Lower optimizer.learning_rate or check the data.')


def train(config: Config, resume: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the training run described by ``config``."""
  t_start = time.time()
  distributed.initialize_distributed(config.distributed)
  run_dir = run_directory(config)
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)

  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  attention_implementation(config.model)  # A config error before the data.
  # Process 0 builds the data set and tokenizer first; the others then open it.
  dataset = distributed.main_process_first(
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
                                      config.train.eval_tokens,
                                      process_index=pindex,
                                      process_count=pcount)

  if not resume:  # Old checkpoints must not mix with this run's.
    moved = distributed.main_process_first(
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
  batches = DevicePrefetch(train_iter, lambda b: _global_batch(setup, b))

  def save(step: int) -> None:
    with clock.paused():
      checkpointer.save(step, {'params': params, 'opt_state': opt_state,
                               'step': jnp.asarray(step, jnp.int32),
                               'rng': rng}, batches)

  stop = _StopFlag(config.train.log_every)
  previous_handlers = stop.install()
  eval_result: dict[str, float] = {}
  clock = _Throughput(config, start, tokens_per_step)
  progress = _progress(config, start, enabled=is_main and config.train.progress)
  tell = progress.write if is_main else (lambda *a, **k: None)  # Above the bar.
  monitor = _StepMonitor(config, schedule, writer, progress, clock, save, tell,
                         t_start, len(eval_batches))
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, config.train.steps + 1):
        batch = next(batches)
        if diagnose is not None and step % config.train.diagnostics_every == 0:
          # Before the step (which donates params); reads, never changes them.
          with clock.paused():
            writer.write('diagnostics', step,
                         tokens=(step - 1) * tokens_per_step,
                         **diagnose(params, batch))
        params, opt_state, metrics = train_step(params, opt_state, batch)
        if step < config.train.steps:
          batches.prefetch()  # Batch step + 1 travels while step runs.
        monitor.dispatched(step, metrics)
        evaluating = (step % config.train.eval_every == 0
                      or step == config.train.steps)
        stopping = stop.agreed(step)
        saving = (step % config.train.checkpoint_every == 0
                  or step == config.train.steps or stopping)
        if evaluating or saving:
          monitor.flush()
        if evaluating:
          with clock.paused():
            eval_result = evaluate(setup, eval_step, params, eval_batches)
          writer.write('eval', step, tokens=step * tokens_per_step,
                       **eval_result)
          tell(f'step {step}: eval loss {eval_result["loss"]:.4f}, '
               f'perplexity {eval_result["perplexity"]:.2f}')
        if saving:
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
      **clock.rates(),
      'devices': jax.device_count(),
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
  per_device = (f' ({s["tokens_per_s_per_device"]:,.0f} per device)'
                if s['tokens_per_s'] and s['devices'] > 1 else '')
  mfu = f' | MFU {s["mfu"]:.1%}' if s['mfu'] is not None else ''
  return (f'summary: {s["optimizer"]} | step {s["steps"]} | '
          f'{s["tokens"]:,} tokens | eval perplexity {ppl} | {tps} tokens/s'
          f'{per_device}{mfu} | '
          f'{s["wall_s"]:.0f} s | state {s["opt_state_bytes"]:,} B | '
          f'outputs in {run_dir}')


def _progress(config: Config, start: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.train.steps, initial=start, disable=not enabled,
              unit='step', dynamic_ncols=True)
