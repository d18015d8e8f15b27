"""``python -m train --dry-run``: will this config fit on this mesh?

Lowers and compiles the train step for the config's model, optimizer and mesh
with abstract inputs (nothing is allocated, no data is read) and prints, per
device, the bytes of parameters, optimizer state and batch, and the compiled
step's temporary memory from ``compiled.memory_analysis()``. Simulate a pod
on a CPU host with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import mesh as mesh_lib
from train.config import Config
from train.optim import make_optimizer
from train.state import make_setup
from train.step import make_train_step

GiB = 1024 ** 3


def per_device_bytes(tree: Any) -> int:
  """The largest per-device share of an abstract tree with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def dry_run(config: Config) -> dict[str, Any]:
  """Compiles the train step abstractly; returns the per-device byte counts."""
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  setup = make_setup(config, mesh, tx, schedule)
  batch_sharding = mesh_lib.batch_sharding(mesh, config.mesh)
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len),
                                jnp.int32, sharding=batch_sharding)
  batch = {'inputs': tokens, 'targets': tokens}
  with jax.set_mesh(mesh):
    compiled = make_train_step(setup).lower(
        setup.abstract_params, setup.abstract_opt_state, batch).compile()
  analysis = compiled.memory_analysis()
  report = {
      'devices': mesh.size,
      'mesh': dict(mesh.shape),
      'param_bytes': per_device_bytes(setup.abstract_params),
      'opt_state_bytes': per_device_bytes(setup.abstract_opt_state),
      'batch_bytes': per_device_bytes(batch),
      'temp_bytes': getattr(analysis, 'temp_size_in_bytes', None),
      'argument_bytes': getattr(analysis, 'argument_size_in_bytes', None),
      'output_bytes': getattr(analysis, 'output_size_in_bytes', None),
      'alias_bytes': getattr(analysis, 'alias_size_in_bytes', None),
  }
  return report


def format_report(config: Config, r: dict[str, Any]) -> str:
  gib = lambda b: 'n/a' if b is None else f'{b / GiB:.3f}'
  peak = None
  if r['temp_bytes'] is not None and r['argument_bytes'] is not None:
    peak = r['argument_bytes'] + r['output_bytes'] - r['alias_bytes'] + \
        r['temp_bytes']
  rows = [('params', r['param_bytes']), ('optimizer state', r['opt_state_bytes']),
          ('batch', r['batch_bytes']), ('step temporaries', r['temp_bytes']),
          ('step peak (args + outputs - donated + temps)', peak)]
  lines = [f'dry run: {config.optimizer.name} on mesh {r["mesh"]} '
           f'({r["devices"]} devices), d_model {config.model.d_model}, '
           f'{config.model.n_layers} layers, batch {config.data.batch_size} x '
           f'{config.data.seq_len}, compute {config.model.dtype}',
           f'{"per device":<46} {"GiB":>10}']
  lines += [f'{name:<46} {gib(value):>10}' for name, value in rows]
  return '\n'.join(lines)
