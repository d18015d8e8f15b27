"""Bad input: each a ValueError, at construction or init, naming the culprit."""

import re

import jax
import pytest

import scale_optax
import scale_test_util as tu

SHAPES = tu.llama_shapes(vocab=16, d=8, d_ff=12, n_layers=1)
MATRIX_PATHS = ['embed/embedding', 'layers/0/attn/q_proj/kernel',
                'layers/0/mlp/down_proj/kernel', 'lm_head/kernel']


@pytest.fixture(scope='module')
def params():
  return tu.make_params(SHAPES)


# ------------------------------------------------ output layer selection ----

@pytest.mark.parametrize('make', [
    lambda: scale_optax.scale(0.1, output_layer='decoder'),
    lambda: scale_optax.output_layer_momentum(output_layer='decoder'),
    lambda: scale_optax.scale(0.1, output_layer=lambda p, x: False),
    # A vector is not an output layer: matching only the final norm is empty.
    lambda: scale_optax.scale(0.1, output_layer='final_norm'),
], ids=['regex', 'momentum_only', 'callable', 'vector_only'])
def test_output_layer_matching_nothing_lists_matrix_paths(params, make):
  tx = make()
  with pytest.raises(ValueError, match='output_layer') as err:
    tx.init(params)
  msg = str(err.value)
  for p in MATRIX_PATHS:
    assert p in msg, (p, msg)
  assert 'final_norm/scale' not in msg.split('matrix parameters are')[-1]


def test_default_output_layer_on_tied_model_raises(params):
  tied = tu.make_params(tu.llama_shapes(16, 8, 12, 1, tied=True))
  with pytest.raises(ValueError, match=r'lm_head.*selects no matrix') as err:
    scale_optax.scale(0.1).init(tied)
  assert 'embed/embedding' in str(err.value)
  # The documented way out: no momentum at all, or name the layer.
  scale_optax.scale(0.1, momentum=None).init(tied)
  scale_optax.scale(0.1, output_layer='embed').init(tied)


def test_output_layer_mask_pytree_with_extra_entry_raises(params):
  mask = jax.tree.map(lambda _: False, params)
  mask['lm_head']['kernel'] = True
  mask['decoder'] = {'kernel': True}
  with pytest.raises(ValueError, match=r"output_layer.*\['decoder/kernel'\]"):
    scale_optax.scale(0.1, output_layer=mask).init(params)


def test_output_layer_mask_pytree_missing_entries_raises(params):
  mask = {'lm_head': {'kernel': True}}
  with pytest.raises(ValueError,
                     match=r"output_layer.*no entry for parameter 'embed/embedding'"):
    scale_optax.scale(0.1, output_layer=mask).init(params)


def test_output_layer_mask_pytree_right_structure_works(params):
  mask = jax.tree.map(lambda _: False, params)
  mask['lm_head']['kernel'] = True
  state = scale_optax.scale(0.1, output_layer=mask).init(params)
  ema = state[0].inner_state.ema
  momentum_leaves = jax.tree.leaves(ema)
  assert len(momentum_leaves) == 1
  assert momentum_leaves[0].shape == SHAPES['lm_head']['kernel']
  # A prefix mask works too.
  prefix = {k: (k == 'lm_head') for k in params}
  state = scale_optax.scale(0.1, output_layer=prefix).init(params)
  assert len(jax.tree.leaves(state[0].inner_state.ema)) == 1


# ------------------------------------------------------ hyperparameters ----

@pytest.mark.parametrize('kwargs, culprit', [
    (dict(learning_rate=-1e-3), 'learning_rate'),
    (dict(learning_rate=1e-3, vector_learning_rate=-1e-3),
     'vector_learning_rate'),
    (dict(learning_rate=1e-3, weight_decay=-0.1), 'weight_decay'),
    (dict(learning_rate=1e-3, eps=0.0), 'eps'),
    (dict(learning_rate=1e-3, momentum=1.0), 'momentum'),
    (dict(learning_rate=1e-3, momentum=-0.1), 'momentum'),
    (dict(learning_rate=1e-3, momentum=1.5), 'momentum'),
    (dict(learning_rate=1e-3, normalization='colum'), 'normalization'),
])
def test_scale_bad_hyperparameter_raises_at_construction(kwargs, culprit):
  with pytest.raises(ValueError, match=re.escape(culprit)) as err:
    scale_optax.scale(**kwargs)
  bad = [v for k, v in kwargs.items() if k == culprit][0]
  assert repr(bad) in str(err.value) or str(bad) in str(err.value)


@pytest.mark.parametrize('momentum', [1.0, -0.5, 2.0])
@pytest.mark.parametrize('make', [
    lambda m: scale_optax.output_layer_momentum(momentum=m),
    lambda m: scale_optax.first_last_momentum(0.1, momentum=m),
], ids=['output_layer_momentum', 'first_last_momentum'])
def test_momentum_out_of_range(make, momentum):
  with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\)'):
    make(momentum)


def test_unknown_normalization_lists_choices():
  with pytest.raises(ValueError,
                     match=r"\['column', 'row', 'sign'\].*'l2'"):
    scale_optax.scale(0.1, normalization='l2')


def test_valid_edge_values_are_accepted(params):
  for tx in (scale_optax.scale(0.0, momentum=0.0),
             scale_optax.column_normalized_sgd(0.1, weight_decay=0.0),
             scale_optax.scale(0.1, normalization='row'),
             scale_optax.scale(0.1, normalization='sign')):
    tx.init(params)
