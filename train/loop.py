"""The training loop behind ``python -m train``.

``train(config)`` builds a :class:`Trainer` and runs it; it returns the run's
summary (also written to ``<run_dir>/summary.json``). The trainer restores
the newest checkpoint or initializes, then each step runs the jitted train
step on a batch already on the devices, evaluates and saves on schedule, and
stops at the last step, on a signal, or after too many non-finite steps.

The host never waits for a step it has just queued: the step metrics come
back in batches (:class:`StepMetrics`), the next batch is on its way while a
step runs, and evaluation reads its totals back once.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import shutil
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Optional

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
from .console import Console
from .diagnostics import make_gradient_variance
from .errors import RunError
from .metrics import MetricsWriter, plot_losses
from .model import attention_implementation, param_count
from .optim import make_optimizer
from .prefetch import DevicePrefetch, global_batch
from .state import TrainSetup, make_setup, memory_report
from .step import make_eval_step, make_train_step

StepOutputs = dict[str, jax.Array]


class TrainingError(RunError):
  """The run cannot go on (e.g. too many consecutive non-finite steps)."""


def run_directory(config: Config) -> pathlib.Path:
  """``train.run_dir`` with ``{optimizer}`` replaced by the optimizer's name."""
  return pathlib.Path(config.train.run_dir.format(
      optimizer=config.optimizer.name))


