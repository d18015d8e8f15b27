"""LLaMA decoder in Flax NNX, with logical sharding annotations on every param.

The model: token embedding, ``n_layers`` pre-norm blocks (RMSNorm, causal
multi-head attention with rotary position embeddings, RMSNorm, SwiGLU MLP),
a final RMSNorm and an untied LM head. No biases, no dropout.

Parameters (a 2-layer model; ``V`` vocab, ``d`` d_model, ``f`` d_ff)::

  embed/embedding                 [V, d]   ('vocab', 'embed')
  layers/<i>/attn_norm/scale      [d]      ('norm',)
  layers/<i>/attn/q_proj/kernel   [d, d]   ('embed', 'heads')
  layers/<i>/attn/k_proj/kernel   [d, d]   ('embed', 'heads')
  layers/<i>/attn/v_proj/kernel   [d, d]   ('embed', 'heads')
  layers/<i>/attn/o_proj/kernel   [d, d]   ('heads', 'embed')
  layers/<i>/mlp_norm/scale       [d]      ('norm',)
  layers/<i>/mlp/gate_proj/kernel [d, f]   ('embed', 'mlp')
  layers/<i>/mlp/up_proj/kernel   [d, f]   ('embed', 'mlp')
  layers/<i>/mlp/down_proj/kernel [f, d]   ('mlp', 'embed')
  final_norm/scale                [d]      ('norm',)
  lm_head/kernel                  [d, V]   ('embed', 'vocab')

``nnx.state(model)`` paths are tuples such as ``('layers', 0, 'attn', 'q_proj',
'kernel')`` (the layer index is an ``int``; ``nnx.List`` gives it that way).
Every matrix is a 2-D ``[in, out]`` kernel on purpose: SCALE normalizes 2-D
leaves over axis 0 (one scale per output column), so heads are not split into
a separate kernel axis.

Scanned layers (``model.scan_layers``): the blocks' params are stacked on a
leading layer axis, ``layers/attn/q_proj/kernel [L, d, d]`` (logical names
``('layers', 'embed', 'heads')``; ``'layers'`` maps to no mesh axis), and the
blocks run as one ``nnx.scan``, so the compiled program holds one block
whatever the depth. :func:`stack_layers` and :func:`unstack_layers` convert
params between the two layouts. An optimizer sees rank-3 kernels and rank-2
norm scales there (``train.optim`` handles them per layer).

Numerics: ``config.param_dtype`` is the storage dtype, ``config.dtype`` the
compute dtype (matmul inputs and the residual stream). RMSNorm, rotary
embeddings, attention logits and softmax (``jax.nn.dot_product_attention``'s
XLA path computes them in float32) and the LM head's accumulation are float32;
logits come back float32. ``config.attention`` picks the attention kernel
(:func:`attention_implementation`): cuDNN's fused kernel on a GPU in
bf16/fp16, XLA's otherwise. Rotary embeddings use the half-split ("rotate_half",
GPT-NeoX / Hugging Face LLaMA) layout: feature ``j`` pairs with ``j + H/2``.

Sharding
--------
Each param is created through ``nnx.with_partitioning(init, names)`` with the
logical names of the table above, so where it lives is decided by the
logical-axis rules in context (``nnx.logical_axis_rules``; the trainer's are
``mesh.rules``, entered in ``train/state.py``), not by the model.
``Llama(..., eager_sharding=None)`` (the default) creates params already
sharded only when flax shards variables eagerly by default, a mesh is set
(``jax.set_mesh``) and rules are active: flax refuses to create a sharded
variable with no mesh, and the model must also run on one CPU with no context
at all. ``eager_sharding=True/False`` forces either behaviour. No activation
sharding constraints are applied: the batch arrives sharded and XLA
propagates from there.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as core_spmd

from .config import ConfigError, ModelConfig

# Logical axis names used in the annotations.
VOCAB, EMBED, HEADS, MLP_AXIS, NORM = 'vocab', 'embed', 'heads', 'mlp', 'norm'
LAYERS = 'layers'  # The stacked layer axis of scanned blocks (not sharded).

_FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MIN_COMPUTE_CAPABILITY = 8.0  # cuDNN's fused attention: Ampere on.


def _cudnn_problem(dtype: Any, device: jax.Device) -> Optional[str]:
  """Why cuDNN's fused attention cannot run here, or None when it can."""
  if device.platform != 'gpu':
    return f"it needs a GPU, and this run's devices are {device.platform}"
  capability = float(getattr(device, 'compute_capability', 0) or 0)
  if capability < _CUDNN_MIN_COMPUTE_CAPABILITY:
    return (f'it needs a GPU of compute capability >= '
            f'{_CUDNN_MIN_COMPUTE_CAPABILITY}, and {device.device_kind} has '
            f'{capability}')
  if jnp.dtype(dtype) not in _FUSED_DTYPES:
    return f'it needs model.dtype bfloat16 or float16, got {jnp.dtype(dtype)}'
  return None


