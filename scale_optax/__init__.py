"""SCALE (arXiv 2506.16659) as composable Optax transformations."""

from scale_optax.adam import authors_adamw
from scale_optax.adam import scale_by_authors_adam
from scale_optax.alias import column_normalized_sgd
from scale_optax.alias import FIRST_AND_LAST_LAYERS
from scale_optax.alias import first_last_momentum
from scale_optax.alias import matrix_or_vector
from scale_optax.alias import scale
from scale_optax.paths import path_str
from scale_optax.state import state_bytes
from scale_optax.transform import column_normalize
from scale_optax.transform import DEFAULT_OUTPUT_LAYER
from scale_optax.transform import DEFAULT_VECTOR_MASK
from scale_optax.transform import fan_in_axes
from scale_optax.transform import mean_square
from scale_optax.transform import output_layer_mask
from scale_optax.transform import output_layer_momentum
from scale_optax.transform import row_normalize
from scale_optax.transform import vector_flags

__version__ = '0.1.0'

__all__ = (
    'authors_adamw',
    'column_normalize',
    'column_normalized_sgd',
    'DEFAULT_OUTPUT_LAYER',
    'DEFAULT_VECTOR_MASK',
    'fan_in_axes',
    'FIRST_AND_LAST_LAYERS',
    'first_last_momentum',
    'matrix_or_vector',
    'mean_square',
    'output_layer_mask',
    'output_layer_momentum',
    'path_str',
    'row_normalize',
    'scale',
    'scale_by_authors_adam',
    'state_bytes',
    'vector_flags',
)
