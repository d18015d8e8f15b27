"""Optimizers by name, each with the recipe's schedule and gradient clipping.

``make_optimizer(config, total_steps)`` returns the Optax transformation and
its learning-rate schedule. SCALE and its study variants come from
``scale_optax``; the baselines are Optax's own. The schedule is linear warmup
over ``warmup_ratio`` of the steps, then cosine decay to
``min_lr_ratio * learning_rate`` (the GaLore/APOLLO recipe of the paper).

Scanned layers (``model.scan_layers``, ``make_optimizer(..., scan_layers=True)``)
stack each block param on a leading layer axis (``layers/attn/q_proj/kernel``
``[L, d, d]``, ``layers/attn_norm/scale`` ``[L, d]``); every optimizer must
still treat each layer's slice as the unrolled model's leaf:

- elementwise optimizers (AdamW, SGD, Lion) need nothing;
- Muon's dimension numbers name the per-layer matrix axes (the layer axis is a
  batch axis, orthogonalized layer by layer);
- SCALE normalizes the stacked kernels over axis 1 (``reduction_axes``), and
  the stacked norm scales, rank 2 now, go to its AdamW (``vector_mask``); the
  row-normalized ablations (whose norm would run over the layer axis) refuse;
- GaLore, Fira, APOLLO and APOLLO-Mini take a stack of kernels as separate
  matrices (one projection each); their other leaves get an elementwise AdamW;
- any other optimizer (Adafactor: factored moments and per-leaf RMS clipping;
  Stable-SPAM: per-leaf statistics; SWAN: its norm scales are vectors per
  layer) runs on the stacked leaves under ``jax.vmap`` over the layer axis,
  its step counters shared by every layer (``per_layer``).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import scale_optax
from scale_optax import contrib
from .config import ConfigError, OptimizerConfig
from .model import layer_axes
from .rivals_config import RivalsConfig

Builder = Callable[[OptimizerConfig, optax.Schedule, optax.Schedule],
                   optax.GradientTransformation]

# Embedding and LM head, routed to AdamW by Muon (as MaxText's muon_utils).
_MUON_ADAM_PATHS = re.compile(r'(^|/)(embed|lm_head)(/|$)')


def stacked_layers(path: Any) -> int:
  """Leading layer axes of the leaf at ``path`` (a key path or its string)."""
  return layer_axes(path if isinstance(path, str)
                    else scale_optax.path_str(path))


def _stacked_fan_in(path: str, leaf: Any) -> Any:
  """SCALE's fan-in axis of a stacked ``[L, in, out]`` kernel; None (the
  default: axis 0 of a rank-2 leaf) elsewhere."""
  return (1,) if stacked_layers(path) and leaf.ndim == 3 else None


def _stacked_vector(path: str, leaf: Any) -> bool:
  """A stacked norm scale ``[L, d]``: a vector of each layer, for SCALE."""
  return bool(stacked_layers(path)) and leaf.ndim == 2


def _scale_variant(**kwargs: Any) -> Callable[..., optax.GradientTransformation]:
  def build(c, lr, vector_lr, scan_layers=False):
    options = {**dict(momentum=c.momentum, weight_decay=c.weight_decay,
                      vector_learning_rate=vector_lr, adam_b1=c.b1,
                      adam_b2=c.b2, adam_eps=c.eps,
                      vector_adam=c.vector_adam), **kwargs}
    if not scan_layers:
      return scale_optax.scale(lr, **options)
    if options.get('normalization') == 'row':
      raise ConfigError(
          f'optimizer.name: {c.name!r} normalizes over the output axes, which '
          f'would mix the stacked layers of model.scan_layers=true; use '
          f'model.scan_layers=false.')
    return scale_optax.scale(lr, reduction_axes=_stacked_fan_in,
                             vector_mask=_stacked_vector, **options)
  return build


def _muon_dims(params: Any) -> Any:
  def dims(path, x):
    lead = stacked_layers(path)
    if (x.ndim - lead != 2
        or _MUON_ADAM_PATHS.search(scale_optax.path_str(path))):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=lead,
                                              output_axis=lead + 1)
  return jax.tree_util.tree_map_with_path(dims, params)


def _state_axes(state: Any) -> Any:
  """vmap axes of a per-layer optimizer state (arrays or shapes): None (one
  value for every layer) for integer leaves (step counters, PRNG keys), 0
  elsewhere."""
  return jax.tree.map(
      lambda s: None if jnp.issubdtype(s.dtype, jnp.integer) else 0, state)


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` applied to each layer's slice of stacked leaves.

  ``jax.vmap`` over axis 0 of params, updates and the float state; integer
  state (step counters, raw ``uint32`` PRNG keys) is one value for all
  layers, so a ``lax.cond`` on the step stays a branch (batched, it would
  become a ``select`` that runs both branches, e.g. GaLore's SVD, on every
  step). Integer state that came to depend on a layer's data would be
  refused by ``jax.vmap`` (a mapped output where ``out_axes`` is None).

  A random draw would be the same for every layer (one key, one leaf index),
  where unrolled each layer's leaf draws its own: the optimizers with random
  state (APOLLO) take the stacked leaves directly instead.
  """

  def init_fn(params):
    if not any(hasattr(x, 'shape') for x in jax.tree.leaves(params)):
      # optax.tree_map_params inits on a placeholder for the state's
      # structure, which vmap leaves unchanged.
      return tx.init(params)
    one_layer = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    axes = _state_axes(jax.eval_shape(tx.init, one_layer))
    return jax.vmap(tx.init, out_axes=axes)(params)

  def update_fn(updates, state, params=None):
    axes = _state_axes(state)
    return jax.vmap(tx.update, in_axes=(0, axes, 0),
                    out_axes=(0, axes))(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _stacked_per_layer(build: Callable[[], optax.GradientTransformation]
                       ) -> optax.GradientTransformation:
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: 'stacked' if stacked_layers(p) else 'other', params)
  return optax.partition({'stacked': per_layer(build()), 'other': build()},
                         labels)


