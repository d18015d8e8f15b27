"""The jitted train and eval steps.

One train step is forward, loss, gradients and the optimizer update, compiled
once with the shardings of every input and output and with the old params and
optimizer state donated. A step whose loss, gradient norm or updated
parameters are not finite is skipped inside the compiled step: parameters and
optimizer state come back unchanged and ``skipped`` is 1.

With ``train.grad_accum_steps = k > 1`` the global batch is split into ``k``
micro-batches inside the one compiled step (a ``jax.lax.scan``): each
micro-batch's gradient of its summed token loss is added in float32, and the
optimizer sees once the token-weighted mean gradient of the whole batch, the
same gradient as with ``k = 1`` (SCALE normalizes it, never a micro-batch's).
Micro-batch ``j`` holds rows ``j, j + k, j + 2k, ...``: every device keeps
its share of each micro-batch, so no rows move between devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from . import mesh as mesh_lib
from .model import loss_fn
from .state import Params, TrainSetup

Batch = dict[str, jax.Array]


def micro_batches(setup: TrainSetup, batch: Batch, k: int) -> Batch:
  """``[B, ...]`` leaves as ``[k, B / k, ...]``: micro-batch ``j`` is rows
  ``j::k``, split over the batch axes like the batch itself."""
  axes = mesh_lib.batch_axes(setup.config.mesh)

  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    spec = jax.sharding.PartitionSpec(None, axes, *(None,) * (x.ndim - 2))
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(setup.mesh, spec))

  return jax.tree.map(split, batch)


def _accumulated_grads(setup: TrainSetup, params: Params, batch: Batch,
                       k: int) -> tuple[jax.Array, jax.Array, Params]:
  """``(mean loss, tokens, mean gradient)`` over ``k`` micro-batches.

  Sums of the token loss, the token count and the gradient of the token loss
  are carried in float32; the mean divides by the batch's token count.
  """
  def summed_loss(p, mb):
    _, aux = loss_fn(setup.merge(p), mb)
    return aux['loss_sum'], aux['tokens']

  def body(carry, mb):
    loss_sum, tokens, grad_sum = carry
    (value, count), grads = jax.value_and_grad(summed_loss, has_aux=True)(
        params, mb)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum,
                            grads)
    return (loss_sum + value, tokens + count, grad_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zeros = jax.tree.map(jax.lax.with_sharding_constraint, zeros,
                       setup.param_shardings)
  init = (jnp.float32(0), jnp.float32(0), zeros)
  (loss_sum, tokens, grad_sum), _ = jax.lax.scan(
      body, init, micro_batches(setup, batch, k))
  denom = jnp.where(tokens > 0, tokens, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum,
                       params)
  return loss_sum / denom, tokens, grads


def loss_and_grads(setup: TrainSetup, params: Params, batch: Batch
                   ) -> tuple[jax.Array, jax.Array, Params]:
  """``(mean token loss, tokens, gradient of the mean loss)`` for the batch,
  over ``train.grad_accum_steps`` micro-batches."""
  k = setup.config.train.grad_accum_steps
  if k > 1:
    return _accumulated_grads(setup, params, batch, k)
  (value, aux), grads = jax.value_and_grad(
      lambda p: loss_fn(setup.merge(p), batch), has_aux=True)(params)
  return value, aux['tokens'], grads


def _train_step(setup: TrainSetup, params: Params, opt_state: Any,
                batch: Batch) -> tuple[Params, Any, dict[str, jax.Array]]:
  value, tokens, grads = loss_and_grads(setup, params, batch)
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
             'skipped': (~finite).astype(jnp.int32), 'tokens': tokens}
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
