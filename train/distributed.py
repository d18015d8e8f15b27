"""Multi-process start-up and barriers.

Several processes (multi-host): :func:`initialize_distributed` starts
``jax.distributed`` from the config's ``distributed.*`` keys or the
environment, before anything touches a device. Every process then runs the
same program; :func:`sync_processes` is a barrier of all processes, and
:func:`main_process_first` runs one-time work (data preparation) on process 0
before the others. With one process every function here does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, TypeVar

import jax
import orbax.checkpoint.multihost as ocp_multihost

from .config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

T = TypeVar('T')

# Launchers that start one process per host and say how many there are; with
# one of these jax.distributed.initialize() finds every value by itself.
_LAUNCHER_PROCESS_COUNTS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _launched_processes(environ: Any) -> int:
  """How many processes a cluster launcher reports (1 if none)."""
  for key in _LAUNCHER_PROCESS_COUNTS:
    try:
      if int(environ.get(key, '1')) > 1:
        return int(environ[key])
    except ValueError:
      pass
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')  # Cloud TPU pod slices.
  return max(1, len([h for h in hosts.split(',') if h]))


def distributed_arguments(config: DistributedConfig,
                          environ: Any = None) -> Optional[dict[str, Any]]:
  """The ``jax.distributed.initialize`` arguments, or None for one process.

  Each config value, when None, comes from the environment:
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
  ``JAX_LOCAL_DEVICE_IDS`` (comma-separated). With none of these set, a
  cluster launcher that started several processes (SLURM, Open MPI, a Cloud
  TPU pod slice) still starts ``jax.distributed``, and jax detects the
  values. Otherwise the run is a single process and nothing is initialized.
  """
  environ = os.environ if environ is None else environ

  def pick(value, key, cast):
    if value is not None:
      return value
    raw = environ.get(key)
    if raw in (None, ''):
      return None
    try:
      return cast(raw)
    except ValueError:
      raise ConfigError(f'distributed: environment variable {key}={raw!r} '
                        f'is not valid.') from None

  ids = lambda text: [int(i) for i in str(text).split(',') if i.strip()]
  args = {
      'coordinator_address': pick(config.coordinator_address,
                                  'JAX_COORDINATOR_ADDRESS', str),
      'num_processes': pick(config.num_processes, 'JAX_NUM_PROCESSES', int),
      'process_id': pick(config.process_id, 'JAX_PROCESS_ID', int),
      'local_device_ids': pick(config.local_device_ids or None,
                               'JAX_LOCAL_DEVICE_IDS', str),
  }
  if args['local_device_ids'] is not None:
    try:
      args['local_device_ids'] = ids(args['local_device_ids'])
    except ValueError:
      raise ConfigError(
          f'distributed.local_device_ids: expected comma-separated integers, '
          f'got {args["local_device_ids"]!r}.') from None
  given = [k for k in ('coordinator_address', 'num_processes', 'process_id')
           if args[k] is not None]
  if not given and _launched_processes(environ) == 1:
    return None
  if args['num_processes'] == 1:
    return None
  n, i = args['num_processes'], args['process_id']
  if n is not None and n < 1:
    raise ConfigError(f'distributed.num_processes: must be positive, got {n}.')
  if i is not None and n is not None and not 0 <= i < n:
    raise ConfigError(f'distributed.process_id: must be in [0, {n}), got {i}.')
  return args


def _use_cpu_collectives() -> None:
  """Cross-process collectives on CPU need an implementation (gloo).

  Without one the CPU client has no cross-process collectives, so a sharded
  step over devices of several processes cannot run. Set it here when it is
  unset, before the CPU client exists; the flag only changes the CPU client,
  so an accelerator run is not affected.
  """
  platforms = (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS')
               or '')
  first = platforms.split(',')[0].strip().lower()
  if first not in ('', 'cpu'):
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize_distributed(config: DistributedConfig,
                           environ: Any = None) -> bool:
  """Starts ``jax.distributed`` for a multi-process run; True if it did.

  Call it first, before anything initializes a jax backend (device lists,
  arrays). See :func:`distributed_arguments` for where the values come from.
  A second call, or one after jax.distributed is already up, does nothing.
  """
  if jax.distributed.is_initialized():
    return True
  args = distributed_arguments(config, environ)
  if args is None:
    return False
  _use_cpu_collectives()
  address = args['coordinator_address']
  environ = os.environ if environ is None else environ
  if (address and _is_loopback(address)
      and not environ.get('JAX_COORDINATOR_BIND_ADDRESS')):
    # A coordinator on the loopback address serves this host only: listen
    # there, not on every interface (jax's default is [::]:port).
    args['coordinator_bind_address'] = address
  log.info('jax.distributed.initialize(%s)', args)
  jax.distributed.initialize(**args)
  return True


def _is_loopback(address: str) -> bool:
  host = address.rsplit(':', 1)[0].strip('[]')
  return host == 'localhost' or host.startswith('127.') or host == '::1'


_barriers = 0  # Barriers passed by this process: makes each key unique.


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of all processes (a no-op with one process).

  Every process must make the same sequence of calls. It waits in the
  coordination service of ``jax.distributed`` (through orbax's barrier), not
  in a device computation, so a long wait, e.g. for data preparation, cannot
  trip a collective's timeout.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  _barriers += 1
  barrier = ocp_multihost.get_barrier_sync_fn()
  barrier(key=f'scale_optax_{name}_{_barriers}', timeout_ms=timeout_s * 1000)


def main_process_first(fn: Callable[[], T], name: str) -> T:
  """Runs ``fn`` on process 0, then (after a barrier) on the other processes.

  For one-time work with a shared result on disk, such as preparing the data
  set and training its tokenizer: process 0 builds it, the others then find
  it ready instead of racing to build the same files. (On hosts without a
  shared file system each host builds its own copy after process 0.)
  Every process must call it, in the same order as its other barriers.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    result = fn()
    sync_processes(name)
    return result
  sync_processes(name)
  return fn()
