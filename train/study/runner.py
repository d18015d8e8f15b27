"""Run state on disk and running."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import threading
import time
import traceback
from concurrent import futures
from typing import Any, Callable, Optional

import yaml

from ..config import Config, build_config, to_dict
from . import ledger
from .config import RunSpec, Study


FINISHED = ('done', 'diverged')


def run_state(spec: RunSpec) -> str:
  """``'done'``, ``'diverged'``, ``'partial'`` (resume) or ``'new'``: the
  state of the run's folder, or of its copy in the ledger when only that one
  has finished (:mod:`train.study.ledger`; a fresh clone). A finished copy
  wins over a folder part way: the run is not trained again.

  ``'new'`` also covers a folder left by a run with a different config (it
  starts again from scratch: :func:`_clear_stale` empties it first).
  """
  return locate(spec)[0]


def finished_dir(spec: RunSpec) -> Optional[pathlib.Path]:
  """The folder holding the finished run's files: its own, else its copy in
  the ledger; None before it has finished."""
  return locate(spec)[1]


def locate(spec: RunSpec) -> tuple[str, Optional[pathlib.Path]]:
  """:func:`run_state` and :func:`finished_dir` together, reading each
  folder's files once."""
  state = folder_state(spec.run_dir, spec.config)
  if state in FINISHED:
    return state, spec.run_dir
  kept = folder_state(spec.kept_dir, spec.config)
  if kept in FINISHED:
    return kept, spec.kept_dir
  return state, None


def folder_state(d: pathlib.Path, config: Config) -> str:
  """The state of the run of ``config`` from the files in ``d`` (a run
  folder or its copy in the ledger)."""
  try:
    saved = yaml.safe_load((d / 'config.yaml').read_text())
  except (OSError, yaml.YAMLError):
    return 'new'
  if not config_matches(saved, config):
    return 'new'
  summary = read_json(d / 'summary.json')
  if (summary and summary.get('steps') == config.train.steps
      and not summary.get('stopped_by')
      and summary.get('eval_loss') is not None):
    return 'done'
  if read_json(d / 'failed.json'):
    return 'diverged'
  return 'partial'


def keep_finished(spec: RunSpec) -> None:
  """Copies a run that finished in its folder into the ledger, unless the
  ledger has it already."""
  if (folder_state(spec.run_dir, spec.config) in FINISHED
      and folder_state(spec.kept_dir, spec.config) not in FINISHED):
    ledger.keep(spec.run_dir, spec.kept_dir)


# Where a run's files and its data lie on a machine, not what it trains: a
# clone with another `output_dir` or data cache still has the ledger's runs.
LOCATIONS = (('train', 'run_dir'), ('data', 'data_dir'))


def config_matches(saved: Any, config: Config) -> bool:
  """Whether a run's saved ``config.yaml`` describes ``config``.

  Keys or sections the saved config lacks (added to the trainer after the
  run) match when ``config`` has their default; keys it has that the trainer
  no longer knows are ignored, and so are the :data:`LOCATIONS`. Every other
  value must be equal.
  """
  if not isinstance(saved, dict):
    return False
  current, default = to_dict(config), to_dict(Config())
  for section, values in current.items():
    old = saved.get(section, {})
    if not isinstance(old, dict):
      return False
    for key, value in values.items():
      if (section, key) in LOCATIONS:
        continue
      if (old[key] if key in old else default[section][key]) != value:
        return False
  return True


def read_json(path: pathlib.Path) -> Optional[dict[str, Any]]:
  """The JSON object in ``path``; None when missing, unreadable or not an
  object."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _clear_stale(d: pathlib.Path) -> None:
  """Removes a previous run's outputs (a different config) from ``d``."""
  for name in ('summary.json', 'failed.json', 'metrics.jsonl', 'loss.png',
               'config.yaml', 'train.log'):
    (d / name).unlink(missing_ok=True)
  for name in ('checkpoints', 'tensorboard'):
    shutil.rmtree(d / name, ignore_errors=True)


_STOP_REQUESTED: list[str] = []


