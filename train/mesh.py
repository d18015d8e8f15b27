"""The device mesh and the logical-axis rules that place arrays on it.

The mesh has three axes, ``data``, ``fsdp`` and ``tensor`` (sizes from the
config, ``-1`` takes the remaining devices). Its axis type is
``AxisType.Auto``: the compiler propagates shardings from the annotated
parameters and the batch, as Flax layers expect (jax 0.10 defaults to
``Explicit``, under which a Flax ``Linear`` with sharded contracting
dimensions fails). Model weights carry logical axis names (``embed``,
``mlp``, ``heads``, ``vocab``, ``norm``); ``mesh.rules`` in the config maps
them to mesh axes, and the batch goes over ``mesh.rules['batch']``.

Several processes (multi-host): :func:`initialize_distributed` starts
``jax.distributed`` from the config's ``distributed.*`` keys or the
environment, before anything touches a device. Every process then builds the
same global mesh over all devices, reads its own ``1/process_count`` of each
global batch (:func:`check_batch` checks that the batch sharding lets it), and
runs the same program; :func:`main_process_first` runs one-time work (data
preparation) on process 0 before the others.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Optional, Sequence, TypeVar

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .config import Config, ConfigError, DistributedConfig, MeshConfig

log = logging.getLogger(__name__)

AXES = ('data', 'fsdp', 'tensor')
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

  jax 0.10 defaults ``jax_cpu_collectives_implementation`` to ``'gloo'``
  (jax/_src/config.py; xla_bridge.make_cpu_client builds the CPU client with
  gloo TCP collectives over the distributed client). Without one the CPU
  client has no cross-process collectives, so a sharded step over devices
  of several processes cannot run. Set it here
  when it is unset, before the CPU client exists; the flag only changes the
  CPU client, so an accelerator run is not affected.
  """
  platforms = (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS')
               or '')
  first = platforms.split(',')[0].strip().lower()
  if first not in ('', 'cpu'):
    return
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # A jax without the flag: nothing to choose.
    pass


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

  Every process must make the same sequence of calls. Uses the coordination
  service's barrier (no device computation, so a long wait, e.g. for data
  preparation, cannot trip a collective's timeout); falls back to
  ``multihost_utils.sync_global_devices``.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  _barriers += 1
  key = f'scale_optax_{name}_{_barriers}'
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
  except ImportError:
    client = None
  if client is not None and hasattr(client, 'wait_at_barrier'):
    client.wait_at_barrier(key, timeout_in_ms=timeout_s * 1000)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(key)


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


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 and checks that the sizes multiply to the device count."""
  sizes = [config.data, config.fsdp, config.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f'mesh: the fixed axis sizes (product {known}) do not divide the '
          f'{num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f'mesh: data*fsdp*tensor = {math.prod(sizes)} does not match the '
        f'{num_devices} devices.')
  return tuple(sizes)


def make_mesh(config: MeshConfig,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_rules(config: MeshConfig) -> tuple[tuple[str, Any], ...]:
  """The rules as Flax expects them: ``((logical, mesh_axes), ...)``."""
  return tuple((name, tuple(t) if isinstance(t, list) else t)
               for name, t in config.rules.items())


def batch_axes(config: MeshConfig) -> Any:
  target = config.rules.get('batch')
  return tuple(target) if isinstance(target, list) else target


def batch_sharding(mesh: Mesh, config: MeshConfig) -> NamedSharding:
  """Batches ``[B, L]`` are split over the batch axes, sequence replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(config), None))


def data_parallel_size(mesh: Mesh, config: MeshConfig) -> int:
  axes = batch_axes(config)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch(config: Config, mesh: Mesh) -> None:
  """The global batch must split evenly over data parallelism and processes.

  Each process reads ``batch_size / process_count`` rows of every global
  batch, so the rows that the batch sharding puts on a process's devices must
  be exactly that many (not so when, e.g., the batch is replicated over an
  axis that spans processes). With gradient accumulation each micro-batch
  must split too.
  """
  dp = data_parallel_size(mesh, config.mesh)
  batch, processes = config.data.batch_size, jax.process_count()
  if batch % dp:
    raise ConfigError(
        f'data.batch_size: {batch} is not divisible by the '
        f'data-parallel size {dp} (mesh {dict(mesh.shape)}).')
  k = config.train.grad_accum_steps
  if (batch // k) % dp:
    raise ConfigError(
        f'train.grad_accum_steps: micro-batches of {batch} / {k} = '
        f'{batch // k} rows do not split over the data-parallel size {dp} '
        f'(mesh {dict(mesh.shape)}).')
  if batch % processes:
    raise ConfigError(
        f'data.batch_size: {batch} is not divisible by the '
        f'{processes} processes.')
  if processes > 1:
    rows = local_batch_rows(batch_sharding(mesh, config.mesh), batch)
    if len(rows) != batch // processes:
      raise ConfigError(
          f'mesh.rules.batch: the batch sharding {batch_axes(config.mesh)!r} '
          f'on mesh {dict(mesh.shape)} puts {len(rows)} of the {batch} rows '
          f'of a batch on process {jax.process_index()}\'s devices, but each '
          f'of the {processes} processes reads {batch // processes}: shard '
          f'the batch over the axes that span processes (data, fsdp).')


def local_batch_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
  """The global batch rows held by this process's devices, in order."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(
      (batch_size, 1)).values():
    rows.update(range(*index[0].indices(batch_size)))
  return sorted(rows)
