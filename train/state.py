"""Parameters and optimizer state, created directly sharded on the mesh.

Parameters are a plain nested dict of arrays (``nnx.to_pure_dict`` of the
model's ``nnx.Param`` state): paths like ``layers/0/attn/q_proj/kernel`` and
``lm_head/kernel``, which is what SCALE's path matching and the checkpoints
see. ``TrainSetup`` holds what is static about a run: the model's graph, the
optimizer, and the shardings of every array, all derived from abstract shapes
(``nnx.get_abstract_model``, ``jax.eval_shape``) so nothing is materialized on
one device first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import scale_optax
from . import mesh as mesh_lib
from .config import Config
from .model import Llama

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The static parts of a run: model graph, optimizer, shardings."""
  config: Config
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  graphdef: Any
  state_treedef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_params: Params
  abstract_opt_state: Any

  @property
  def param_shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_params)

  @property
  def opt_shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_opt_state)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def compute_shardings(self) -> Any:
    """Each param's sharding for compute: gathered over the batch axes.

    A param split over a mesh axis that also splits the batch (``fsdp``) is
    stored split (FSDP/ZeRO-3) but must be whole along that axis where it
    meets the activations; other axes (``tensor``) stay split.
    """
    drop = set(mesh_lib.spec_axes(mesh_lib.batch_axes(self.config.mesh)))

    def gathered(sharding: NamedSharding) -> NamedSharding:
      spec = []
      for axes in sharding.spec:
        kept = tuple(a for a in mesh_lib.spec_axes(axes) if a not in drop)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
      return NamedSharding(self.mesh, PartitionSpec(*spec))

    return jax.tree.map(gathered, self.param_shardings)

  def merge(self, params: Params) -> Llama:
    """The nnx model holding ``params`` (inside a traced function).

    The params are first constrained to :attr:`compute_shardings`: XLA
    all-gathers the FSDP-split weights where they are used (and
    reduce-scatters their gradients), so activations stay split over the
    batch. Without it the compiler may instead keep the activations split
    over the weights' ``embed`` axis and replicate the batch on every device
    (it did: 3x the step's temporary memory for the tiny model on fsdp=8).
    """
    params = jax.tree.map(jax.lax.with_sharding_constraint, params,
                          self.compute_shardings)
    state = jax.tree.unflatten(self.state_treedef, jax.tree.leaves(params))
    return nnx.merge(self.graphdef, state)

  def init_params(self, seed: int) -> Params:
    """Initializes the parameters, each created with its final sharding."""
    config = self.config.model

    def init(key):
      with nnx.logical_axis_rules(self.rules):
        model = Llama(config, rngs=nnx.Rngs(params=key))
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.param_shardings)(
          jax.random.key(seed))

  def init_opt_state(self, params: Params) -> Any:
    with jax.set_mesh(self.mesh):
      return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)


def _state_shardings(tx: optax.GradientTransformation, abstract_state: Any,
                     abstract_params: Params, replicated: NamedSharding) -> Any:
  """Optimizer-state leaves shaped like their param take the param's sharding.

  Other leaves of a params-like subtree (Adafactor's factored row and column
  statistics) and all remaining leaves (step counters) are replicated.
  """
  def with_sharding(leaf, sharding):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  def param_like(leaf, param):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    return with_sharding(leaf, param.sharding if leaf.shape == param.shape
                         else replicated)

  return optax.tree_map_params(
      tx, param_like, abstract_state, abstract_params,
      transform_non_params=lambda x: with_sharding(x, replicated),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def make_setup(config: Config, mesh: Mesh,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> TrainSetup:
  """Derives shapes and shardings of params and optimizer state, abstractly."""
  rules = mesh_lib.logical_rules(config.mesh)
  with nnx.logical_axis_rules(rules):
    graphdef, abstract_state = nnx.get_abstract_model(
        lambda: Llama(config.model, rngs=nnx.Rngs(0)), mesh)
  abstract_params = nnx.to_pure_dict(abstract_state)
  state_treedef = jax.tree.structure(abstract_state)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  abstract_opt = _state_shardings(tx, abstract_opt, abstract_params,
                                  replicated)
  return TrainSetup(config=config, mesh=mesh, rules=rules, graphdef=graphdef,
                    state_treedef=state_treedef, tx=tx, schedule=schedule,
                    abstract_params=abstract_params,
                    abstract_opt_state=abstract_opt)


def memory_report(setup: TrainSetup) -> dict[str, int]:
  """Bytes of parameters and optimizer state (global, from abstract shapes)."""
  return {
      'param_bytes': scale_optax.state_bytes(setup.abstract_params),
      'opt_state_bytes': scale_optax.state_bytes(setup.abstract_opt_state),
  }
