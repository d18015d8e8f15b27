"""The SCALE paper's other rows as Optax transformations.

GaLore, Fira, APOLLO, APOLLO-Mini (Adam in a projected space,
:mod:`~scale_optax.contrib.low_rank`), Stable-SPAM
(:mod:`~scale_optax.contrib.stable_spam`) and SWAN
(:mod:`~scale_optax.contrib.swan`), each following its released code (or, for
SWAN, its paper), built from small shared parts: the released Adam
(:mod:`scale_optax.adam`, with the GaLore family's bias-correction and
weight-decay steps in :mod:`~scale_optax.contrib.adam`), projections
(:mod:`~scale_optax.contrib.projection`) and the norm-growth limiter
(:mod:`~scale_optax.contrib.limiter`).
"""

from scale_optax.contrib.adam import authors_adamw
from scale_optax.contrib.adam import decay_updated_weights
from scale_optax.contrib.adam import scale_by_bias_correction
from scale_optax.contrib.limiter import limit_norm_growth
from scale_optax.contrib.limiter import scale_by_norm_growth_limiter
from scale_optax.contrib.low_rank import apollo
from scale_optax.contrib.low_rank import apollo_mini
from scale_optax.contrib.low_rank import back_projection
from scale_optax.contrib.low_rank import channel_scaling
from scale_optax.contrib.low_rank import fira
from scale_optax.contrib.low_rank import fira_output
from scale_optax.contrib.low_rank import galore
from scale_optax.contrib.low_rank import LOW_RANK_PARAMS
from scale_optax.contrib.low_rank import low_rank_labels
from scale_optax.contrib.low_rank import OutputRule
from scale_optax.contrib.low_rank import partition_low_rank
from scale_optax.contrib.low_rank import ProjectedAdamState
from scale_optax.contrib.low_rank import scale_by_projected_adam
from scale_optax.contrib.low_rank import tensor_scaling
from scale_optax.contrib.stable_spam import scale_by_stable_spam
from scale_optax.contrib.stable_spam import stable_spam
from scale_optax.contrib.stable_spam import StableSpamState
from scale_optax.contrib.swan import scale_by_swan
from scale_optax.contrib.swan import swan

__all__ = (
    'apollo', 'apollo_mini', 'authors_adamw', 'back_projection',
    'channel_scaling', 'decay_updated_weights', 'fira', 'fira_output',
    'galore', 'limit_norm_growth', 'LOW_RANK_PARAMS', 'low_rank_labels',
    'OutputRule', 'partition_low_rank', 'ProjectedAdamState',
    'scale_by_bias_correction', 'scale_by_norm_growth_limiter',
    'scale_by_projected_adam', 'scale_by_stable_spam', 'scale_by_swan',
    'stable_spam', 'StableSpamState', 'swan', 'tensor_scaling',
)
