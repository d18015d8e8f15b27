"""Helpers for the sharding, multi-host and dry-run tests: run the real
trainer (``python -m train``) in subprocesses on simulated CPU devices.

The device count (``--xla_force_host_platform_device_count``) must be set
before jax is imported, and the test process's jax already has one device, so
every multi-device run is a fresh interpreter. All subprocesses of a test
session share:

- one prepared data directory (:func:`shared_data_dir`: the embedded data set
  and its 512-piece tokenizer are built once, in the test process);
- one persistent jax compilation cache (:func:`compile_cache_dir`): a run
  whose program was compiled earlier in the session (a restart of the same
  mesh) loads it instead of compiling again. Only compile time changes.

Every subprocess is bounded by a timeout; its output is in the failure
message.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
from typing import Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]

# The trainer's tiny config cut down to compile and run quickly on 2 cores
# (the same model as tests/train/test_train_e2e.py, so one tokenizer serves
# both). d_model 64 and vocab 512 divide by fsdp 8 and tensor 2; batch 8
# divides by data*fsdp 8 and by 2 processes.
SMALL = ('model.vocab_size=512', 'model.d_model=64', 'model.n_layers=2',
         'model.n_heads=2', 'model.d_ff=176', 'data.seq_len=64',
         'data.batch_size=8', 'train.eval_tokens=1024', 'train.progress=false',
         'train.log_every=1')
VOCAB = 512

DEFAULT_TIMEOUT = 240


def shared_data_dir(tmp_path_factory) -> str:
  """One data directory for the session, prepared on first use."""
  root = tmp_path_factory.getbasetemp() / 'shared_train_data'
  done = root / '.prepared'
  if not done.exists():
    from train import data as data_lib  # pylint: disable=g-import-not-at-top
    from train.config import load_config  # pylint: disable=g-import-not-at-top
    config = load_config(None, [*SMALL, f'data.data_dir={root}'])
    data_lib.prepare(config.data, VOCAB)
    done.write_text('ok')
  return str(root)


def compile_cache_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.getbasetemp() / 'jax_compile_cache'
  path.mkdir(exist_ok=True)
  return str(path)


def subprocess_env(devices: int, cache_dir: Optional[str] = None,
                   extra: Optional[dict[str, str]] = None) -> dict[str, str]:
  """The environment of a CPU-only child with ``devices`` simulated devices."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
              'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    env.pop(key, None)
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  env.update(extra or {})
  return env


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
  out = (proc.stdout or '') + (proc.stderr or '')
  if proc.returncode != 0:
    raise AssertionError(f'{what} exited with {proc.returncode}:\n'
                         f'{out[-6000:]}')
  return out


def run_train(args: Sequence[str], *, devices: int, run_dir, data_dir: str,
              cache_dir: Optional[str] = None, dry_run: bool = False,
              timeout: int = DEFAULT_TIMEOUT) -> str:
  """Runs ``python -m train`` on ``devices`` CPU devices; returns its output."""
  cmd = [sys.executable, '-m', 'train', *(['--dry-run'] if dry_run else []),
         *SMALL, f'data.data_dir={data_dir}', f'train.run_dir={run_dir}',
         *args]
  proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices, cache_dir),
                        capture_output=True, text=True, timeout=timeout)
  return _check(proc, ' '.join(cmd[2:]))


def run_python(code: str, *, devices: int, cache_dir: Optional[str] = None,
               timeout: int = DEFAULT_TIMEOUT) -> str:
  """Runs ``python -c code`` on ``devices`` CPU devices; returns its output."""
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        env=subprocess_env(devices, cache_dir),
                        capture_output=True, text=True, timeout=timeout)
  return _check(proc, 'python -c <script>')


def last_json_line(output: str) -> dict:
  """The last line of ``output`` that parses as a JSON object."""
  for line in reversed(output.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise AssertionError(f'no JSON line in the output:\n{output[-4000:]}')


def records(run_dir, kind: str = 'train') -> list[dict]:
  path = pathlib.Path(run_dir) / 'metrics.jsonl'
  return [r for r in map(json.loads, path.read_text().splitlines())
          if r['kind'] == kind]


def losses(run_dir) -> dict[int, float]:
  """Train loss by step, from ``metrics.jsonl`` (needs train.log_every=1)."""
  return {r['step']: r['loss'] for r in records(run_dir, 'train')}


def free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
