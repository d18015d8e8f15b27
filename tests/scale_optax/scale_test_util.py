"""Shared helpers: small LLaMA-shaped trees and an independent NumPy SCALE.

Nothing here imports ``scale_optax``: the reference below is written from the
formulas of Algorithm 1 (arXiv 2506.16659), so comparing the library with it
checks the library rather than restating it.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------- trees ----


def llama_shapes(vocab: int, d: int, d_ff: int, n_layers: int,
                 tied: bool = False) -> dict:
  """Nested dict of shapes with the trainer's LLaMA paths (Flax layout)."""
  layers = {}
  for i in range(n_layers):
    layers[str(i)] = {
        'attn': {name: {'kernel': (d, d)}
                 for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
        'attn_norm': {'scale': (d,)},
        'mlp': {'gate_proj': {'kernel': (d, d_ff)},
                'up_proj': {'kernel': (d, d_ff)},
                'down_proj': {'kernel': (d_ff, d)}},
        'mlp_norm': {'scale': (d,)},
    }
  tree = {'embed': {'embedding': (vocab, d)}, 'layers': layers,
          'final_norm': {'scale': (d,)}}
  if not tied:
    tree['lm_head'] = {'kernel': (d, vocab)}
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, int) for a in x)


def make_params(shapes: dict, seed: int = 0, dtype=jnp.float32) -> dict:
  """Random parameters for a tree of shapes (norm scales start near 1)."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  rng = np.random.default_rng(seed)
  out = []
  for shape in leaves:
    if len(shape) == 1:
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      x = rng.standard_normal(shape) / np.sqrt(shape[0])
    out.append(jnp.asarray(x, dtype=dtype))
  return jax.tree.unflatten(treedef, out)


def abstract_params(shapes: dict, dtype=jnp.float32) -> dict:
  """``jax.ShapeDtypeStruct`` parameters built with ``jax.eval_shape``."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)

  def build():
    return jax.tree.unflatten(
        treedef, [jnp.zeros(s, dtype) for s in leaves])

  return jax.eval_shape(build)


def flatten_dict(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': x} (written here, not the library's paths)."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten_dict(v, key))
    else:
      out[key] = v
  return out


def unflatten_dict(flat: dict) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    parts = key.split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


# ---------------------------------------------------- numpy reference ----


def np_column_normalize(g: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """U = G / max(sqrt(mean_i G[i, j]^2), eps): one scale per column j."""
  g = np.asarray(g, np.float64)
  s = np.sqrt(np.mean(g * g, axis=0, keepdims=True))
  return g / np.maximum(s, eps)


def np_row_normalize(g: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  g = np.asarray(g, np.float64)
  s = np.sqrt(np.mean(g * g, axis=1, keepdims=True))
  return g / np.maximum(s, eps)


def is_lm_head(path: str) -> bool:
  return 'lm_head' in path.split('/')


def is_first_or_last(path: str) -> bool:
  parts = path.split('/')
  return 'lm_head' in parts or 'embed' in parts or 'embedding' in parts


class NumpyScale:
  """Algorithm 1 of the SCALE paper in float64 NumPy, on '/'-keyed dicts.

  Per step t = 1, 2, ... with eta_t = lr_fn(t - 1) (the step index before
  the increment, as Optax schedules are evaluated):

  * matrices: M = beta M + (1 - beta) G on momentum leaves (else M = G);
    U = normalize(M);
  * vectors: AdamW with bias correction, learning rate vector_lr_fn(t - 1);
  * every leaf: W <- W (1 - eta wd) - eta U.
  """

  def __init__(self, params: dict[str, np.ndarray],
               lr_fn: Callable[[int], float],
               vector_lr_fn: Optional[Callable[[int], float]] = None,
               weight_decay: float = 0.0,
               beta: Optional[float] = 0.9,
               has_momentum: Callable[[str], bool] = is_lm_head,
               normalization: str = 'column',
               b1: float = 0.9, b2: float = 0.999, adam_eps: float = 1e-8,
               eps: float = 1e-8):
    self.params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    self.lr_fn = lr_fn
    self.vector_lr_fn = vector_lr_fn or lr_fn
    self.wd = weight_decay
    self.beta = beta
    self.has_momentum = has_momentum
    self.normalization = normalization
    self.b1, self.b2, self.adam_eps, self.eps = b1, b2, adam_eps, eps
    self.t = 0
    self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.params.items()}

  def _normalize(self, g):
    if self.normalization == 'column':
      return np_column_normalize(g, self.eps)
    if self.normalization == 'row':
      return np_row_normalize(g, self.eps)
    if self.normalization == 'sign':
      return np.sign(g)
    raise ValueError(self.normalization)

  def updates(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns W_new - W for one step and advances the state."""
    self.t += 1
    t = self.t
    eta = self.lr_fn(t - 1)
    eta_v = self.vector_lr_fn(t - 1)
    out = {}
    for k, w in self.params.items():
      g = np.asarray(grads[k], np.float64)
      if w.ndim >= 2:
        if self.beta is not None and self.has_momentum(k):
          self.m[k] = self.beta * self.m[k] + (1 - self.beta) * g
          g = self.m[k]
        u = self._normalize(g)
        new_w = w * (1 - eta * self.wd) - eta * u
      else:
        self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
        self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
        m_hat = self.m[k] / (1 - self.b1 ** t)
        v_hat = self.v[k] / (1 - self.b2 ** t)
        u = m_hat / (np.sqrt(v_hat) + self.adam_eps)
        new_w = w * (1 - eta_v * self.wd) - eta_v * u
      out[k] = new_w - w
      self.params[k] = new_w
    return out

  def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    self.updates(grads)
    return self.params


def np_warmup_cosine(peak: float, warmup: int, total: int,
                     final_frac: float = 0.1) -> Callable[[int], float]:
  """Linear warmup from 0, cosine decay to final_frac * peak (by formula)."""

  def fn(step: int) -> float:
    if step < warmup:
      return peak * step / warmup
    frac = min((step - warmup) / (total - warmup), 1.0)
    end = final_frac * peak
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))

  return fn
