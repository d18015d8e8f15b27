"""The device mesh and the logical-axis rules that place arrays on it.

The mesh has three axes, ``data``, ``fsdp`` and ``tensor`` (sizes from the
config, ``-1`` takes the remaining devices). Its axis type is
``AxisType.Auto``: the compiler propagates shardings from the annotated
parameters and the batch, as Flax layers expect (jax 0.10 defaults to
``Explicit``, under which a Flax ``Linear`` with sharded contracting
dimensions fails). Model weights carry logical axis names (``embed``,
``mlp``, ``heads``, ``vocab``, ``norm``); ``mesh.rules`` in the config maps
them to mesh axes, and the batch goes over ``mesh.rules['batch']``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from train.config import Config, ConfigError, MeshConfig

AXES = ('data', 'fsdp', 'tensor')


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
  """The global batch must split evenly over data parallelism and processes."""
  dp = data_parallel_size(mesh, config.mesh)
  if config.data.batch_size % dp:
    raise ConfigError(
        f'data.batch_size: {config.data.batch_size} is not divisible by the '
        f'data-parallel size {dp} (mesh {dict(mesh.shape)}).')
  if config.data.batch_size % jax.process_count():
    raise ConfigError(
        f'data.batch_size: {config.data.batch_size} is not divisible by the '
        f'{jax.process_count()} processes.')
