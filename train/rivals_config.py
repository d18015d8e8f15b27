"""Settings of the paper's other rows: GaLore, Fira, APOLLO(-Mini), Stable-SPAM, SWAN.

The ``rivals`` section of a config holds one block per method; the block of
the method named by ``optimizer.name`` is used, the others are ignored.
Each block's ``learning_rate`` is that method's published peak rate:
:func:`train.config.load_config` puts it in ``optimizer.learning_rate`` when
the method is selected, unless an override sets ``optimizer.learning_rate``
(so ``optimizer.name=apollo`` is the published run, and
``optimizer.name=apollo optimizer.learning_rate=3e-3`` a different rate). The
schedule, warmup, steps and clipping stay those of the ``optimizer`` and
``train`` sections. The defaults are the authors' LLaMA-60M settings
(docs/sources.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """GaLore and Fira: an SVD projection of each attention/MLP kernel.

  ``scale`` is GaLore's ``--galore_scale`` and Fira's ``--alpha``.
  """
  learning_rate: Optional[float] = 0.01
  rank: int = 128
  update_gap: int = 200
  scale: float = 0.25


@dataclasses.dataclass(frozen=True)
class RandomProjectionConfig:
  """APOLLO and APOLLO-Mini: a Gaussian projection redrawn every gap steps.

  The update is multiplied by ``sqrt(scale)``, before the norm-growth limiter
  when ``scale_front``. ``seed`` seeds the projection key.
  """
  learning_rate: Optional[float] = 0.01
  rank: int = 128
  update_gap: int = 200
  scale: float = 1.0
  scale_front: bool = False
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class StableSpamConfig:
  """Stable-SPAM; ``t_max`` null: the run's ``train.steps``."""
  learning_rate: Optional[float] = 8e-4
  gamma1: float = 0.85
  gamma2: float = 0.99999
  theta: float = 0.999
  t_max: Optional[int] = None
  eta_min: float = 0.5
  reset_interval: int = 1000


@dataclasses.dataclass(frozen=True)
class SwanConfig:
  """SWAN; its paper publishes no rates (1e-3 for both is a guess).

  ``adam_learning_rate`` is the peak of the Adam on embeddings, LM head and
  norms (null: the same as the kernels'), on the same schedule.
  """
  learning_rate: Optional[float] = 1e-3
  adam_learning_rate: Optional[float] = None
  ns_steps: int = 10
  beta: float = 0.5


@dataclasses.dataclass(frozen=True)
class RivalsConfig:
  """One block per method, named as in ``optimizer.name``."""
  galore: ProjectionConfig = ProjectionConfig()
  fira: ProjectionConfig = ProjectionConfig()
  apollo: RandomProjectionConfig = RandomProjectionConfig()
  apollo_mini: RandomProjectionConfig = RandomProjectionConfig(
      rank=1, scale=128.0, scale_front=True)
  stable_spam: StableSpamConfig = StableSpamConfig()
  swan: SwanConfig = SwanConfig()


NAMES = tuple(f.name for f in dataclasses.fields(RivalsConfig))


def published_rate(values: dict[str, Any]) -> Optional[float]:
  """The selected method's ``learning_rate`` from raw config ``values``.

  None when ``optimizer.name`` is not one of :data:`NAMES` or its rate is
  null; a block without the key gives the default's.
  """
  name = (values.get('optimizer') or {}).get('name')
  if name not in NAMES:
    return None
  section = values.get('rivals')
  block = section.get(name) if isinstance(section, dict) else None
  default = getattr(RivalsConfig(), name).learning_rate
  if isinstance(block, dict):
    return block.get('learning_rate', default)
  return default


def problems(rivals: RivalsConfig) -> Iterator[tuple[str, str]]:
  """``(key, message)`` for each out-of-range value."""
  for name in NAMES:
    block = getattr(rivals, name)
    for field in dataclasses.fields(block):
      value, key = getattr(block, field.name), f'rivals.{name}.{field.name}'
      if (field.name in ('learning_rate', 'adam_learning_rate')
          and value is not None and value <= 0):
        yield key, f'must be positive or null, got {value}.'
      if field.name in ('rank', 'update_gap', 'ns_steps') and value < 1:
        yield key, f'must be >= 1, got {value}.'
      if field.name in ('scale', 'beta') and value <= 0:
        yield key, f'must be positive, got {value}.'
      if field.name in ('gamma1', 'gamma2', 'theta') and not 0 <= value < 1:
        yield key, f'must be in [0, 1), got {value}.'
      if field.name == 'eta_min' and not 0 <= value <= 1:
        yield key, f'must be in [0, 1], got {value}.'
      if field.name == 'reset_interval' and value < 0:
        yield key, f'must be >= 0 (0: never), got {value}.'
      if field.name == 't_max' and value is not None and value < 1:
        yield key, f'must be >= 1 or null, got {value}.'
