"""Fault injection for the trainer: run ``python -m train`` as a subprocess,
wait for it to reach a step or a checkpoint, kill it or signal it, damage
files, and read back what it left (metrics, checkpoints).

Usage in a test::

  cfg = TinyRun(run_dir, data_dir)
  with TrainProcess(cfg.args(steps=40)) as proc:
    proc.wait_for_step(12)
    proc.kill()                          # SIGKILL
  done = harness.run_train(cfg.args(steps=40))   # resumes, to the end
  assert done.rc == 0, done.stderr

Every subprocess (started by ``harness``) gets a deadline and is killed when
its ``with`` block ends, whatever happens. The subprocesses share a JAX
persistent compilation cache (``jax_cache``), so only the first run of a test
session compiles.

Run as a script, this file is the child process with faults the trainer has
no hook for (the production code has none)::

  python faults_util.py --slow-save 3 -- [python -m train arguments]

``--slow-save S`` delays the background write of every checkpoint's arrays
by S seconds, after ``save`` has returned: the training loop goes on (and
donates the parameter buffers) while the save is in flight, and a
``<step>.orbax-checkpoint-tmp`` folder stays on disk for S seconds, which is
when a test kills the process to interrupt a save.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

import harness

TMP_SUFFIX = '.orbax-checkpoint-tmp'


# ---------------------------------------------------------------- the runs --

# The fault runs' schedule, on top of the harness's small model.
SCHEDULE = {'train.steps': 30, 'train.checkpoint_every': 5,
            'train.keep_checkpoints': 2, 'train.eval_every': 1000}


@dataclasses.dataclass
class TinyRun:
  """The harness's small model on :data:`SCHEDULE`, in ``run_dir``.

  ``args(*flags, **overrides)`` gives the command-line arguments; keyword
  overrides use ``section__key=value`` or a plain ``key`` of the ``train``
  section.
  """
  run_dir: pathlib.Path
  data_dir: pathlib.Path

  def args(self, *flags: str, **kw: Any) -> list[str]:
    values = dict(SCHEDULE)
    for key, value in kw.items():
      values[key.replace('__', '.') if '__' in key else f'train.{key}'] = value
    return list(flags) + harness.small_args(
        self.run_dir, self.data_dir,
        *(harness.override(k, v) for k, v in values.items()))

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.run_dir / 'checkpoints'


class TrainProcess:
  """``python -m train ARGS`` (or the fault-injecting child) in the background.

  Output goes to files (no pipe can fill up). The process is SIGKILLed when
  the ``with`` block ends if it is still running, and every wait has a
  deadline.
  """

  def __init__(self, args: Sequence[str], *, slow_save: float = 0.0,
               jax_cache: Optional[pathlib.Path] = None,
               deadline_s: float = harness.DEFAULT_TIMEOUT):
    if slow_save:
      argv = [pathlib.Path(__file__).resolve(), '--slow-save', slow_save,
              '--', *args]
    else:
      argv = ['-m', 'train', *args]
    self.run_dir = _arg(args, 'train.run_dir')
    self.start_ns = time.time_ns()
    self._stale_metrics_inode = _inode(
        pathlib.Path(self.run_dir) / 'metrics.jsonl')
    self.deadline = time.monotonic() + deadline_s
    stamp = f'{time.time_ns()}'
    self._out_path = pathlib.Path(self.run_dir) / f'.proc-{stamp}.out'
    self._err_path = pathlib.Path(self.run_dir) / f'.proc-{stamp}.err'
    self._out_path.parent.mkdir(parents=True, exist_ok=True)
    self._out = self._out_path.open('w')
    self._err = self._err_path.open('w')
    self.proc = harness.start(argv, jax_cache=jax_cache, stdout=self._out,
                              stderr=self._err)
    self.result: Optional[harness.Result] = None

  def __enter__(self) -> 'TrainProcess':
    return self

  def __exit__(self, *exc) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.wait(timeout=60)

  # ---- waiting
  def _remaining(self) -> float:
    return self.deadline - time.monotonic()

  def _poll_until(self, what: str, check, interval: float = 0.01) -> Any:
    while True:
      value = check()
      if value is not None and value is not False:
        return value
      if self.proc.poll() is not None:
        res = self.wait()
        raise AssertionError(
            f'the run ended (rc {res.rc}) before {what}.\nstdout:\n'
            f'{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}')
      if self._remaining() <= 0:
        self.proc.kill()
        res = self.wait()
        raise AssertionError(f'timed out waiting for {what}.\nstderr:\n'
                             f'{res.stderr[-3000:]}')
      time.sleep(interval)

  def wait_for_step(self, step: int) -> int:
    """Waits until this process has logged a train record of ``step`` or
    later in metrics.jsonl; returns the last step recorded.

    Records left by an earlier run do not count: a resumed run rewrites the
    file (a new inode) before its first step.
    """
    path = pathlib.Path(self.run_dir) / 'metrics.jsonl'

    def check():
      if _inode(path) in (None, self._stale_metrics_inode):
        return None
      steps = [r['step'] for r in harness.records(self.run_dir, 'train')]
      return steps[-1] if steps and steps[-1] >= step else None
    return self._poll_until(f'step {step}', check)

  def wait_for_checkpoint(self, step: Optional[int] = None) -> int:
    """Waits until a committed checkpoint (of ``step``, or any) exists."""
    def check():
      steps = committed_steps(pathlib.Path(self.run_dir) / 'checkpoints')
      if step is None:
        return steps[-1] if steps else None
      return step if step in steps else None
    return self._poll_until(f'checkpoint {step}', check)

  def wait_for_save_in_flight(self) -> int:
    """Waits until this process is writing a checkpoint (a temporary folder
    it created exists: not one left by an earlier, killed run); returns the
    step being saved."""
    ckpt_dir = pathlib.Path(self.run_dir) / 'checkpoints'

    def check():
      for step in in_flight_steps(ckpt_dir):
        created = tmp_created_ns(ckpt_dir / f'{step}{TMP_SUFFIX}')
        if created is not None and created > self.start_ns:
          return step
      return None
    return self._poll_until('a save in flight', check, interval=0.005)

  # ---- faults
  def kill(self, sig: int = signal.SIGKILL) -> None:
    self.proc.send_signal(sig)

  def wait(self, timeout: Optional[float] = None) -> harness.Result:
    if self.result is None:
      timeout = max(1.0, self._remaining()) if timeout is None else timeout
      try:
        rc = self.proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        rc = self.proc.wait(timeout=60)
      self._out.close()
      self._err.close()
      self.result = harness.Result(rc, self._out_path.read_text(),
                                   self._err_path.read_text())
      self._out_path.unlink(missing_ok=True)
      self._err_path.unlink(missing_ok=True)
    return self.result


def _inode(path: pathlib.Path) -> Optional[int]:
  try:
    return path.stat().st_ino
  except FileNotFoundError:
    return None


def _arg(args: Sequence[str], key: str) -> Optional[str]:
  for a in args:
    if a.startswith(key + '='):
      return a.split('=', 1)[1]
  return None


# ---------------------------------------------------------------- reading --

def committed_steps(ckpt_dir: pathlib.Path) -> list[int]:
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def in_flight_steps(ckpt_dir: pathlib.Path) -> list[int]:
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name.split(TMP_SUFFIX)[0]) for p in ckpt_dir.iterdir()
                if TMP_SUFFIX in p.name)


def tmp_created_ns(tmp_dir: pathlib.Path) -> Optional[int]:
  """When orbax created a temporary checkpoint folder (None: not readable
  yet); it writes ``_CHECKPOINT_METADATA`` with ``init_timestamp_nsecs``
  first."""
  try:
    return json.loads((tmp_dir / '_CHECKPOINT_METADATA').read_text())[
        'init_timestamp_nsecs']
  except (OSError, ValueError, KeyError):
    return None


def checkpoint_arrays(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of a checkpoint's ``state`` item, by path, as NumPy."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(pathlib.Path(step_dir).absolute() / 'state')
  return flat_arrays(tree)


def flat_arrays(tree: Any) -> dict[str, np.ndarray]:
  """A pytree's leaves as NumPy arrays, by '/'-joined path."""
  import jax  # pylint: disable=g-import-not-at-top
  from scale_optax import path_str  # pylint: disable=g-import-not-at-top
  return {path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                       what: str = '') -> None:
  """Bitwise equality of two checkpoints' arrays, naming the paths that differ."""
  assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys()))
  differ = [k for k in sorted(a) if not (a[k].dtype == b[k].dtype and
                                         np.array_equal(a[k], b[k]))]
  assert not differ, f'{what}: arrays differ at {differ}'