def _sgd(momentum: bool) -> Builder:
  def build(c, lr, vector_lr):
    del vector_lr
    return optax.chain(
        optax.add_decayed_weights(c.weight_decay),
        optax.sgd(lr, momentum=c.momentum if momentum else None))
  return build


# SCALE and the paper's bottom-up study (scale_optax.scale with flags); their
# builders take scan_layers.
SCALE_VARIANTS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'scale': _scale_variant(),
    'sgd_column_norm': _scale_variant(momentum=None),
    'sgd_row_norm': _scale_variant(momentum=None, normalization='row'),
    'scale_row_norm': _scale_variant(normalization='row'),
    'scale_sign': _scale_variant(normalization='sign'),
    'scale_first_last': _scale_variant(
        output_layer=scale_optax.FIRST_AND_LAST_LAYERS),
}
# Right on stacked layer leaves as they are: elementwise, Muon's dimension
# numbers (which see the layer axis), or the low-rank rivals, which take a
# stack of kernels as separate matrices (scale_optax.contrib.low_rank: one
# projection, basis and limiter norm per matrix, each layer's random basis
# its own draw) and give the stacked norm scales an elementwise AdamW.
LAYOUT_FREE = frozenset({'adamw', 'sgd', 'sgd_momentum', 'muon', 'lion',
                         'galore', 'fira', 'apollo', 'apollo_mini'})

