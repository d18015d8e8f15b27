"""The one harness for tests that run the trainer (or any Python) in a fresh
interpreter: CPU-only children with a chosen number of simulated devices, the
small model they train, the shared data and compilation cache, and readers of
what a run leaves.

The device count (``--xla_force_host_platform_device_count``) must be set
before jax is imported, and the test process's jax already has one device, so
every multi-device check is a subprocess. The subprocesses of a test session
share one prepared data directory (:func:`shared_data_dir`: the embedded data
set and its tokenizer, built once in the test process) and one persistent
compilation cache (:func:`compile_cache_dir`): a program compiled earlier in
the session is loaded instead of compiled again.

Usage::

  res = run_train(small_args(run_dir, data_dir, 'train.steps=5'), devices=8,
                  jax_cache=cache)
  output = res.check()               # raises, with the output, unless rc 0
  loss = losses(run_dir)             # step -> train loss

Every subprocess has a timeout; its output is in the failure message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
from typing import Any, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / 'tests'
DEFAULT_TIMEOUT = 240

# The tiny config cut down to compile and run in seconds on 2 cores. d_model
# 64 and vocab 512 divide by fsdp 8 and tensor 2; batch 8 divides by
# data * fsdp 8 and by 2 processes.
VOCAB = 512
SMALL: dict[str, Any] = {
    'model.vocab_size': VOCAB, 'model.d_model': 64, 'model.n_layers': 2,
    'model.n_heads': 2, 'model.d_ff': 176, 'data.seq_len': 64,
    'data.batch_size': 8, 'train.eval_tokens': 1024, 'train.progress': False,
    'train.log_every': 1,
}
# Variables that would make a child join a multi-process run.
_DISTRIBUTED_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                    'JAX_PROCESS_ID', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                    'TPU_WORKER_HOSTNAMES')


# ------------------------------------------------------------ the commands --

def override(key: str, value: Any) -> str:
  """``key=value`` as the trainer's command line parses it (YAML)."""
  if isinstance(value, bool):
    value = 'true' if value else 'false'
  elif value is None:
    value = 'null'
  return f'{key}={value}'


SMALL_ARGS = tuple(override(k, v) for k, v in SMALL.items())


def small_args(run_dir, data_dir, *args: str) -> list[str]:
  """``python -m train`` arguments: the small model in ``run_dir`` on the
  data in ``data_dir``, then ``args`` (later overrides win)."""
  return [*SMALL_ARGS, f'data.data_dir={data_dir}', f'train.run_dir={run_dir}',
          *args]


def env(devices: int = 1, jax_cache=None,
        paths: Sequence = ()) -> dict[str, str]:
  """The environment of a CPU-only child with ``devices`` simulated devices.

  The repository, ``tests/`` (this module) and ``paths`` are importable; no
  multi-process variables leak in; ``jax_cache`` is the persistent
  compilation cache (every program cached, however fast it compiled).
  """
  e = dict(os.environ)
  flags = [f for f in e.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  e['XLA_FLAGS'] = ' '.join(flags)
  e['JAX_PLATFORMS'] = 'cpu'
  e['PYTHONPATH'] = os.pathsep.join(
      [str(REPO), str(TESTS), *map(str, paths)]
      + [p for p in e.get('PYTHONPATH', '').split(os.pathsep) if p])
  e['PYTHONUNBUFFERED'] = '1'
  e['TF_CPP_MIN_LOG_LEVEL'] = '3'
  for key in _DISTRIBUTED_ENV:
    e.pop(key, None)
  if jax_cache is not None:
    e['JAX_COMPILATION_CACHE_DIR'] = str(jax_cache)
    e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    e['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return e


@dataclasses.dataclass
class Result:
  """A finished subprocess: exit code and output."""
  rc: int
  stdout: str
  stderr: str
  what: str = 'the subprocess'

  @property
  def output(self) -> str:
    return self.stdout + self.stderr

  def check(self) -> str:
    """The output; an AssertionError with its tail unless the exit code is 0."""
    if self.rc != 0:
      raise AssertionError(f'{self.what} exited with {self.rc}:\n'
                           f'{self.output[-6000:]}')
    return self.output

  def last_stderr_line(self) -> str:
    lines = [l for l in self.stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ''

  def resumed_from(self) -> Optional[int]:
    m = re.search(r'^resumed from step (\d+)', self.stdout, re.M)
    return int(m.group(1)) if m else None


def python_command(argv: Sequence[str]) -> list[str]:
  return [sys.executable, *map(str, argv)]


def start(argv: Sequence[str], *, devices: int = 1, jax_cache=None,
          paths: Sequence = (), **popen: Any) -> subprocess.Popen:
  """``python ARGV`` in the background, in the repository (see :func:`env`);
  ``popen`` chooses where its output goes."""
  return subprocess.Popen(python_command(argv), cwd=REPO,
                          env=env(devices, jax_cache, paths),
                          stdin=subprocess.DEVNULL, **popen)


def run(argv: Sequence[str], *, devices: int = 1, jax_cache=None,
        paths: Sequence = (), timeout: float = DEFAULT_TIMEOUT,
        what: Optional[str] = None) -> Result:
  """``python ARGV`` to the end (killed after ``timeout`` seconds)."""
  proc = subprocess.run(python_command(argv), cwd=REPO,
                        env=env(devices, jax_cache, paths),
                        stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=timeout)
  return Result(proc.returncode, proc.stdout, proc.stderr,
                what or ' '.join(map(str, argv)))


def run_train(args: Sequence[str], **kw: Any) -> Result:
  """``python -m train ARGS`` (keywords as :func:`run`)."""
  return run(['-m', 'train', *args], **kw)


def run_python(code: str, **kw: Any) -> Result:
  """``python -c CODE`` (keywords as :func:`run`)."""
  return run(['-c', code], what='python -c <script>', **kw)


# ------------------------------------------------- session-wide resources --

def prepare_data(data_dir, vocab_size: int = VOCAB) -> None:
  """Builds the embedded data set and its tokenizer under ``data_dir``."""
  from train import data  # pylint: disable=g-import-not-at-top
  from train.config import DataConfig  # pylint: disable=g-import-not-at-top
  data.prepare(DataConfig(data_dir=str(data_dir)), vocab_size)


def shared_data_dir(tmp_path_factory) -> pathlib.Path:
  """One data directory for the session, prepared on first use."""
  root = tmp_path_factory.getbasetemp() / 'shared_train_data'
  done = root / '.prepared'
  if not done.exists():
    prepare_data(root)
    done.write_text('ok')
  return root


def compile_cache_dir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.getbasetemp() / 'jax_compile_cache'
  path.mkdir(exist_ok=True)
  return path


def free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------- reading --

def records(run_dir, kind: Optional[str] = None) -> list[dict[str, Any]]:
  """The run's ``metrics.jsonl`` records (of ``kind``), [] before the first;
  the trainer's own reader, so a line torn mid-write is left out."""
  from train.metrics import read_records  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(run_dir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [r for r in read_records(path) if kind is None or r['kind'] == kind]


def losses(run_dir) -> dict[int, float]:
  """Train loss by step (needs train.log_every=1); each step logged once."""
  train = records(run_dir, 'train')
  steps = [r['step'] for r in train]
  assert len(steps) == len(set(steps)), f'steps logged twice: {steps}'
  return {r['step']: r['loss'] for r in train}


def last_json_line(output: str) -> dict:
  """The last line of ``output`` that parses as a JSON object."""
  for line in reversed(output.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise AssertionError(f'no JSON line in the output:\n{output[-4000:]}')