# ------------------------------------------------------------------ damage --

def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The array data files of a checkpoint, largest first."""
  files = [p for p in (pathlib.Path(step_dir) / 'state').rglob('*')
           if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: -p.stat().st_size)


def flip_bytes(path: pathlib.Path, count: int = 3, seed: int = 0) -> list[int]:
  """XORs ``count`` bytes of ``path`` (in its middle 80%) with 0xFF."""
  data = bytearray(path.read_bytes())
  rng = np.random.default_rng(seed)
  lo, hi = len(data) // 10, max(len(data) // 10 + 1, len(data) * 9 // 10)
  offsets = sorted(int(o) for o in rng.choice(np.arange(lo, hi), count,
                                              replace=False))
  for o in offsets:
    data[o] ^= 0xFF
  path.write_bytes(bytes(data))
  return offsets


def truncate(path: pathlib.Path, fraction: float = 0.5) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])


# ---------------------------------------------------------- the child side --

def slowed(original, seconds: float):
  """``original`` (orbax's async writer of host arrays) after a sleep."""
  import asyncio  # pylint: disable=g-import-not-at-top

  async def slow(*args, **kwargs):
    await asyncio.sleep(seconds)
    return await original(*args, **kwargs)
  return slow


def _install_slow_save(seconds: float) -> None:
  """Delays orbax's background write of array data by ``seconds`` (the
  arrays are already on the host then: ``save`` has returned)."""
  from train import compat  # pylint: disable=g-import-not-at-top
  module, name = compat.orbax_array_writer()
  setattr(module, name, slowed(getattr(module, name), seconds))


def _child(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--slow-save', type=float, default=0.0)
  parser.add_argument('rest', nargs=argparse.REMAINDER)
  ns = parser.parse_args(argv)
  rest = ns.rest[1:] if ns.rest[:1] == ['--'] else ns.rest
  if ns.slow_save:
    _install_slow_save(ns.slow_save)
  from train.__main__ import main  # pylint: disable=g-import-not-at-top
  return main(rest)


if __name__ == '__main__':
  sys.exit(_child(sys.argv[1:]))