def attention_implementation(config: ModelConfig,
                             device: Optional[jax.Device] = None) -> str:
  """``config.attention`` resolved for ``device`` (default: the first device).

  ``auto`` is ``cudnn`` where cuDNN's fused kernel runs (a GPU of compute
  capability 8.0 or more, compute dtype bfloat16 or float16), else ``xla``.

  Raises:
    ConfigError: naming ``model.attention`` when ``cudnn`` was asked for where
      it cannot run.
  """
  device = jax.devices()[0] if device is None else device
  problem = _cudnn_problem(config.dtype, device)
  if config.attention == 'auto':
    return 'xla' if problem else 'cudnn'
  if config.attention == 'cudnn' and problem:
    raise ConfigError(f"model.attention: 'cudnn' is not available: {problem}; "
                      f"use 'auto' or 'xla'.")
  return config.attention


def _auto_eager_sharding() -> bool:
  """Eager sharding only when flax wants it and a mesh and rules are set."""
  return (nnx.using_eager_sharding()
          and not jax.sharding.get_abstract_mesh().empty
          and bool(core_spmd.get_logical_axis_rules()))


def _annotated(init, names: tuple[str, ...], eager: bool):
  return nnx.with_partitioning(init, names, eager_sharding=eager)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, half-split layout, computed in float32.

  Args:
    x: ``[..., T, N, H]`` (sequence, heads, head size; ``H`` even).
    positions: integer or float positions broadcastable to ``x.shape[:-2]``,
      e.g. ``[T]`` or ``[B, T]``.
    theta: the base (``rope_theta``).

  Returns:
    ``x`` rotated: for ``j < H/2`` the pair ``(x[j], x[j + H/2])`` is rotated by
    the angle ``p * theta ** (-2j / H)``; same shape and dtype as ``x``.
  """
  head = x.shape[-1]
  if head % 2:
    raise ValueError(f'rope needs an even head size, got {head}.')
  half = head // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..,T,h]
  angle = angle[..., None, :]  # [..., T, 1, half]: broadcast over heads.
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32; ``scale`` [d] initialized to ones."""

  def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any,
               eager_sharding: bool):
    init = _annotated(nnx.initializers.ones, (NORM,), eager_sharding)
    self.scale = nnx.Param(init(None, (dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, names: tuple[str, str],
            eager: bool, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=False,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=_annotated(nnx.initializers.normal(cfg.init_std), names,
                             eager),
      rngs=rngs, **kwargs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings."""

  def __init__(self, cfg: ModelConfig, *, eager_sharding: bool,
               implementation: str, rngs: nnx.Rngs):
    d = cfg.d_model
    self.implementation = implementation
    self.n_heads = cfg.n_heads
    self.head_dim = d // cfg.n_heads
    self.rope_theta = cfg.rope_theta
    self.q_proj = _linear(cfg, d, d, (EMBED, HEADS), eager_sharding, rngs)
    self.k_proj = _linear(cfg, d, d, (EMBED, HEADS), eager_sharding, rngs)
    self.v_proj = _linear(cfg, d, d, (EMBED, HEADS), eager_sharding, rngs)
    self.o_proj = _linear(cfg, d, d, (HEADS, EMBED), eager_sharding, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: Optional[jax.Array]) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.n_heads, self.head_dim)
    q = rope(split(self.q_proj(x)), positions, self.rope_theta)
    k = rope(split(self.k_proj(x)), positions, self.rope_theta)
    v = split(self.v_proj(x))
    # XLA: logits and softmax in float32 for bf16 inputs. cuDNN: fused.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                       implementation=self.implementation)
    return self.o_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: ModelConfig, *, eager_sharding: bool,
               rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    eager = eager_sharding
    self.gate_proj = _linear(cfg, d, f, (EMBED, MLP_AXIS), eager, rngs)
    self.up_proj = _linear(cfg, d, f, (EMBED, MLP_AXIS), eager, rngs)
    self.down_proj = _linear(cfg, f, d, (MLP_AXIS, EMBED), eager, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, *, eager_sharding: bool,
               attention: str, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                           dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype),
                           eager_sharding=eager_sharding)
    self.attn_norm = norm()
    self.attn = Attention(cfg, eager_sharding=eager_sharding,
                          implementation=attention, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, eager_sharding=eager_sharding, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: Optional[jax.Array]) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """LLaMA decoder: ``tokens [B, T] int -> logits [B, T, V] float32``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
               eager_sharding: Optional[bool] = None):
    """Builds the model.

    Args:
      config: the model shape and dtypes.
      rngs: ``rngs.params()`` seeds the initializers.
      eager_sharding: create params already sharded per their annotations.
        ``None`` (default): only if flax's default says so and both a mesh
        (``jax.set_mesh``) and ``nnx.logical_axis_rules`` are active.
    """
    if config.d_model % config.n_heads:
      raise ValueError(f'n_heads={config.n_heads} must divide '
                       f'd_model={config.d_model}.')
    if (config.d_model // config.n_heads) % 2:
      raise ValueError('head size d_model/n_heads must be even for rotary '
                       'embeddings.')
    eager = _auto_eager_sharding() if eager_sharding is None else eager_sharding
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, param_dtype=param_dtype,
        embedding_init=_annotated(nnx.initializers.normal(config.init_std),
                                  (VOCAB, EMBED), eager),
        rngs=rngs)
    attention = attention_implementation(config)
    if config.scan_layers:
      self.layers = _stacked_blocks(config, eager, attention, rngs)
    else:
      self.layers = nnx.List([
          Block(config, eager_sharding=eager, attention=attention, rngs=rngs)
          for _ in range(config.n_layers)
      ])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps,
                              dtype=dtype, param_dtype=param_dtype,
                              eager_sharding=eager)
    # bf16 x bf16 -> float32 accumulation and output for the logits.
    self.lm_head = _linear(config, config.d_model, config.vocab_size,
                           (EMBED, VOCAB), eager, rngs,
                           preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, *,
               positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Logits for every position.

    Args:
      tokens: int ``[B, T]``, ``T <= max_seq_len``.
      positions: optional int ``[B, T]`` (or ``[T]``) rotary positions;
        default ``arange(T)``. Packed sequences restart them per segment.
      segment_ids: optional int ``[B, T]``; attention stays within equal ids
        (packed sequences), on top of the causal mask.

    Returns:
      float32 ``[B, T, vocab_size]``.
    """
    cfg = self.config
    _, t = tokens.shape
    if t > cfg.max_seq_len:
      raise ValueError(f'sequence length {t} exceeds max_seq_len='
                       f'{cfg.max_seq_len}.')
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    x = self.embed(tokens).astype(jnp.dtype(cfg.dtype))

    def run_block(block, x):
      return block(x, positions, mask)

    if cfg.remat:  # Keep only block inputs; recompute the rest in backward.
      run_block = nnx.remat(run_block)
    if cfg.scan_layers:
      x = nnx.scan(lambda x, block: run_block(block, x),
                   in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
    else:
      for block in self.layers:
        x = run_block(block, x)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def _stacked_blocks(config: ModelConfig, eager: bool, attention: str,
                    rngs: nnx.Rngs) -> Block:
  """``n_layers`` blocks as one :class:`Block` whose params have a leading
  layer axis (logical name ``'layers'``), each layer with its own keys."""

  @nnx.split_rngs(splits=config.n_layers)
  @nnx.vmap(in_axes=0, out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def make(rngs: nnx.Rngs) -> Block:
    return Block(config, eager_sharding=eager, attention=attention, rngs=rngs)

  return make(rngs)


# A scanned block's param: 'layers/attn/...', not 'layers/3/attn/...'.
_STACKED_PATH = re.compile(r'^layers/(?!\d+(/|$))')


def layer_axes(path: str) -> int:
  """Leading layer axes of the param at ``path`` ('/'-joined): 1 for a block
  param of the scanned layout (``layers/attn/q_proj/kernel``), else 0."""
  return int(bool(_STACKED_PATH.match(path)))


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Unrolled params (``layers/<i>/...``) to the scanned layout (``layers/...``
  with a leading layer axis); other entries are kept as they are."""
  layers = params['layers']
  blocks = [layers[i] for i in sorted(layers, key=int)]
  return {**params, 'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned params to the unrolled layout: the inverse of :func:`stack_layers`."""
  stacked = params['layers']
  n = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, 'layers': {i: jax.tree.map(lambda x: x[i], stacked)
                               for i in range(n)}}


def param_count(config: ModelConfig) -> int:
  """The number of parameters, in closed form.

  ``2 V d`` (embedding and untied head) ``+ L (4 d^2 + 3 d f + 2 d)``
  (attention, SwiGLU, two norms per layer) ``+ d`` (final norm).
  """
  v, d, f, n = (config.vocab_size, config.d_model, config.d_ff,
                config.n_layers)
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return v * d + n * per_layer + d + d * v


def loss_fn(model: Llama, batch: Mapping[str, jax.Array]
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross entropy (float32) over weighted tokens.

  Args:
    model: the :class:`Llama`.
    batch: ``inputs`` and ``targets`` int ``[B, T]`` (targets are the inputs
      shifted by one); optional ``weights`` float ``[B, T]`` (loss mask,
      default ones); optional ``positions`` / ``segment_ids`` ``[B, T]`` for
      packed sequences, passed to the model.

  Returns:
    ``(loss, aux)``: ``loss = sum(w * ce) / sum(w)`` (0 if ``sum(w) == 0``);
    ``aux`` holds ``loss_sum`` (``sum(w * ce)``), ``tokens`` (``sum(w)``) and
    ``accuracy`` (weighted top-1 next-token accuracy), all float32 scalars.
    Summing ``loss_sum`` and ``tokens`` across batches gives an exact eval
    mean.
  """
  logits = model(batch['inputs'], positions=batch.get('positions'),
                 segment_ids=batch.get('segment_ids'))
  targets = batch['targets']
  weights = batch.get('weights')
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  loss_sum = jnp.sum(ce * weights)
  tokens = jnp.sum(weights)
  denom = jnp.where(tokens > 0, tokens, 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  aux = {
      'loss_sum': loss_sum,
      'tokens': tokens,
      'accuracy': jnp.sum(correct * weights) / denom,
  }
  return loss_sum / denom, aux
