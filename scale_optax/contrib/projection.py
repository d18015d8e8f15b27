"""Low-rank projection of a Flax kernel's gradient, GaLore-style.

A Dense kernel is ``K = W^T`` with shape ``[in, out]`` (leading axes, e.g. a
stack of layers, are batch axes: one projection per matrix) (torch's weight ``W`` is
``[out, in]``). The released GaLore, Fira and APOLLO compress the smaller axis
of ``W`` and, on a tie, its input axis. In Flax layout:

* ``out >= in``: the input axis (0) is compressed: ``R = Q^T G`` (``[r, out]``),
  back-projection ``X -> Q X``;
* ``out < in``: the output axis (1) is compressed: ``R = G Q`` (``[in, r]``),
  back-projection ``X -> X Q^T``;

with a basis ``Q`` of shape ``[size of the compressed axis, r]``. For a LLaMA
that is always the ``d_model`` axis (q/k/v/o, gate/up: their input; down: its
output). A port that compresses "the smaller of ``shape[0], shape[1]``" of the
Flax kernel with ``>=`` compresses the output axis of square matrices: wrong on
every attention matrix.

``Q`` comes from the SVD of the current gradient (GaLore, Fira: the leading
left singular vectors along the compressed axis, truncated to that axis's
size) or from a Gaussian draw scaled by ``1/sqrt(r)`` (APOLLO, never
truncated).

References:
  Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024;
  Zhu et al., `APOLLO <https://arxiv.org/abs/2412.05270>`_, 2025.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compressed_axis(shape: tuple[int, ...]) -> int:
  """The compressed axis of a ``[..., in, out]`` kernel: 0 (``in``) if
  ``out >= in``, else 1 (``out``), counted within the last two axes."""
  if len(shape) < 2:
    raise ValueError(f'low-rank projection needs a kernel of rank >= 2, got '
                     f'shape {tuple(shape)}.')
  return 0 if shape[-1] >= shape[-2] else 1


def basis_shape(shape: tuple[int, ...], rank: int, truncate: bool
                ) -> tuple[int, ...]:
  """Shape of ``Q``: ``[..., size of the compressed axis, r]``.

  Leading axes (a stack of layers' kernels) are kept: one basis per matrix.
  ``truncate``: the SVD bases have at most ``min(in, out)`` columns.
  """
  matrix = shape[-2:]
  r = min(rank, min(matrix)) if truncate else rank
  return (*shape[:-2], matrix[compressed_axis(shape)], r)


def projected_shape(shape: tuple[int, ...], rank: int, truncate: bool
                    ) -> tuple[int, ...]:
  """Shape of ``R``: the compressed axis replaced by the rank."""
  r = basis_shape(shape, rank, truncate)[-1]
  if compressed_axis(shape) == 0:
    return (*shape[:-2], r, shape[-1])
  return (*shape[:-2], shape[-2], r)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def project(g: jax.Array, basis: jax.Array) -> jax.Array:
  """``R``: ``Q^T G`` (axis 0 compressed) or ``G Q`` (axis 1)."""
  if compressed_axis(g.shape) == 0:
    return _t(basis) @ g
  return g @ basis


def project_back(x: jax.Array, basis: jax.Array, axis: int) -> jax.Array:
  """From the projected shape back to the kernel's: ``Q X`` (``axis`` 0) or
  ``X Q^T`` (``axis`` 1), ``axis`` the kernel's compressed axis."""
  return basis @ x if axis == 0 else x @ _t(basis)


def svd_basis(g: jax.Array, rank: int) -> jax.Array:
  """The leading singular vectors of ``g`` along its compressed axis.

  Computed in float32 and cast back to ``g.dtype``, as the released code does.
  Torch's right projector ``Vh[:r]`` of ``W`` is ``Q^T`` here; its left
  projector ``U[:, :r]`` is ``Q``.
  """
  a = g.astype(jnp.float32)
  if compressed_axis(g.shape) == 1:
    a = _t(a)
  u, _, _ = jnp.linalg.svd(a, full_matrices=False)
  return u[..., :rank].astype(g.dtype)


def random_basis(key: jax.Array, shape: tuple[int, ...], rank: int,
                 dtype: jnp.dtype) -> jax.Array:
  """A Gaussian ``Q`` with entries of variance ``1/r``, drawn in float32."""
  q = jax.random.normal(key, basis_shape(shape, rank, truncate=False),
                        jnp.float32) / jnp.sqrt(rank)
  return q.astype(dtype)
