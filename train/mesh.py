"""The device mesh and the logical-axis rules that place arrays on it.

The mesh has three axes, ``data``, ``fsdp`` and ``tensor`` (sizes from the
config, ``-1`` takes the remaining devices). Its axis type is
``AxisType.Auto``: the compiler propagates shardings from the annotated
parameters and the batch, as Flax layers expect (jax 0.10 defaults to
``Explicit``, under which a Flax ``Linear`` with sharded contracting
dimensions fails). Model weights carry logical axis names (``embed``,
``mlp``, ``heads``, ``vocab``, ``norm``); ``mesh.rules`` in the config maps
them to mesh axes, and the batch goes over ``mesh.rules['batch']``.

With several processes (see ``distributed.py``) every process builds the same
global mesh over all devices and reads its own ``1/process_count`` of each
global batch; :func:`check_batch` checks that the batch sharding lets it.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .config import Config, ConfigError, MeshConfig

AXES = ('data', 'fsdp', 'tensor')


def spec_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one ``PartitionSpec`` entry (or rule target) as a
  tuple: ``None`` -> ``()``, ``'fsdp'`` -> ``('fsdp',)``."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


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


def _rule_target(target: Any) -> Any:
  """A YAML list of mesh axes as the tuple a PartitionSpec entry takes."""
  return tuple(target) if isinstance(target, list) else target


def logical_rules(config: MeshConfig) -> tuple[tuple[str, Any], ...]:
  """The rules as Flax expects them: ``((logical, mesh_axes), ...)``."""
  return tuple((name, _rule_target(t)) for name, t in config.rules.items())


def batch_axes(config: MeshConfig) -> Any:
  """The batch dimension's PartitionSpec entry (``mesh.rules['batch']``)."""
  return _rule_target(config.rules.get('batch'))


def batch_sharding(mesh: Mesh, config: MeshConfig) -> NamedSharding:
  """Batches ``[B, L]`` are split over the batch axes, sequence replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(config), None))


def data_parallel_size(mesh: Mesh, config: MeshConfig) -> int:
  return math.prod(mesh.shape[a] for a in spec_axes(batch_axes(config)))


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
