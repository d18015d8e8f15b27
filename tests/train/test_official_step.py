"""The trainer's SCALE step against the official PyTorch step, in NumPy.

``OfficialScale`` below transcribes the update of the official release
(OptimAI-Lab/Minimalist_LLM_Pretraining, ``mem_eff_pt/pt_scale/
scale_optimizer.py``, its parameter groups from ``mem_eff_pt/utils/
train_utils.py``) and its schedule (``torchrun_main_DDP.py``: a LambdaLR
stepped after each update, warmup then cosine to ``min_lr_ratio``), working
in PyTorch layout (``nn.Linear`` weights ``[out, in]``). It imports nothing
from the project. The trainer's transformation comes from
``train.optim.make_optimizer`` with a llama config's optimizer section.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import mesh as mesh_lib
from train.config import load_config
from train.optim import make_optimizer
from train.state import make_setup

STEPS = 5
TOTAL_STEPS = 20  # warmup 2 steps: rate 0, half, peak, then cosine
TINY = ['model.vocab_size=64', 'model.d_model=16', 'model.n_layers=2',
        'model.n_heads=2', 'model.d_ff=24', 'data.batch_size=2',
        'mesh.fsdp=1', 'model.param_dtype=float32']


def official_lr_lambda(step, warmup, total, min_ratio):
  """The release's LambdaLR factor (one cycle of length ``total``)."""
  if step < warmup:
    return step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class OfficialScale:
  """The official SCALE step on named PyTorch-layout float64 arrays."""

  def __init__(self, params, *, lr, adam_lr, wd, momentum, betas, eps,
               warmup, total, min_ratio):
    self.params = params
    self.max_lr, self.adam_lr, self.wd = lr, adam_lr, wd
    self.momentum, self.betas, self.eps = momentum, betas, eps
    self.schedule = lambda t: lr * official_lr_lambda(t, warmup, total,
                                                      min_ratio)
    self.state = {}
    self.scheduler_steps = 0

  @staticmethod
  def group(name, p):
    # train_utils.build_optimizer: Linear/Embedding weights of modules named
    # attn/mlp/attention/embed_tokens are "main"; other rank >= 2 params
    # (lm_head) "secondary"; rank 1 params "oned".
    if p.ndim >= 2 and any(k in name for k in ('attn', 'mlp', 'embed_tokens')):
      return 'main'
    return 'oned' if p.ndim == 1 else 'secondary'

  def _normalized(self, name, g):
    col_dim = 0 if 'embed_tokens' in name else 1
    s = np.sqrt(np.mean(np.square(g), axis=col_dim, keepdims=True))
    return g / np.maximum(s, 1e-8)

  def step(self, grads):
    lr = self.schedule(self.scheduler_steps)
    for kind in ('main', 'secondary', 'oned'):
      for name, p in self.params.items():
        if self.group(name, p) != kind:
          continue
        g = grads[name]
        if kind == 'main':
          u = self._normalized(name, g)
          self.params[name] = p * (1 - lr * self.wd) - lr * u
        elif kind == 'secondary':
          m = self.state.setdefault(name, {'m': np.zeros_like(g)})
          m['m'] = m['m'] + (1 - self.momentum) * (g - m['m'])  # lerp
          u = self._normalized(name, m['m'])
          self.params[name] = p * (1 - lr * self.wd) - lr * u
        else:
          b1, b2 = self.betas
          a_lr = self.adam_lr / self.max_lr * lr
          st = self.state.setdefault(
              name, {'t': 0, 'm': np.zeros_like(g), 'v': np.zeros_like(g)})
          st['t'] += 1
          st['m'] = st['m'] + (1 - b1) * (g - st['m'])
          st['v'] = st['v'] + (1 - b2) * (g * g - st['v'])
          u = st['m'] / (self.eps + np.sqrt(st['v']))
          scale = (1 - b1 ** st['t']) / (1 - b2 ** st['t']) ** 0.5
          self.params[name] = p * (1 - a_lr * self.wd) - a_lr / scale * u
    self.scheduler_steps += 1