def evaluate(setup: TrainSetup, eval_step: Any, params: Any,
             batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Mean token loss and perplexity over the evaluation batches.

  The token-weighted loss sums and token counts add up on the devices; the
  host reads the totals once.
  """
  total = None
  for batch in batches:
    out = eval_step(params, global_batch(setup, batch))
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  loss_sum, tokens = map(float, jax.device_get((total['loss_sum'],
                                                total['tokens'])))
  loss = loss_sum / tokens
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'eval_tokens': int(tokens)}


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


class StopSignal:
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

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    """Catches SIGTERM and SIGINT inside; the previous handlers after."""
    previous = {s: signal.signal(s, self)
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)

  def agreed(self, step: int) -> bool:
    """Whether to stop after ``step``; every process gets the same answer."""
    if jax.process_count() == 1:
      self.reason = self.signal
    elif step % self.every == 0:
      flags = multihost_utils.process_allgather(
          np.int32(self.signal is not None))
      if np.asarray(flags).any():
        self.reason = self.signal or 'stop requested on another process'
    return self.reason is not None


class StepMetrics:
  """The train step's metrics on their way to the host, read in batches.

  Reading a step's metrics waits for that step, so the host reads seldom and
  queues the steps in between. A read fetches each step's ``skipped`` flag
  and hands ``report`` the steps read, in order, with their flags (their
  other metrics are ready on the devices by then);
  :attr:`skips_in_a_row` counts the skipped steps at the end of what has
  been read. Reads happen:

  - for the first step at once (it compiles; the run's clock starts at its
    end);
  - at most every ``log_every`` steps, for all steps but the newest, which
    keeps the devices busy while the host reads;
  - for every step at once while a run of skipped steps could reach
    ``max_skips`` among the unread steps: only the newest step can then
    complete such a run, so a run stopped by it has queued nothing after it
    and its state is still the last good one;
  - for every step at once with ``read_each_step``;
  - for everything on :meth:`read_all`.

  Args:
    first_step: the first step the loop runs.
    log_every: ``train.log_every``.
    max_skips: ``train.max_consecutive_skips``.
    read_each_step: read each step as soon as it is queued.
    report: gets ``[(step, metrics, skipped), ...]`` after each read.
  """

  def __init__(self, first_step: int, log_every: int, max_skips: int,
               read_each_step: bool,
               report: Callable[[list[tuple[int, StepOutputs, int]]], None]):
    self.first_step = first_step
    self.log_every = log_every
    self.max_skips = max_skips
    self.read_each_step = read_each_step
    self.report = report
    self.pending: list[tuple[int, StepOutputs]] = []
    self.skips_in_a_row = 0

  def add(self, step: int, metrics: StepOutputs) -> None:
    """Step ``step`` has been queued; ``metrics`` are its device outputs."""
    self.pending.append((step, metrics))
    if (self.read_each_step or step == self.first_step
        or not self._may_stay_unread(len(self.pending))):
      self.read_all()
    elif (len(self.pending) > self.log_every
          or not self._may_stay_unread(len(self.pending) + 1)):
      self._read(len(self.pending) - 1)  # The newest runs meanwhile.
      if not self._may_stay_unread(len(self.pending)):
        self.read_all()

  def _may_stay_unread(self, steps: int) -> bool:
    """Whether ``steps`` unread steps, were they all skipped, would still
    not complete ``max_skips`` skips in a row."""
    return self.skips_in_a_row + steps < self.max_skips

  def read_all(self) -> None:
    """Reads every queued step (waits for the newest)."""
    self._read(len(self.pending))

  def _read(self, count: int) -> None:
    if not count:
      return
    taken, self.pending = self.pending[:count], self.pending[count:]
    flags = [int(f) for f in jax.device_get([m['skipped'] for _, m in taken])]
    for skipped in flags:
      self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
    self.report([(step, m, f) for (step, m), f in zip(taken, flags)])


def _build(config: Config) -> tuple[TrainSetup, Any]:
  """The setup (mesh, model, optimizer, shardings) and the data set."""
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
  return make_setup(config, mesh, tx, schedule), dataset


def _data(config: Config, dataset: Any) -> tuple[Any, list[Any]]:
  """This process's training iterator and evaluation batches."""
  # Each process reads batch_size / process_count rows of each global batch.
  pindex, pcount = jax.process_index(), jax.process_count()
  d = config.data
  train_iter = dataset.train_iter(d.batch_size, d.seq_len,
                                  seed=config.train.seed,
                                  process_index=pindex, process_count=pcount)
  eval_batches = dataset.eval_batches(d.batch_size, d.seq_len,
                                      config.train.eval_tokens,
                                      process_index=pindex,
                                      process_count=pcount)
  return train_iter, eval_batches


def _setup_line(config: Config, setup: TrainSetup,
                memory: dict[str, int]) -> str:
  return (f'model: {param_count(config.model):,} params | param bytes '
          f'{memory["param_bytes"]:,} | {config.optimizer.name} state bytes '
          f'{memory["opt_state_bytes"]:,} '
          f'({memory["opt_state_bytes"] / memory["param_bytes"]:.3f} x '
          f'params) | mesh {dict(setup.mesh.shape)} on {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s), {jax.process_count()} '
          f'process(es)')


def _set_aside_checkpoints(run_dir: pathlib.Path, console: Console) -> None:
  """``--no-resume``: moves old checkpoints aside, so they cannot mix with
  this run's, with a copy of ``metrics.jsonl`` (this run rewrites it)."""
  moved = distributed.main_process_first(
      lambda: set_aside(run_dir / 'checkpoints', 'replaced')
      if jax.process_index() == 0 else None, 'set_aside_checkpoints')
  if moved:
    if (run_dir / 'metrics.jsonl').exists():
      shutil.copy2(run_dir / 'metrics.jsonl', moved / 'metrics.jsonl')
    console.info(f'--no-resume: moved the existing checkpoints (and a copy '
                 f'of metrics.jsonl) to {moved}')


def _throughput(config: Config, clock: Callable[[], float]
                ) -> perf.Throughput:
  return perf.Throughput(
      tokens_per_step=config.data.batch_size * config.data.seq_len,
      devices=jax.device_count(),
      flops_per_token=perf.flops_per_token(config.model, config.data.seq_len),
      peak=perf.peak_flops_per_device(jax.devices()[0],
                                      jnp.dtype(config.model.dtype),
                                      config.train.peak_tflops),
      clock=clock)


class Trainer:
  """One training run, from the newest checkpoint (or from scratch) to
  ``train.steps``: :meth:`run`.

  Args:
    config: the run.
    console: where the run prints.
    resume: continue from the newest checkpoint; False sets old
      checkpoints aside and starts over.
    started: ``time.time()`` when the run began (for its wall time).
    clock: what the run's speed is timed with (seconds, monotonic).
  """

  def __init__(self, config: Config, console: Console, resume: bool = True,
               started: Optional[float] = None,
               clock: Callable[[], float] = time.perf_counter):
    self.config = config
    self.console = console
    self.started = time.time() if started is None else started
    self.is_main = jax.process_index() == 0
    self.run_dir = run_directory(config)
    self.setup, dataset = _build(config)
    self.memory = memory_report(self.setup)
    console.info(_setup_line(config, self.setup, self.memory))
    train_iter, self.eval_batches = _data(config, dataset)

    if not resume:
      _set_aside_checkpoints(self.run_dir, console)
    self.checkpointer = Checkpointer(self.run_dir / 'checkpoints',
                                     config.train.keep_checkpoints)
    self.start = self._restore_or_init(train_iter, resume)
    if self.is_main:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      (self.run_dir / 'config.yaml').write_text(yaml.safe_dump(to_dict(config)))
    self.writer = MetricsWriter(self.run_dir)
    self.writer.truncate_after(self.start)

    self.batches = DevicePrefetch(train_iter,
                                  lambda b: global_batch(self.setup, b))
    self.train_step = make_train_step(self.setup)
    self.eval_step = make_eval_step(self.setup)
    self.diagnose = (make_gradient_variance(
        self.setup, config.train.diagnostics_microbatches)
                     if config.train.diagnostics_every else None)
    # Step s updates with the rate at s - 1 (the first update's rate is the
    # schedule's start); computed once so logging runs nothing on a device.
    self.learning_rates = np.asarray(jax.jit(jax.vmap(self.setup.schedule))(
        jnp.arange(config.train.steps)))
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.clock = _throughput(config, clock)
    self.stop = StopSignal(config.train.log_every)
    self.metrics = StepMetrics(
        self.start + 1, config.train.log_every,
        config.train.max_consecutive_skips,
        # XLA:CPU's collectives can deadlock on few cores with several
        # sharded programs in flight side by side.
        read_each_step=(jax.default_backend() == 'cpu'
                        and jax.device_count() > 1),
        report=self._log_steps)
    self.eval_result: dict[str, float] = {}
    self.duration_announced = False

  # ------------------------------------------------------------ set up ----

  def _restore_or_init(self, train_iter: Any, resume: bool) -> int:
    """Sets params, optimizer state and rng from the newest restorable
    checkpoint (corrupt ones are reported and moved aside), or fresh from
    ``train.init_from`` or the seed; returns their step."""
    latest = (self.checkpointer.restore_latest(
        self._abstract_state(), train_iter, warn=self.console.warn)
              if resume else None)
    if latest is not None:
      restored = latest[1]
      self.params, self.opt_state = restored['params'], restored['opt_state']
      self.rng = restored['rng']
      step = int(restored['step'])
      self.console.info(f'resumed from step {step} '
                        f'({self.checkpointer.directory})')
      return step
    t = self.config.train
    if t.init_from:  # Checked against the model before reading.
      self.params = hf_llama.load_params(t.init_from, self.config.model,
                                         self.setup.abstract_params)
      self.console.info(f'initialized from the Hugging Face model '
                        f'{t.init_from}')
    else:
      self.params = self.setup.init_params(t.seed)
    self.opt_state = self.setup.init_opt_state(self.params)
    self.rng = jax.device_put(jax.random.key_data(jax.random.key(t.seed)),
                              self.setup.replicated)
    return 0

  def _abstract_state(self) -> dict[str, Any]:
    replicated = self.setup.replicated
    return {'params': self.setup.abstract_params,
            'opt_state': self.setup.abstract_opt_state,
            'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            'rng': jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}

  # -------------------------------------------------------------- run ----

  def run(self) -> dict[str, Any]:
    """Trains to ``train.steps`` (or a stop); returns the summary."""
    with jax.set_mesh(self.setup.mesh):
      with self._outputs_open():
        final_step = self._fit()
      if not self.eval_result and not self.stop.reason:
        # Resumed a finished run: report its final quality. (Not when
        # preempted: exit within the grace period.)
        self.eval_result = evaluate(self.setup, self.eval_step, self.params,
                                    self.eval_batches)
    summary = self._summary(final_step)
    if self.is_main:
      self._write_summary(summary)
    return summary

  @contextlib.contextmanager
  def _outputs_open(self) -> Iterator[None]:
    """Signals caught and the progress bar shown while inside; the
    checkpoints and metrics closed after, still catching signals (a save
    may be finishing)."""
    with self.stop.installed():
      self.console.start_progress(self.config.train.steps, self.start,
                                  self.config.train.progress)
      try:
        yield
      finally:
        self.console.close_progress()
        self.checkpointer.close()
        self.writer.close()

  def _fit(self) -> int:
    """Steps ``start + 1`` on; returns the last step taken."""
    t = self.config.train
    step = self.start
    for step in range(self.start + 1, t.steps + 1):
      batch = next(self.batches)
      if self.diagnose is not None and step % t.diagnostics_every == 0:
        self._diagnose(step, batch)
      self.params, self.opt_state, metrics = self.train_step(
          self.params, self.opt_state, batch)
      if step < t.steps:
        self.batches.prefetch()  # Batch step + 1 travels while step runs.
      self.metrics.add(step, metrics)
      if self.metrics.skips_in_a_row >= t.max_consecutive_skips:
        self._stop_after_skips(step)
      evaluating = step % t.eval_every == 0 or step == t.steps
      stopping = self.stop.agreed(step)
      saving = step % t.checkpoint_every == 0 or step == t.steps or stopping
      if evaluating or saving:
        self.metrics.read_all()  # So the clock pauses with no step running.
      if evaluating:
        self._evaluate(step)
      if saving:
        self._save(step)
      if stopping:
        self.console.info(f'{self.stop.reason}: checkpoint saved at step '
                          f'{step}, exiting.')
        break
    return step

  def _diagnose(self, step: int, batch: dict[str, jax.Array]) -> None:
    """The gradient-variance record, on the params before the step (which
    donates them); it reads them, never changes them."""
    self.metrics.read_all()
    with self.clock.paused():
      self.writer.write('diagnostics', step,
                        tokens=(step - 1) * self.tokens_per_step,
                        **self.diagnose(self.params, batch))

  def _evaluate(self, step: int) -> None:
    with self.clock.paused():
      self.eval_result = evaluate(self.setup, self.eval_step, self.params,
                                  self.eval_batches)
    self.writer.write('eval', step, tokens=step * self.tokens_per_step,
                      **self.eval_result)
    self.console.info(f'step {step}: eval loss {self.eval_result["loss"]:.4f}, '
                      f'perplexity {self.eval_result["perplexity"]:.2f}')

  def _save(self, step: int) -> None:
    with self.clock.paused():
      self.checkpointer.save(step, {'params': self.params,
                                    'opt_state': self.opt_state,
                                    'step': jnp.asarray(step, jnp.int32),
                                    'rng': self.rng}, self.batches)

  def _stop_after_skips(self, step: int) -> None:
    """Saves and raises: ``step`` ended a run of too many skipped steps.

    Skipped steps left params and optimizer state unchanged, and nothing is
    queued after ``step``: this saves the last good state (a resume goes on
    after these batches).
    """
    self._save(step)
    n = self.metrics.skips_in_a_row
    limit = self.config.train.max_consecutive_skips
    raise TrainingError(
        f'{n} consecutive steps had a non-finite loss, gradient or update '
        f'(steps {step - n + 1}-{step}, train.max_consecutive_skips='
        f'{limit}); stopped with the last good state (from step {step - n}) '
        f'saved as the checkpoint of step {step}. Lower '
        f'optimizer.learning_rate or check the data.')

  def _log_steps(self, read: list[tuple[int, StepOutputs, int]]) -> None:
    """Records, progress and the expected duration for the steps read."""
    t = self.config.train
    last_step, last_metrics, _ = read[-1]
    self.clock.step_done(last_step)
    rates = self.clock.rates()
    logged = [(step, metrics, skipped) for step, metrics, skipped in read
              if step % t.log_every == 0 or skipped]
    values = jax.device_get([{k: m[k] for k in ('loss', 'grad_norm')}
                             for _, m, _ in logged] + [last_metrics['loss']])
    for (step, _, skipped), v in zip(logged, values):
      self.writer.write('train', step, tokens=step * self.tokens_per_step,
                        loss=float(v['loss']), grad_norm=float(v['grad_norm']),
                        learning_rate=float(self.learning_rates[step - 1]),
                        skipped=skipped, **rates)
    self.console.advance(len(read), loss=f'{float(values[-1]):.3f}',
                         tok_s=f'{rates["tokens_per_s"] or 0:,.0f}')
    if not self.duration_announced and self.clock.timed_steps >= 5:
      self.duration_announced = True
      self.console.info(expected_duration(
          self.config, last_step, self.clock.step_s,
          time.time() - self.started, len(self.eval_batches)))

  # ---------------------------------------------------------- summary ----

  def _summary(self, final_step: int) -> dict[str, Any]:
    return {
        'optimizer': self.config.optimizer.name,
        'steps': final_step,
        'tokens': final_step * self.tokens_per_step,
        'eval_loss': self.eval_result.get('loss'),
        'eval_perplexity': self.eval_result.get('perplexity'),
        **self.clock.rates(),
        'devices': jax.device_count(),
        'wall_s': time.time() - self.started,
        'stopped_by': self.stop.reason,
        **self.memory,
    }

  def _write_summary(self, summary: dict[str, Any]) -> None:
    """``summary.json``, the loss plot and the summary line."""
    (self.run_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
    if self.writer.path.exists():
      m = self.config.model
      plot_losses(self.writer.path, self.run_dir / 'loss.png',
                  f'{self.config.optimizer.name}: LLaMA d{m.d_model} '
                  f'L{m.n_layers}')
    self.console.info(_summary_line(summary, self.run_dir))


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


def train(config: Config, resume: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the training run described by ``config``."""
  started = time.time()
  distributed.initialize_distributed(config.distributed)
  console = Console(main=jax.process_index() == 0)
  return Trainer(config, console, resume=resume, started=started).run()
