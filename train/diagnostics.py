"""Per-layer stochastic-gradient variance: the diagnostic of the paper's Figure 4.

With ``train.diagnostics_every = N > 0`` the loop calls the function built by
:func:`make_gradient_variance` every N steps, on the step's parameters and
batch *before* the train step (it reads them, never changes them, and uses no
random numbers, so the training trajectory is the same with and without it),
and logs a ``'diagnostics'`` record to ``metrics.jsonl``.

The estimator. The batch of ``B`` sequences is split into ``k``
(``train.diagnostics_microbatches``) micro-batches of ``m = B / k`` sequences.
``g_i`` is the gradient of the mean token loss of micro-batch ``i`` (raw, before
clipping); with equal token counts their mean ``g = mean_i g_i`` is the step's
batch gradient. Per parameter element::

  s^2 = sum_i (g_i - g)^2 / (k - 1)     unbiased variance across micro-batches
  sigma^2 = m * s^2                     per-sequence variance

``Var[g_i] = sigma^2 / m`` when the sequences are independent draws, so
``sigma^2`` estimates the variance of the gradient of *one* sequence (the
"per-sample" variance), independent of ``k`` and ``B``; the variance of the
step's batch gradient is ``sigma^2 / B``. Each record holds, per param group
(``embed``, ``layer_0`` ... ``layer_{L-1}``, ``final_norm``, ``lm_head``):

* ``grad_var/<group>``: the mean of ``sigma^2`` over the group's elements;
* ``grad_sq/<group>``: the mean of ``g^2`` over the group's elements (the
  squared batch gradient; its expectation is ``mu^2 + sigma^2 / B``).

The k micro-batch gradients are computed one after another in a
``lax.scan`` (the cost of about one extra forward-backward pass of the whole
batch, only on diagnostic steps) and accumulated as shifted sums
``sum_i (g_i - g_0)``, ``sum_i (g_i - g_0)^2`` (numerically stable: the shift
``g_0`` is close to the mean), so memory is three gradient-sized buffers
whatever ``k``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

import scale_optax
from .model import layer_axes, loss_fn
from .state import Params, TrainSetup

Batch = dict[str, jax.Array]


def param_group(path: str) -> str:
  """``'layers/3/attn/q_proj/kernel' -> 'layer_3'``; ``'embed/...' -> 'embed'``."""
  parts = path.split('/')
  if parts[0] == 'layers' and len(parts) > 1:
    return f'layer_{parts[1]}'
  return parts[0]


def group_order(groups: Any) -> list[str]:
  """Groups in model order: embed, layer_0, layer_1, ..., final_norm, lm_head."""
  def key(g: str):
    if g == 'embed':
      return (0, 0, g)
    if g.startswith('layer_') and g[6:].isdigit():
      return (1, int(g[6:]), g)
    if g == 'lm_head':
      return (3, 0, g)
    return (2, 0, g)
  return sorted(set(groups), key=key)


def gradient_variance(setup: TrainSetup, params: Params, batch: Batch,
                      num_microbatches: int) -> dict[str, jax.Array]:
  """The per-group variance record (see the module docstring); traceable."""
  k = num_microbatches
  rows = batch['inputs'].shape[0]
  if k < 2 or rows % k:
    raise ValueError(f'num_microbatches={k} must be >= 2 and divide the batch '
                     f'size {rows}.')
  m = rows // k
  micro = jax.tree.map(lambda x: x.reshape((k, m) + x.shape[1:]), batch)

  def grad(mb: Batch) -> Params:
    return jax.grad(lambda p: loss_fn(setup.merge(p), mb)[0])(params)

  shift = grad(jax.tree.map(lambda x: x[0], micro))

  def body(carry, mb):
    s1, s2 = carry
    d = jax.tree.map(lambda g, g0: g.astype(jnp.float32) - g0, grad(mb), shift)
    return (jax.tree.map(jnp.add, s1, d),
            jax.tree.map(lambda a, x: a + x * x, s2, d)), None

  shift = jax.tree.map(lambda g: g.astype(jnp.float32), shift)
  zeros = jax.tree.map(jnp.zeros_like, shift)
  (s1, s2), _ = jax.lax.scan(body, (zeros, zeros),
                             jax.tree.map(lambda x: x[1:], micro))
  mean_d = jax.tree.map(lambda s: s / k, s1)  # The i = 0 term is zero.
  var = jax.tree.map(lambda s, md: jnp.maximum(s - k * md * md, 0.0) / (k - 1),
                     s2, mean_d)
  mean = jax.tree.map(jnp.add, shift, mean_d)

  sums: dict[str, list[jax.Array]] = {}
  counts: dict[str, int] = {}
  leaves = jax.tree_util.tree_leaves_with_path(var)
  mean_leaves = jax.tree.leaves(mean)
  for (path, v), g in zip(leaves, mean_leaves):
    name = scale_optax.path_str(path)
    # A scanned block's leaf holds every layer: one group per slice.
    slices = ([(f'layer_{i}', v[i], g[i]) for i in range(v.shape[0])]
              if layer_axes(name) else [(param_group(name), v, g)])
    for group, v_i, g_i in slices:
      acc = sums.setdefault(group, [jnp.float32(0), jnp.float32(0)])
      acc[0] = acc[0] + jnp.sum(v_i) * m
      acc[1] = acc[1] + jnp.sum(g_i * g_i)
      counts[group] = counts.get(group, 0) + v_i.size
  record = {}
  for group in group_order(sums):
    record[f'grad_var/{group}'] = sums[group][0] / counts[group]
    record[f'grad_sq/{group}'] = sums[group][1] / counts[group]
  return record


def make_gradient_variance(setup: TrainSetup, num_microbatches: int
                           ) -> Callable[[Params, Batch], dict[str, float]]:
  """A function ``(params, batch) -> {name: float}``, jitted once.

  It does not donate or modify its inputs: call it before the train step,
  which donates the parameters.
  """
  jitted = jax.jit(lambda p, b: gradient_variance(setup, p, b,
                                                  num_microbatches))

  def diagnose(params: Params, batch: Batch) -> dict[str, float]:
    out = jax.device_get(jitted(params, batch))
    return {name: float(value) for name, value in out.items()}

  return diagnose
