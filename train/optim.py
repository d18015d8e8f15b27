"""Optimizers by name, each with the recipe's schedule and gradient clipping.

``make_optimizer(config, total_steps)`` returns the Optax transformation and
its learning-rate schedule. SCALE and its study variants come from
``scale_optax``; the baselines are Optax's own. The schedule is linear warmup
over ``warmup_ratio`` of the steps, then cosine decay to
``min_lr_ratio * learning_rate`` (the GaLore/APOLLO recipe of the paper).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

import scale_optax
from train.config import ConfigError, OptimizerConfig

Builder = Callable[[OptimizerConfig, optax.Schedule, optax.Schedule],
                   optax.GradientTransformation]

# Embedding and LM head, routed to AdamW by Muon (as MaxText's muon_utils).
_MUON_ADAM_PATHS = re.compile(r'(^|/)(embed|lm_head)(/|$)')


def _scale_variant(**kwargs: Any) -> Builder:
  def build(c, lr, vector_lr):
    options = dict(momentum=c.momentum, weight_decay=c.weight_decay,
                   vector_learning_rate=vector_lr, adam_b1=c.b1, adam_b2=c.b2,
                   adam_eps=c.eps)
    return scale_optax.scale(lr, **{**options, **kwargs})
  return build


def _muon_dims(params: Any) -> Any:
  def dims(path, x):
    if x.ndim != 2 or _MUON_ADAM_PATHS.search(scale_optax.path_str(path)):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  return jax.tree_util.tree_map_with_path(dims, params)


def _sgd(momentum: bool) -> Builder:
  def build(c, lr, vector_lr):
    del vector_lr
    return optax.chain(
        optax.add_decayed_weights(c.weight_decay),
        optax.sgd(lr, momentum=c.momentum if momentum else None))
  return build


OPTIMIZERS: dict[str, Builder] = {
    # SCALE and the paper's bottom-up study (scale_optax.scale with flags).
    'scale': _scale_variant(),
    'sgd_column_norm': _scale_variant(momentum=None),
    'sgd_row_norm': _scale_variant(momentum=None, normalization='row'),
    'scale_row_norm': _scale_variant(normalization='row'),
    'scale_sign': _scale_variant(normalization='sign'),
    'scale_first_last': _scale_variant(
        output_layer=scale_optax.FIRST_AND_LAST_LAYERS),
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


def make_schedule(config: OptimizerConfig, total_steps: int,
                  peak: float | None = None) -> optax.Schedule:
  """Linear warmup then cosine decay to ``min_lr_ratio`` of the peak."""
  peak = config.learning_rate if peak is None else peak
  warmup = int(config.warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=peak * config.min_lr_ratio)


def make_optimizer(config: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the named optimizer, clipped, with the recipe's schedule.

  Returns:
    ``(tx, schedule)``: the transformation and the main learning-rate schedule.
    ``vector_learning_rate`` (AdamW's rate for 1-D leaves in SCALE and Muon)
    follows the same schedule with its own peak.
  """
  if config.name not in OPTIMIZERS:
    raise ConfigError(f'optimizer.name: unknown optimizer {config.name!r} '
                      f'(known: {", ".join(sorted(OPTIMIZERS))}).')
  schedule = make_schedule(config, total_steps)
  vector_schedule = make_schedule(config, total_steps,
                                  peak=config.vector_learning_rate)
  tx = OPTIMIZERS[config.name](config, schedule, vector_schedule)
  if config.grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx, schedule