def _worker_init(stop_event: Any) -> None:
  """In a pool worker: SIGTERM / SIGINT between runs only set a flag
  (during a run the trainer's own handler saves a checkpoint and returns).

  ``stop_event`` set by the parent sends this process SIGTERM (a thread
  waits on it; Python runs the handler in the main thread), so the parent
  stops its workers without knowing their process ids; then again every
  second, because a run still being set up has not installed the trainer's
  handler yet: a single signal would be caught here and the run would train
  to its end.
  """
  def request_stop(signum, frame):
    del frame
    _STOP_REQUESTED.append(signal.Signals(signum).name)
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, request_stop)

  def relay():
    stop_event.wait()
    while True:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1.0)
  threading.Thread(target=relay, daemon=True).start()


def execute_run(run_dir_str: str, config_values: dict[str, Any], state: str,
                prune: bool) -> dict[str, Any]:
  """Trains one run (in this process or a worker); output goes to train.log.

  Returns ``{'status': 'done'|'diverged'|'stopped'|'error', ...}``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ..loop import TrainingError, train  # pylint: disable=g-import-not-at-top
  if _STOP_REQUESTED:  # Stopped before this run began: leave it as it is.
    return {'status': 'stopped', 'error': _STOP_REQUESTED[0], 'wall_s': 0.0}
  config = build_config(config_values)
  d = pathlib.Path(run_dir_str)
  if state == 'new':
    _clear_stale(d)
  (d / 'summary.json').unlink(missing_ok=True)
  (d / 'failed.json').unlink(missing_ok=True)
  d.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  result: dict[str, Any]
  with open(d / 'train.log', 'a') as log, contextlib.redirect_stdout(log), \
      contextlib.redirect_stderr(log):
    print(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} study run '
          f'({"resume" if state == "partial" else "fresh"})', flush=True)
    try:
      summary = train(config, resume=state == 'partial')
      status = 'stopped' if summary.get('stopped_by') else 'done'
      result = {'status': status, 'summary': summary}
    except TrainingError as e:
      failure = {'status': 'diverged', 'error': str(e)}
      (d / 'failed.json').write_text(json.dumps(failure, indent=2))
      result = failure
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      result = {'status': 'error', 'error': f'{type(e).__name__}: {e}'}
  jax.clear_caches()  # Each run compiles its own steps; free the old ones.
  if prune and result['status'] in ('done', 'diverged'):
    shutil.rmtree(d / 'checkpoints', ignore_errors=True)
  result['wall_s'] = time.time() - t0
  return result


class Runner:
  """Trains a study's runs in this process (jobs=1) or in a pool of spawned
  workers, as the study decides on them.

  ``results`` maps each run folder to its outcome; ``stopped`` turns true on
  SIGTERM / Ctrl-C (running trainers save a checkpoint, nothing new starts).
  With a ``deadline`` (``time.time()`` seconds), a run whose ``run_time``
  (seconds; None: unknown) would end after it is not started (``'deferred'``);
  later runs of the plan that fit still are. A run cut short is lost when
  the next call is on another machine (:mod:`train.study.ledger`), so this
  spends a limited time on runs that end.
  """

  def __init__(self, study: Study, jobs: int, say: Callable[..., None],
               deadline: Optional[float] = None,
               run_time: Callable[[RunSpec], Optional[float]] = (
                   lambda spec: None)):
    self.study, self.jobs, self.say = study, jobs, say
    self.deadline, self.run_time = deadline, run_time
    self.results: dict[pathlib.Path, dict[str, Any]] = {}
    self.stopped = False
    self._trained = 0

  def run(self, plan: Callable[[], list[RunSpec]]) -> None:
    """Trains every run ``plan()`` lists, in its order, calling it again
    whenever a run ends (a finished run can decide new ones).

    Runs already finished (in their folder or the ledger) are skipped;
    each run is tried at most once per call (a run that fails with an error
    is not retried, a deferred one waits for the next call).
    """
    if self.jobs == 1:
      while not self.stopped and (item := self._next(plan, set())):
        self._record(*item, execute_run(*self._args(*item)))
      return
    # At most `jobs` runs are submitted at a time, so a stop leaves nothing
    # queued in the pool.
    ctx = multiprocessing.get_context('spawn')
    stop_event = ctx.Event()
    running: dict[futures.Future, tuple[RunSpec, str]] = {}
    with futures.ProcessPoolExecutor(self.jobs, mp_context=ctx,
                                     initializer=_worker_init,
                                     initargs=(stop_event,)) as pool:

      def stop(signum, frame):
        # SIGTERM / Ctrl-C: no new runs; each running trainer gets SIGTERM,
        # saves a checkpoint and returns (the run resumes next time).
        del frame
        if not self.stopped:
          self.say(f'{signal.Signals(signum).name}: stopping the running '
                   f'runs (checkpoints are saved)')
        self.stopped = True
        stop_event.set()

      handlers = {s: signal.signal(s, stop)
                  for s in (signal.SIGTERM, signal.SIGINT)}
      try:
        while True:
          busy = {spec.run_dir for spec, _ in running.values()}
          while len(running) < self.jobs and not self.stopped and (
              item := self._next(plan, busy)):
            try:
              running[pool.submit(execute_run, *self._args(*item))] = item
            except futures.BrokenExecutor as e:  # A worker died (OOM, kill).
              self.say(f'the worker pool broke ({e}): stopping; the next '
                       f'`python -m train.study` resumes')
              self.stopped = True
              break
            busy.add(item[0].run_dir)
          if not running:
            break
          done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
          for future in done:
            spec, state = running.pop(future)
            try:
              result = future.result()
            except Exception as e:  # pylint: disable=broad-except
              result = {'status': 'stopped' if self.stopped else 'error',
                        'error': f'{type(e).__name__}: {e}', 'wall_s': 0.0}
            self._record(spec, state, result)
      finally:
        for s, handler in handlers.items():
          signal.signal(s, handler)

  def _next(self, plan: Callable[[], list[RunSpec]], busy: set[pathlib.Path]
            ) -> Optional[tuple[RunSpec, str]]:
    """The first run of ``plan()`` to train and its state, skipping (and
    recording) the finished ones; None when there is none."""
    for spec in plan():
      if spec.run_dir in self.results or spec.run_dir in busy:
        continue
      state = run_state(spec)
      if state in FINISHED:
        keep_finished(spec)  # Finished before the ledger knew of it.
        self.results[spec.run_dir] = {'status': 'skipped', 'state': state}
        self.say(f'[{self._phase(spec)}] {spec.label}: {state}, skipped')
        continue
      seconds = self.run_time(spec)
      if (self.deadline is not None and seconds is not None
          and time.time() + seconds > self.deadline):
        self.results[spec.run_dir] = {'status': 'deferred', 'state': state}
        self.say(f'[{self._phase(spec)}] {spec.label}: deferred (about '
                 f'{seconds / 60:.0f} min would end past the deadline)')
        continue
      self.say(f'[{self._phase(spec)}] {spec.label}: '
               f'{"resuming" if state == "partial" else "starting"}')
      return spec, state
    return None

  def _args(self, spec: RunSpec, state: str) -> tuple[Any, ...]:
    return (str(spec.run_dir), to_dict(spec.config), state,
            self.study.prune_checkpoints)

  def _phase(self, spec: RunSpec) -> str:
    return ('finalists' if spec.phase == self.study.final_phase
            and spec.seed not in self.study.seeds else spec.phase)

  def _record(self, spec: RunSpec, state: str, result: dict[str, Any]
              ) -> None:
    self.results[spec.run_dir] = {**result, 'state': state}
    self._trained += 1
    keep_finished(spec)
    status = result['status']
    detail = ''
    if status in ('done', 'stopped') and (result.get('summary') or {}).get(
        'eval_loss') is not None:
      s = result['summary']
      detail = (f', eval loss {s["eval_loss"]:.4f}, perplexity '
                f'{s["eval_perplexity"]:.2f}')
    elif status in ('diverged', 'error'):
      detail = f': {result["error"].splitlines()[0]}'
    verb = 'resumed, ' if state == 'partial' else ''
    self.say(f'[{self._phase(spec)} #{self._trained}] {spec.label}: {verb}'
             f'{status}{detail} ({result["wall_s"]:.0f} s; log '
             f'{spec.run_dir / "train.log"})')
    if status == 'stopped':
      self.stopped = True
