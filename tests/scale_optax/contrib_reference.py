"""NumPy transcriptions of the rivals' released updates, in torch layout.

Written from the released code's order of operations (docs/sources.md),
not from ``scale_optax.contrib``: a weight is ``W [out, in]`` (the Flax kernel
transposed), float64, one state dict per parameter, the step counted per
parameter as the torch optimizers do. Nothing here imports ``scale_optax``.

Projection bases are *given* (``basis(name, G, t)`` is called on refresh
steps only): the SVD sign is arbitrary and APOLLO draws from torch's
generator, so a comparison is only well-posed with the same basis fed to
both sides (the tests check the bases separately, sign-invariantly).
"""

from __future__ import annotations

import math

import numpy as np


def adamw(p, g, st, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
  """transformers' old AdamW: eps before bias correction, decay after."""
  st.setdefault('t', 0)
  st.setdefault('m', np.zeros_like(p))
  st.setdefault('v', np.zeros_like(p))
  st['t'] += 1
  st['m'] = b1 * st['m'] + (1 - b1) * g
  st['v'] = b2 * st['v'] + (1 - b2) * g * g
  t = st['t']
  step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
  p = p - step * st['m'] / (np.sqrt(st['v']) + eps)
  return p - lr * wd * p


def torch_adam(p, g, st, lr, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam: eps after bias correction."""
  st.setdefault('t', 0)
  st.setdefault('m', np.zeros_like(p))
  st.setdefault('v', np.zeros_like(p))
  st['t'] += 1
  st['m'] = b1 * st['m'] + (1 - b1) * g
  st['v'] = b2 * st['v'] + (1 - b2) * g * g
  t = st['t']
  denom = np.sqrt(st['v']) / math.sqrt(1 - b2 ** t) + eps
  return p - lr / (1 - b1 ** t) * st['m'] / denom


def _limit(u, st, key, gamma=1.01):
  """The norm-growth limiter: skipped on the first call, state post-limit."""
  norm = np.linalg.norm(u)
  if key not in st:
    st[key] = norm
    return u
  ratio = norm / (st[key] + 1e-8)
  lim = max(ratio, gamma) / gamma
  st[key] = norm / lim
  return u / lim


def low_rank(method, w, g, st, lr, wd, basis, *, gap, alpha=1.0,
             scale_type='channel', scale_front=False, b1=0.9, b2=0.999,
             eps=1e-6):
  """One step of GaLore / Fira / APOLLO(-Mini) on ``w [m, n]``.

  ``basis(g)`` returns the torch projector: ``[r, n]`` when ``m >= n``
  ("right"), else ``[m, r]`` ("left").
  """
  st.setdefault('t', 0)
  if st['t'] % gap == 0:
    st['P'] = basis(g)
  st['t'] += 1
  t, p = st['t'], st['P']
  m, n = w.shape
  right = m >= n
  r = g @ p.T if right else p.T @ g
  back = (lambda x: x @ p) if right else (lambda x: p @ x)
  st.setdefault('m', np.zeros_like(r))
  st.setdefault('v', np.zeros_like(r))
  st['m'] = b1 * st['m'] + (1 - b1) * r
  st['v'] = b2 * st['v'] + (1 - b2) * r * r
  nrm = st['m'] / (np.sqrt(st['v']) + eps)
  step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
  if method == 'galore':
    u = alpha * back(nrm)
  elif method == 'fira':
    axis = 0 if nrm.shape[0] < nrm.shape[1] else 1
    phi = (np.linalg.norm(nrm, axis=axis, keepdims=True)
           / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
    s = (g - alpha * back(r)) * phi
    u = alpha * back(nrm) + _limit(s, st, 'scaling_grad')
  elif method == 'apollo':
    if scale_type == 'channel':
      axis = 0 if m < n else 1
      phi = (np.linalg.norm(nrm, axis=axis, keepdims=True)
             / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
    else:
      phi = np.linalg.norm(nrm) / (np.linalg.norm(r) + 1e-8)
    u = g * phi
    if scale_front:
      u = _limit(u * math.sqrt(alpha), st, 'scaled_grad')
    else:
      u = _limit(u, st, 'scaled_grad') * math.sqrt(alpha)
  else:
    raise ValueError(method)
  w = w - step * u
  return w - lr * wd * w


def svd_basis(g, rank):
  """The released GaLore projector of ``g [m, n]`` (up to signs)."""
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  return vh[:rank] if g.shape[0] >= g.shape[1] else u[:, :rank]


class StableSpam:
  """The authors' Stable-SPAM (TianjinYellow/StableSPAM), all params."""

  def __init__(self, lr, gamma1=0.85, gamma2=0.99999, theta=0.999,
               t_max=None, eta_min=0.5, gap=1000, b1=0.9, b2=0.999,
               eps=1e-8, wd=0.0):
    self.__dict__.update(locals())
    self.total = 0
    self.state = {}

  def step(self, params, grads):
    self.total += 1
    sc = 1.0
    if self.t_max is not None:
      t_cos = self.t_max + 1
      sc = self.eta_min + (1 - self.eta_min) * (
          1 + math.cos(math.pi * self.total / t_cos)) / 2
    out = {}
    for name, p in params.items():
      g = grads[name].copy()
      p = p * (1 - self.lr * self.wd)
      st = self.state.setdefault(name, dict(
          step=0, m=np.zeros_like(p), v=np.zeros_like(p), mn=0.0, vn=0.0,
          mmax=0.0))
      top = np.max(np.abs(g))
      st['step'] += 1
      k = st['step']
      st['mmax'] = self.theta * st['mmax'] + (1 - self.theta) * top
      thr = st['mmax'] / (1 - self.theta ** k)
      mask = np.abs(g) > thr
      if mask.sum() > 0:
        g[mask] = g[mask] / top * thr
      n = np.linalg.norm(g)
      g1 = self.gamma1 * sc
      st['mn'] = g1 * st['mn'] + (1 - g1) * n
      st['vn'] = self.gamma2 * st['vn'] + (1 - self.gamma2) * n ** 2
      c = (st['mn'] / (1 - g1 ** k)) / (
          math.sqrt(st['vn'] / (1 - self.gamma2 ** k)) + self.eps)
      if n > 0:
        g = g / n * c
      m, v = st['m'], st['v']      # References kept across a reset.
      if self.gap and self.total % self.gap == 0:
        st['m'], st['v'], st['step'] = (np.zeros_like(g), np.zeros_like(g), 1)
      beta1 = self.b1 * sc
      bc1, bc2 = 1 - beta1 ** st['step'], 1 - self.b2 ** st['step']
      m *= beta1
      m += (1 - beta1) * g
      v *= self.b2
      v += (1 - self.b2) * g * g
      denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
      out[name] = p - self.lr / bc1 * m / denom
    return out


def swan_direction(g, ns_steps=10, beta=0.5, eps=1e-8):
  """SWAN's GradNorm (per output row) then GradWhitening, ``g [m, n]``."""
  mu = g.mean(axis=1, keepdims=True)
  s = np.sqrt(((g - mu) ** 2).mean(axis=1, keepdims=True))
  gn = (g - mu) / (s + eps)
  tall = gn.shape[0] > gn.shape[1]
  x = gn.T if tall else gn
  x = x / np.linalg.norm(x)
  y, z, eye = x @ x.T, np.eye(x.shape[0]), np.eye(x.shape[0])
  for _ in range(ns_steps):
    t = 3 * eye - z @ y
    y, z = beta * y @ t, beta * t @ z
  d = z @ x
  return d.T if tall else d
