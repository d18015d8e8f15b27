"""Model FLOPs per token, the peak of known chips, MFU, and a run's speed.

MFU (PaLM, Chowdhery et al. 2022, appendix B) is the throughput of the run in
model FLOPs over the peak of the hardware: the FLOPs a training step needs,
not the ones it executes, so recomputation (``model.remat``) does not count
and a run with remat shows a lower MFU at the same speed.

FLOPs per token of a training step (forward plus backward):

  ``6 N + 6 L T d``

- ``6 N``: 2 FLOPs per weight per token in the forward matmuls, 4 in the
  backward (gradients of activations and of weights). ``N`` counts the weights
  that take part in a matmul: every layer's attention and MLP kernels
  (``L (4 d^2 + 3 d f)``) and the LM head (``d V``). The embedding is a lookup
  (no FLOPs) and the RMSNorm scales are elementwise, so neither is in ``N``.
- ``6 L T d``: attention scores ``Q K^T`` and ``softmax(.) V``. PaLM counts
  ``12 L H Q T`` (``H`` heads of size ``Q``, ``H Q = d``, ``T`` the sequence
  length) for the whole ``T x T`` score matrix; a causal model needs only the
  half at or below the diagonal, so it is halved here (as MaxText does for
  causal attention). At the paper's ``T = 256`` it is 1-3% of the total.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig

# Dense (no sparsity) bf16 peak per device, TFLOP/s, from the vendors' data
# sheets; float16 runs at the same rate on all of them. First match wins, so
# the specific variants (PCIe, NVL) come before the plain name.
_GPU_PEAKS_TFLOPS: tuple[tuple[str, float], ...] = (
    (r'h100.*pcie', 756.0),
    (r'h100.*nvl', 835.0),
    (r'h100', 989.0),    # SXM5 (device kind "NVIDIA H100 80GB HBM3").
    (r'h200.*nvl', 835.0),
    (r'h200', 989.0),    # SXM.
    (r'a100', 312.0),
)
# TPU device kinds as jax reports them (`Device.device_kind`, lower-cased).
_TPU_PEAKS_TFLOPS: dict[str, float] = {
    'tpu v4': 275.0,
    'tpu v5 lite': 197.0,
    'tpu v5e': 197.0,
    'tpu v5': 459.0,     # v5p's older device kind.
    'tpu v5p': 459.0,
    'tpu v6 lite': 918.0,
    'tpu v6e': 918.0,
}
_PEAK_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def matmul_params(model_cfg: ModelConfig) -> int:
  """``N``: the weights used in matmuls (layers and LM head, no embedding)."""
  d, f, v = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size
  return model_cfg.n_layers * (4 * d * d + 3 * d * f) + d * v


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: ``6 N + 6 L T d`` (module docstring).

  Args:
    model_cfg: the model shape.
    seq_len: ``T``, the tokens per sequence the scores are computed over.

  Returns:
    Forward-plus-backward model FLOPs per token, remat not counted.

  References:
    Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways",
    arXiv 2204.02311, appendix B (there ``6N + 12LHQT``, full attention).
  """
  if seq_len <= 0:
    raise ValueError(f'seq_len must be positive, got {seq_len}.')
  attention = 6 * model_cfg.n_layers * seq_len * model_cfg.d_model
  return float(6 * matmul_params(model_cfg) + attention)


def peak_flops_per_device(device: jax.Device, dtype: Any,
                          override_tflops: Optional[float] = None
                          ) -> Optional[float]:
  """Dense peak FLOP/s of one device for matmuls in ``dtype``.

  Args:
    device: a jax device; its ``device_kind`` is looked up in the table of
      known chips (H100 SXM/PCIe/NVL, H200, A100, TPU v4, v5e, v5p, v6e).
    dtype: the compute dtype; the table holds bf16/float16 peaks only.
    override_tflops: the peak in TFLOP/s given by the user
      (``train.peak_tflops``); it wins over the table for any chip and dtype.

  Returns:
    FLOP/s, or None when the chip or the dtype is not in the table (CPUs,
    float32: its rate depends on the TF32 setting) and nothing overrides it.
  """
  if override_tflops is not None:
    if override_tflops <= 0:
      raise ValueError(f'peak TFLOP/s must be positive, got {override_tflops}.')
    return float(override_tflops) * 1e12
  if jnp.dtype(dtype) not in _PEAK_DTYPES:
    return None
  kind = device.device_kind.lower().strip()
  if kind in _TPU_PEAKS_TFLOPS:
    return _TPU_PEAKS_TFLOPS[kind] * 1e12
  if device.platform == 'gpu':
    for pattern, tflops in _GPU_PEAKS_TFLOPS:
      if re.search(pattern, kind):
        return tflops * 1e12
  return None


def mfu(tokens_per_second_per_device: float, flops_per_token: float,
        peak: Optional[float]) -> Optional[float]:
  """Model FLOPs utilization: ``tokens/s/device * FLOPs/token / peak``.

  Returns:
    A fraction (0.4 is 40%), or None when the peak is unknown.
  """
  if peak is None:
    return None
  return tokens_per_second_per_device * flops_per_token / peak


class Throughput:
  """A run's speed: tokens/s (all devices and per device) and MFU.

  The clock starts at the first :meth:`step_done` (the end of the first
  step, which compiles) and stops at each later one; time inside
  :meth:`paused` (evaluation, checkpoints, diagnostics) is left out.

  Args:
    tokens_per_step: tokens of one global batch.
    devices: devices the step runs on.
    flops_per_token: :func:`flops_per_token` of the model.
    peak: :func:`peak_flops_per_device`, or None (no MFU).
    clock: seconds, monotonic (a fake one in tests).
  """

  def __init__(self, tokens_per_step: int, devices: int,
               flops_per_token: float, peak: Optional[float],
               clock: Callable[[], float] = time.perf_counter):
    self.tokens_per_step = tokens_per_step
    self.devices = devices
    self.flops_per_token = flops_per_token
    self.peak = peak
    self._clock = clock
    self._first: Optional[int] = None
    self._t0 = 0.0
    self._paused_s = 0.0
    self.timed_steps, self.elapsed_s = 0, 0.0

  def step_done(self, step: int) -> None:
    """Step ``step`` (and every step before it) has finished."""
    now = self._clock()
    if self._first is None:
      self._first, self._t0, self._paused_s = step, now, 0.0
      return
    self.timed_steps = step - self._first
    self.elapsed_s = now - self._t0 - self._paused_s

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    start = self._clock()
    try:
      yield
    finally:
      self._paused_s += self._clock() - start

  @property
  def step_s(self) -> Optional[float]:
    """Seconds per step, or None before two steps have finished."""
    return self.elapsed_s / self.timed_steps if self.timed_steps else None

  def rates(self) -> dict[str, Optional[float]]:
    """``tokens_per_s`` (all devices), ``tokens_per_s_per_device`` and
    ``mfu``; None where not known yet (or no peak for MFU)."""
    if not self.step_s:
      return {'tokens_per_s': None, 'tokens_per_s_per_device': None,
              'mfu': None}
    tok_s = self.tokens_per_step / self.step_s
    per_device = tok_s / self.devices
    return {'tokens_per_s': tok_s, 'tokens_per_s_per_device': per_device,
            'mfu': mfu(per_device, self.flops_per_token, self.peak)}
