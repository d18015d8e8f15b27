"""The jitted train and eval steps.

One train step is forward, loss, gradients and the optimizer update, compiled
once with the shardings of every input and output and with the old params and
optimizer state donated. A step whose loss, gradient norm or updated
parameters are not finite is skipped inside the compiled step: parameters and
optimizer state come back unchanged and ``skipped`` is 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from train import mesh as mesh_lib
from train.model import loss_fn
from train.state import Params, TrainSetup

Batch = dict[str, jax.Array]


def _train_step(setup: TrainSetup, params: Params, opt_state: Any,
                batch: Batch) -> tuple[Params, Any, dict[str, jax.Array]]:
  def loss(p):
    return loss_fn(setup.merge(p), batch)

  (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = setup.tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  # Also the new params: an optimizer that made NaN or Inf from finite
  # gradients must not poison the state (all-finite, so no overflow in a norm).
  params_finite = jax.tree.reduce(
      jnp.logical_and, jax.tree.map(lambda p: jnp.isfinite(p).all(),
                                    new_params), jnp.bool_(True))
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm) & params_finite
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {'loss': value, 'grad_norm': grad_norm,
             'skipped': (~finite).astype(jnp.int32), 'tokens': aux['tokens']}
  return keep(new_params, params), keep(new_opt_state, opt_state), metrics


def _eval_step(setup: TrainSetup, params: Params,
               batch: Batch) -> dict[str, jax.Array]:
  value, aux = loss_fn(setup.merge(params), batch)
  return {'loss_sum': value * aux['tokens'], 'tokens': aux['tokens']}


def make_train_step(setup: TrainSetup) -> Callable[..., Any]:
  batch_sharding = mesh_lib.batch_sharding(setup.mesh, setup.config.mesh)
  return jax.jit(
      lambda p, o, b: _train_step(setup, p, o, b),
      in_shardings=(setup.param_shardings, setup.opt_shardings,
                    batch_sharding),
      out_shardings=(setup.param_shardings, setup.opt_shardings,
                     setup.replicated),
      donate_argnums=(0, 1))


def make_eval_step(setup: TrainSetup) -> Callable[..., Any]:
  batch_sharding = mesh_lib.batch_sharding(setup.mesh, setup.config.mesh)
  return jax.jit(
      lambda p, b: _eval_step(setup, p, b),
      in_shardings=(setup.param_shardings, batch_sharding),
      out_shardings=setup.replicated)
