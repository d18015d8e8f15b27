"""Muon's matrix axes in the trainer: fan-in is a Flax kernel's axis -2.

Muon orthogonalizes a kernel and multiplies it by
``sqrt(max(1, fan_out / fan_in))`` (optax's width scaling), so swapping the
reduction and output axes of its dimension numbers changes nothing on square
kernels and moves the factor between the two MLP kernels. On a rank-1
gradient ``G`` every orthogonalization gives ``c G / |G|`` with the same
``c > 0`` for ``G`` and ``G^T``; the first update of ``up_proj [d, f]`` is then
``sqrt(f / d)`` times that of ``down_proj [f, d]`` exactly, whatever ``c`` is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.config import OptimizerConfig
from train.optim import make_optimizer

D, F, LAYERS = 4, 9, 2


def _rank_one(shape, seed):
  rng = np.random.default_rng(seed)
  g = np.outer(rng.uniform(0.5, 1.5, shape[-2]), rng.uniform(0.5, 1.5,
                                                               shape[-1]))
  return g * rng.choice([-1.0, 1.0], shape[-2])[:, None]


def _first_update_scales(scan_layers: bool) -> dict[str, float]:
  """``kappa`` per kernel (per layer when stacked): ``u = -kappa G / |G|``."""
  config = OptimizerConfig(name='muon', learning_rate=0.1, warmup_ratio=0.0,
                           min_lr_ratio=1.0, grad_clip=None)
  tx, _ = make_optimizer(config, 10, scan_layers=scan_layers)
  up = _rank_one((D, F), 0)
  down = up.T.copy()  # G and G^T: the same orthogonalization.
  mlp = lambda u, d: {'up_proj': {'kernel': u}, 'down_proj': {'kernel': d}}
  if scan_layers:
    grads = {'layers': {'mlp': mlp(np.stack([up] * LAYERS),
                                   np.stack([down] * LAYERS))}}
  else:
    grads = {'layers': {str(i): {'mlp': mlp(up, down)}
                        for i in range(LAYERS)}}
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  scales = {}
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, u), g in zip(flat, jax.tree.leaves(grads)):
    name = jax.tree_util.keystr(path)
    u, g = np.asarray(u, np.float64), np.asarray(g, np.float64)
    for i, (u_i, g_i) in enumerate(zip(u.reshape(-1, *u.shape[-2:]),
                                       g.reshape(-1, *g.shape[-2:]))):
      direction = g_i / np.linalg.norm(g_i)
      kappa = -float(np.sum(u_i * direction))
      assert kappa > 0, name
      np.testing.assert_allclose(u_i, -kappa * direction, rtol=1e-3,
                                 atol=1e-6, err_msg=name)
      scales[f'{name}[{i}]'] = kappa
  return scales


@pytest.mark.parametrize('scan_layers', [False, True],
                         ids=['unrolled', 'scanned'])
def test_muon_scales_up_proj_by_sqrt_fan_out_over_fan_in(scan_layers):
  scales = _first_update_scales(scan_layers)
  ups = [k for k in scales if 'up_proj' in k]
  downs = [k for k in scales if 'down_proj' in k]
  assert len(ups) == len(downs) == LAYERS
  for up, down in zip(sorted(ups), sorted(downs)):
    assert scales[up] / scales[down] == pytest.approx(math.sqrt(F / D),
                                                      rel=1e-5)