def _torch_name(path):
  """Trainer path -> the official model's name (enough for the groups)."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                  for k in path).replace('embed.embedding', 'embed_tokens')


def _to_torch(name, x):
  """Flax ``Linear`` kernels are ``[in, out]``; the embedding is as torch's."""
  x = np.asarray(x, np.float64)
  return x.T if x.ndim == 2 and 'embed_tokens' not in name else x


def _trainer(overrides):
  config = load_config('configs/llama_60m.yaml', TINY + overrides)
  tx, schedule = make_optimizer(config.optimizer, TOTAL_STEPS)
  setup = make_setup(config, mesh_lib.make_mesh(config.mesh), tx, schedule)
  return config, setup


def _run(overrides):
  config, setup = _trainer(overrides)
  params = setup.init_params(0)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_torch_name(path) for path, _ in flat]
  start = {n: _to_torch(n, x) for n, (_, x) in zip(names, flat)}
  o = config.optimizer
  ref = OfficialScale(
      dict(start), lr=o.learning_rate, adam_lr=o.vector_learning_rate,
      wd=o.weight_decay, momentum=o.momentum, betas=(o.b1, o.b2), eps=o.eps,
      warmup=int(o.warmup_ratio * TOTAL_STEPS), total=TOTAL_STEPS,
      min_ratio=o.min_lr_ratio)
  rng = np.random.default_rng(0)
  target = {n: rng.standard_normal(x.shape) for n, x in start.items()}

  def grads_at(torch_params, t):
    noise = np.random.default_rng(100 + t)
    out = {}
    for n, x in torch_params.items():
      g = (x - target[n]) + noise.standard_normal(x.shape)
      # 1-D gradients of 1e-7: sqrt(v) near eps, where the Adam forms differ.
      out[n] = 1e-7 * g if x.ndim == 1 else g
    return out

  tx = setup.tx
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  for t in range(STEPS):
    current = {n: _to_torch(n, x) for n, x in
               zip(names, jax.tree.leaves(jax.device_get(params)))}
    g = grads_at(current, t)
    grads = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(_to_torch(n, g[n]), jnp.float32)
                  for n in names])
    params, opt_state = step(params, opt_state, grads)
    ref.step(grads_at(ref.params, t))
  got = {n: _to_torch(n, x) for n, x in
         zip(names, jax.tree.leaves(jax.device_get(params)))}
  return start, got, ref.params


def _relative_errors(start, got, want):
  """Per leaf: |moved - official moved| / |official moved| (norms)."""
  return {n: np.linalg.norm((got[n] - start[n]) - (want[n] - start[n]))
          / np.linalg.norm(want[n] - start[n]) for n in want}


@pytest.mark.parametrize('overrides', [[], ['optimizer.weight_decay=0.1']],
                         ids=['llama_60m', 'weight_decay'])
def test_trainer_step_equals_the_official_step(overrides):
  start, got, want = _run(overrides)
  errors = _relative_errors(start, got, want)
  assert len(errors) == 21 and sum('norm' in n for n in errors) == 5
  for name, err in errors.items():
    assert err < 1e-4, (name, err)
    assert np.abs(want[name] - start[name]).max() > 0, name  # moved


def test_the_optax_adam_form_is_not_the_official_step():
  start, got, want = _run(['optimizer.vector_adam=optax'])
  errors = _relative_errors(start, got, want)
  assert all(errors[n] > 1e-2 for n in errors if 'norm' in n)
  assert all(errors[n] < 1e-4 for n in errors if 'norm' not in n)


def test_schedule_facts():
  """Warmup, cosine to 10%, first update at rate 0, 1-D rate scaled."""
  config, setup = _trainer([])
  o = config.optimizer
  for t in range(TOTAL_STEPS + 1):
    want = o.learning_rate * official_lr_lambda(
        t, int(o.warmup_ratio * TOTAL_STEPS), TOTAL_STEPS, o.min_lr_ratio)
    assert float(setup.schedule(t)) == pytest.approx(want, rel=1e-6, abs=0)
  assert float(setup.schedule(0)) == 0.0
  assert float(setup.schedule(TOTAL_STEPS)) == pytest.approx(
      0.1 * o.learning_rate)
