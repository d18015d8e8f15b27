"""Running a ``GradientTransformation`` in-process, as the optimizer tests do."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import optax


def apply_steps(tx: optax.GradientTransformation, params: Any,
                grads: Sequence[Any], state: Optional[optax.OptState] = None
                ) -> tuple[Any, optax.OptState]:
  """``tx``'s jitted update applied once per gradient tree in ``grads``,
  from ``state`` (``tx.init(params)`` if None): the last params and state."""
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state
