"""``python -m train --dry-run``: will this config fit on this mesh?

Lowers and compiles the train step for the config's model, optimizer and mesh
with abstract inputs (nothing is allocated, no data is read) and prints, per
device, the bytes of parameters, optimizer state and batch, and the compiled
step's temporary memory from ``compiled.memory_analysis()``. Simulate a pod
on a CPU host with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``::

  XLA_FLAGS=--xla_force_host_platform_device_count=16 \\
    python -m train --dry-run --config llama_7b mesh.fsdp=16

The state and batch rows come from the shardings alone (exact); the step's
temporaries are what XLA's compiler for this backend plans, so a CPU dry run
of a GPU or TPU job is an estimate (fusion and layouts differ). With
``train.grad_accum_steps=k`` the step holds the activations of one
micro-batch (``batch_size / k`` rows) at a time, plus a float32 gradient
accumulator like the params.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

import scale_optax
from . import mesh as mesh_lib
from .config import Config
from .optim import make_optimizer
from .state import make_setup
from .step import make_train_step

GiB = 1024 ** 3


def shard_shape(leaf: Any) -> tuple[int, ...]:
  """A device's block of ``leaf`` (the largest block when shards are uneven)."""
  sharding = leaf.sharding
  try:
    return tuple(sharding.shard_shape(leaf.shape))
  except ValueError:  # Not divisible: XLA pads; count the padded block.
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    shape = []
    for dim, axes in zip(leaf.shape, spec):
      parts = math.prod(sharding.mesh.shape[a]
                        for a in mesh_lib.spec_axes(axes))
      shape.append(-(-dim // parts))
    return tuple(shape)


def per_device_bytes(tree: Any) -> int:
  """Bytes of an abstract tree with shardings held by one device.

  Every leaf contributes its shard (the largest one if the split is uneven):
  a replicated leaf counts in full, a leaf split n ways counts 1/n.
  """
  shards = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(shard_shape(leaf), leaf.dtype), tree)
  return scale_optax.state_bytes(shards)


def dry_run(config: Config) -> dict[str, Any]:
  """Compiles the train step abstractly; returns the per-device byte counts.

  Keys: ``param_bytes``, ``opt_state_bytes``, ``batch_bytes`` (per device),
  the same with ``_total`` (all devices together, one copy of each array),
  and from the compiled step's ``memory_analysis()`` (per device; None where
  the backend does not report it): ``temp_bytes`` (temporaries),
  ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (outputs that reuse
  donated inputs).
  """
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(config, mesh)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps,
                                config.rivals,
                                scan_layers=config.model.scan_layers)
  setup = make_setup(config, mesh, tx, schedule)
  batch_sharding = mesh_lib.batch_sharding(mesh, config.mesh)
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len),
                                jnp.int32, sharding=batch_sharding)
  batch = {'inputs': tokens, 'targets': tokens}
  if not config.data.packing:  # One document a row: the loss mask too.
    batch['weights'] = jax.ShapeDtypeStruct(tokens.shape, jnp.float32,
                                            sharding=batch_sharding)
  with jax.set_mesh(mesh):
    compiled = make_train_step(setup).lower(
        setup.abstract_params, setup.abstract_opt_state, batch).compile()
  analysis = compiled.memory_analysis()
  stat = lambda name: (None if analysis is None
                       else getattr(analysis, name, None))
  return {
      'devices': mesh.size,
      'mesh': dict(mesh.shape),
      'param_bytes': per_device_bytes(setup.abstract_params),
      'opt_state_bytes': per_device_bytes(setup.abstract_opt_state),
      'batch_bytes': per_device_bytes(batch),
      'param_bytes_total': scale_optax.state_bytes(setup.abstract_params),
      'opt_state_bytes_total': scale_optax.state_bytes(
          setup.abstract_opt_state),
      'batch_bytes_total': scale_optax.state_bytes(batch),
      'temp_bytes': stat('temp_size_in_bytes'),
      'argument_bytes': stat('argument_size_in_bytes'),
      'output_bytes': stat('output_size_in_bytes'),
      'alias_bytes': stat('alias_size_in_bytes'),
  }


def peak_bytes(r: dict[str, Any]) -> Optional[int]:
  """Arguments + outputs - donated (aliased) + temporaries, per device."""
  parts = [r.get(k) for k in ('argument_bytes', 'output_bytes', 'alias_bytes',
                              'temp_bytes')]
  if any(p is None for p in parts):
    return None
  args, outs, alias, temps = parts
  return args + outs - alias + temps


def _micro(config: Config) -> str:
  k = config.train.grad_accum_steps
  return (f' as {k} micro-batches of {config.data.batch_size // k}' if k > 1
          else '')


def format_report(config: Config, r: dict[str, Any]) -> str:
  """The table printed by ``--dry-run``: per device in bytes and GiB, and the
  total over all devices (one copy of each array) for the state and batch."""
  gib = lambda b: 'n/a' if b is None else f'{b / GiB:.3f}'
  num = lambda b: 'n/a' if b is None else f'{b:,}'
  rows = [('params', r['param_bytes'], r.get('param_bytes_total')),
          ('optimizer state', r['opt_state_bytes'],
           r.get('opt_state_bytes_total')),
          ('batch', r['batch_bytes'], r.get('batch_bytes_total')),
          ('step temporaries', r['temp_bytes'], None),
          ('step peak (args + outputs - donated + temps)', peak_bytes(r),
           None)]
  lines = [f'dry run: {config.optimizer.name} on mesh {r["mesh"]} '
           f'({r["devices"]} devices), d_model {config.model.d_model}, '
           f'{config.model.n_layers} layers, batch {config.data.batch_size} x '
           f'{config.data.seq_len}{_micro(config)}, compute {config.model.dtype}',
           f'{"per device":<46} {"bytes":>16} {"GiB":>10} {"total GiB":>10}']
  lines += [f'{name:<46} {num(value):>16} {gib(value):>10} '
            f'{gib(total) if total is not None else "":>10}'.rstrip()
            for name, value, total in rows]
  return '\n'.join(lines)
