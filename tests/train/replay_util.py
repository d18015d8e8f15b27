"""An independent replay of a trainer run: what its records must say.

The replay rebuilds the run's global batches from the data pipeline of each
process, initializes the model from the seed, and steps it on one device in
plain JAX (``jax.value_and_grad`` of ``loss_fn``, the named optimizer,
``optax.apply_updates``): none of the trainer's loop, step, state or mesh code
is used. A run of ``python -m train`` on any mesh and any number of processes
must log the replay's losses and gradient norms, and its eval loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

import harness
from train.config import Config, load_config
from train.model import Llama, loss_fn
from train.optim import make_optimizer

Batch = dict[str, np.ndarray]


def cli_config(*overrides: str) -> Config:
  """The config ``python -m train`` builds: configs/tiny.yaml + overrides."""
  return load_config(harness.REPO / 'configs' / 'tiny.yaml', list(overrides))


def process_batches(config: Config, dataset: Any, steps: int,
                    processes: int) -> tuple[list[list[Batch]],
                                             list[list[Batch]]]:
  """Per train step and per eval batch, each process's part, read from that
  process's own pipeline."""
  batch, seq = config.data.batch_size, config.data.seq_len
  iters = [dataset.train_iter(batch, seq, seed=config.train.seed,
                              process_index=p, process_count=processes)
           for p in range(processes)]
  train = [[next(it) for it in iters] for _ in range(steps)]
  evals = [dataset.eval_batches(batch, seq, config.train.eval_tokens,
                                process_index=p, process_count=processes)
           for p in range(processes)]
  return train, [list(parts) for parts in zip(*evals)]


def concat(parts: Sequence[Batch]) -> Batch:
  """The global batch made of the processes' parts."""
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def replay(config: Config, global_batches: Sequence[Batch],
           eval_batches: Sequence[Batch]
           ) -> tuple[list[float], list[float], float]:
  """(train loss per step, gradient norm per step, final eval loss)."""
  model = Llama(config.model,
                rngs=nnx.Rngs(params=jax.random.key(config.train.seed)))
  graphdef, state = nnx.split(model)
  treedef = jax.tree.structure(state)
  params = nnx.to_pure_dict(state)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)

  def loss(p, batch):
    merged = nnx.merge(graphdef, jax.tree.unflatten(treedef,
                                                    jax.tree.leaves(p)))
    return loss_fn(merged, batch)

  @jax.jit
  def step(p, opt_state, batch):
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state, value,
            optax.tree.norm(grads))

  opt_state = tx.init(params)
  losses, norms = [], []
  for batch in global_batches:
    params, opt_state, value, norm = step(params, opt_state, batch)
    losses.append(float(value))
    norms.append(float(norm))
  sums = [jax.jit(loss)(params, b)[1] for b in eval_batches]
  eval_loss = (sum(float(a['loss_sum']) for a in sums)
               / sum(float(a['tokens']) for a in sums))
  return losses, norms, eval_loss


def assert_run_matches_replay(run_dir, config: Config, dataset: Any,
                              processes: int, rtol: float = 1e-4) -> None:
  """The run's train records and final eval record equal the replay's."""
  train, evals = process_batches(config, dataset, config.train.steps,
                                 processes)
  for parts in [*train, *evals]:
    rows = [{r.tobytes() for r in p['inputs']} for p in parts]
    assert all(len(r) == config.data.batch_size // processes for r in rows)
    assert len(set().union(*rows)) == config.data.batch_size, (
        'the processes read overlapping rows')
  losses, norms, eval_loss = replay(config, [concat(p) for p in train],
                                    [concat(p) for p in evals])
  records = harness.records(run_dir, 'train')
  assert [r['step'] for r in records] == list(range(1, len(losses) + 1))
  np.testing.assert_allclose([r['loss'] for r in records], losses, rtol=rtol)
  np.testing.assert_allclose([r['grad_norm'] for r in records], norms,
                             rtol=rtol)
  evaluation = harness.records(run_dir, 'eval')[-1]
  assert evaluation['step'] == config.train.steps
  np.testing.assert_allclose(evaluation['loss'], eval_loss, rtol=rtol)