OPTIMIZERS: dict[str, Builder] = {
    **SCALE_VARIANTS,
    # Baselines from Optax.
    'adamw': lambda c, lr, vlr: optax.adamw(
        lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
    'sgd': _sgd(momentum=False),
    'sgd_momentum': _sgd(momentum=True),
    'muon': lambda c, lr, vlr: optax.contrib.muon(
        lr, beta=c.momentum, weight_decay=c.weight_decay,
        adam_b1=c.b1, adam_b2=c.b2, adam_weight_decay=c.weight_decay,
        adam_learning_rate=vlr, muon_weight_dimension_numbers=_muon_dims),
    'adafactor': lambda c, lr, vlr: optax.adafactor(
        lr, weight_decay_rate=c.weight_decay or None),
    'lion': lambda c, lr, vlr: optax.lion(
        lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay),
}


# ---- The paper's other rows (scale_optax.contrib), set by config.rivals ----
# Each takes (optimizer config, the method's block of config.rivals, schedule,
# vector schedule, total steps). The released eps of each method is used,
# not optimizer.eps; the GaLore family trains every parameter at one rate.
RivalBuilder = Callable[[OptimizerConfig, Any, optax.Schedule, optax.Schedule,
                         int], optax.GradientTransformation]



def _rescaled(schedule: optax.Schedule, peak: float,
              new_peak: float | None) -> optax.Schedule:
  """``schedule`` with its peak moved to ``new_peak`` (None: unchanged)."""
  if new_peak is None:
    return schedule
  return lambda count: schedule(count) * (new_peak / peak)


RIVALS: dict[str, RivalBuilder] = {
    'galore': lambda c, r, lr, vlr, steps: contrib.galore(
        lr, rank=r.rank, update_gap=r.update_gap, scale=r.scale, b1=c.b1,
        b2=c.b2, weight_decay=c.weight_decay),
    'fira': lambda c, r, lr, vlr, steps: contrib.fira(
        lr, rank=r.rank, update_gap=r.update_gap, alpha=r.scale, b1=c.b1,
        b2=c.b2, weight_decay=c.weight_decay),
    'apollo': lambda c, r, lr, vlr, steps: contrib.apollo(
        lr, rank=r.rank, update_gap=r.update_gap, scale=r.scale,
        scale_front=r.scale_front, seed=r.seed, b1=c.b1, b2=c.b2,
        weight_decay=c.weight_decay),
    'apollo_mini': lambda c, r, lr, vlr, steps: contrib.apollo_mini(
        lr, rank=r.rank, update_gap=r.update_gap, scale=r.scale,
        scale_front=r.scale_front, seed=r.seed, b1=c.b1, b2=c.b2,
        weight_decay=c.weight_decay),
    'stable_spam': lambda c, r, lr, vlr, steps: contrib.stable_spam(
        lr, gamma1=r.gamma1, gamma2=r.gamma2, theta=r.theta,
        t_max=r.t_max or steps, eta_min=r.eta_min,
        reset_interval=r.reset_interval, b1=c.b1, b2=c.b2,
        weight_decay=c.weight_decay),
    'swan': lambda c, r, lr, vlr, steps: contrib.swan(
        lr, adam_learning_rate=_rescaled(lr, c.learning_rate,
                                         r.adam_learning_rate),
        ns_steps=r.ns_steps, beta=r.beta, adam_b1=c.b1, adam_b2=c.b2),
}
# ---- end of the paper's other rows ----

KNOWN = tuple(sorted([*OPTIMIZERS, *RIVALS]))


def make_schedule(config: OptimizerConfig, total_steps: int,
                  peak: float | None = None) -> optax.Schedule:
  """Linear warmup then cosine decay to ``min_lr_ratio`` of the peak."""
  peak = config.learning_rate if peak is None else peak
  warmup = int(config.warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=peak * config.min_lr_ratio)


def make_optimizer(config: OptimizerConfig, total_steps: int,
                   rivals: RivalsConfig | None = None,
                   scan_layers: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the named optimizer, clipped, with the recipe's schedule.

  Args:
    config: the optimizer section.
    total_steps: the schedule's length.
    rivals: ``config.rivals`` (None: the defaults, the 60M settings); sets
      the method when ``config.name`` is one of :data:`RIVALS`.
    scan_layers: the params have the scanned layout (``model.scan_layers``):
      each optimizer then treats every layer's slice of the stacked leaves as
      its own leaf (module docstring).

  Returns:
    ``(tx, schedule)``: the transformation and the main learning-rate schedule.
    ``vector_learning_rate`` (AdamW's rate for 1-D leaves in SCALE and Muon)
    follows the same schedule with its own peak.
  """
  if config.name not in KNOWN:
    raise ConfigError(f'optimizer.name: unknown optimizer {config.name!r} '
                      f'(known: {", ".join(KNOWN)}).')
  schedule = make_schedule(config, total_steps)
  vector_schedule = make_schedule(config, total_steps,
                                  peak=config.vector_learning_rate)
  if config.name in RIVALS:
    block = getattr(rivals or RivalsConfig(), config.name)
    build = lambda: RIVALS[config.name](config, block, schedule,
                                        vector_schedule, total_steps)
  else:
    build = lambda: OPTIMIZERS[config.name](config, schedule, vector_schedule)
  if not scan_layers or config.name in LAYOUT_FREE:
    tx = build()
  elif config.name in SCALE_VARIANTS:
    tx = SCALE_VARIANTS[config.name](config, schedule, vector_schedule,
                                     scan_layers=True)
  else:
    tx = _stacked_per_layer(build)
  if config.grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx, schedule
