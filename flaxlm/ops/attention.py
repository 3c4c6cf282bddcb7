"""Scaled dot-product attention over JAX-layout tensors: q [B, T, H, D], k/v [B, S, K, D].

Masks are boolean (True = may attend) and biases are additive floats, both broadcastable to [B, H, T, S].
Grouped-query attention (K < H key/value heads, H % K == 0) shares key/value head k with query heads
k * G ... k * G + G - 1 (G = H // K), exactly as repeating each key/value head G times along the head axis.
"""

import math
import os

import jax
import jax.numpy as jnp

from flaxlm.ops import cpu_attention
from flaxlm.ops.dropout import dropout
from flaxlm.ops.masks import causal_mask, combine_masks

_IMPLEMENTATIONS = (None, "xla", "cudnn", "cpu")
CPU_KERNEL_SWITCH = "FLAXLM_CPU_ATTENTION"  # '0' keeps implementation=None off the fused CPU kernel
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
QUERY_BLOCK = 128  # query rows per block of causal attention on the XLA path (see _xla_attention)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(D) + bias, masked) v, per head.

    Args:
      q: queries [B, T, H, D].
      k: keys [B, S, K, D], with H % K == 0 (grouped-query attention when K < H).
      v: values [B, S, K, Dv].
      mask: bool, broadcastable to [B, H, T, S] (rank 2 to 4; missing leading axes count as 1). True = attend.
        Query rows with no key to attend to give exactly zero output (and zero weights).
      bias: float, broadcastable to [B, H, T, S] (rank 2 to 4), added to the scaled logits.
      is_causal: query t attends to keys s <= t (top-left aligned when T != S, as torch's `is_causal`).
      dropout_rate: probability of dropping each attention weight (inverted scaling), as torch does.
      dropout_key: PRNG key for the dropout; None disables it (evaluation mode).
      return_weights: also return the attention weights [B, H, T, S] (after dropout, as torch returns them).
      implementation: None picks cuDNN flash attention on GPU for bf16/fp16 inputs when no dropout or weights are
        requested and the shapes suit it; on a single CPU device it picks the fused C++ kernel
        (flaxlm.ops.cpu_attention) for float32 inputs without mask, bias, dropout or weights (unless
        $FLAXLM_CPU_ATTENTION is '0'); otherwise the XLA path. 'xla' forces the explicit einsum path; 'cudnn'
        and 'cpu' force cuDNN or the CPU kernel (ValueError when the request cannot run there).

    Logits and softmax are computed in float32 whatever the input dtype; the output has q's dtype.

    Returns:
      out [B, T, H, Dv], or (out, weights [B, H, T, S]) when return_weights.
    """
    _check_options(implementation, dropout_rate)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_qkv(q, k, v)
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    target = (batch, heads, q_len, kv_len)
    mask = _broadcastable(mask, "mask", target)
    bias = _broadcastable(bias, "bias", target)
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; pass additive masks as bias")
    use_dropout = dropout_key is not None and dropout_rate > 0.0

    if implementation == "cudnn":
        reason = _cudnn_unsupported(q, k, v, mask, bias, use_dropout, return_weights, check_backend=False)
        if reason:
            raise ValueError(f"implementation='cudnn' cannot run this call: {reason}")
        try:
            return _cudnn_attention(q, k, v, mask, bias, is_causal)
        except (NotImplementedError, RuntimeError) as e:
            raise ValueError(f"implementation='cudnn' cannot run this call: {e}") from e
    if _takes_cpu_kernel(q, k, v, mask, bias, use_dropout, return_weights, implementation):
        with jax.named_scope("attention"):
            return cpu_attention.fused_attention(q, k, v, is_causal)
    if implementation is None and not _cudnn_unsupported(q, k, v, mask, bias, use_dropout, return_weights,
                                                          check_backend=True):
        try:
            return _cudnn_attention(q, k, v, mask, bias, is_causal)
        except (NotImplementedError, ValueError, RuntimeError):
            pass

    with jax.named_scope("attention"):  # profiles (benchmarks/profile_step.py) attribute time by this scope
        out, weights = _xla_attention(q, k, v, mask, bias, is_causal, dropout_rate if use_dropout else 0.0,
                                      dropout_key, return_weights)
    if return_weights:
        return out, weights
    return out


def dot_product_self_attention(
    qkv: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """dot_product_attention(q, k, v, ...) of a fused projection qkv [B, T, 3, H, D] (q, k, v = qkv[:, :, i]).

    The fused CPU kernel reads qkv in place, so its forward pass copies no slices and its gradient is one
    [B, T, 3, H, D] array instead of three joined by a concatenate; every other path takes the three slices.
    Arguments and result as dot_product_attention's.
    """
    _check_options(implementation, dropout_rate)
    qkv = jnp.asarray(qkv)
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, T, 3, H, D], got {qkv.shape}")
    use_dropout = dropout_key is not None and dropout_rate > 0.0
    part = jax.ShapeDtypeStruct(qkv.shape[:2] + qkv.shape[3:], qkv.dtype)
    if _takes_cpu_kernel(part, part, part, mask, bias, use_dropout, return_weights, implementation):
        with jax.named_scope("attention"):
            return cpu_attention.fused_self_attention(qkv, is_causal)
    q, k, v = (qkv[:, :, i] for i in range(3))
    return dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal, dropout_rate=dropout_rate,
                                 dropout_key=dropout_key, return_weights=return_weights, implementation=implementation)


def _check_options(implementation: str | None, dropout_rate: float) -> None:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, T|S, heads, head_dim], got {x.shape}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on [B, S, K]: k {k.shape}, v {v.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads must be a multiple of key/value heads: q {q.shape}, k {k.shape}")


def _broadcastable(x: jax.Array | None, name: str, target: tuple[int, ...]) -> jax.Array | None:
    """Left-pads `x` (rank 2..4) to rank 4 and checks it broadcasts to `target` = (B, H, T, S)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"{name} must have rank 2 to 4, broadcastable to [B, H, T, S] = {target}, got {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(m not in (1, t) for m, t in zip(x.shape, target)):
        raise ValueError(f"{name} of shape {x.shape} is not broadcastable to [B, H, T, S] = {target}")
    return x


def _rows(x: jax.Array | None, start: int, stop: int, keys: int) -> jax.Array | None:
    """Query rows start:stop and the first `keys` key columns of a [B|1, H|1, T|1, S|1] mask or bias."""
    if x is None:
        return None
    rows = slice(start, stop) if x.shape[2] > 1 else slice(None)
    cols = slice(0, keys) if x.shape[3] > 1 else slice(None)
    return x[:, :, rows, cols]


def _xla_attention(q, k, v, mask, bias, is_causal, dropout_rate, dropout_key, return_weights):
    """Explicit path, head-major: q as [B, K, G, T, D] and k/v as [B, K, S, D] (grouped heads stay as [K, G] so
    k/v are never repeated in memory), transposed once so that every block's products have their batch axes first.

    Causal attention runs in blocks of QUERY_BLOCK query rows, each against only the keys it may see (block i:
    keys up to its last row), so a long causal sequence computes about half of the [T, S] logits and each block's
    logits stay in cache. Dropout draws one mask per block (fold_in of the key with the block's first row) when
    there is more than one block. Returns (out [B, T, H, Dv], weights [B, H, T, S] or None unless
    `return_weights`: the blocks' weights are only padded to S and joined when asked for).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qh = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    block = QUERY_BLOCK if is_causal else q_len
    blocks = range(0, q_len, block) if q_len else range(1)
    outs, all_weights = [], []
    for start in blocks:
        stop = min(start + block, q_len)
        keys = min(stop, kv_len) if is_causal else kv_len
        causal = causal_mask(stop - start, keys, offset=start)[None, None] if is_causal else None
        block_mask = combine_masks(_rows(mask, start, stop, keys), causal)
        block_bias = _rows(bias, start, stop, keys)
        logits = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, start:stop], kh[:, :, :keys],
                            preferred_element_type=jnp.float32)
        logits = logits.reshape(batch, heads, stop - start, keys) * (1.0 / math.sqrt(head_dim))
        if block_bias is not None:
            logits = logits + block_bias.astype(jnp.float32)
        if block_mask is not None:
            logits = jnp.where(block_mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        if mask is not None:  # the causal mask alone leaves every row key 0, so only a caller's mask can empty a row
            weights = jnp.where(block_mask, weights, 0.0)
        key = dropout_key if len(blocks) == 1 or dropout_key is None else jax.random.fold_in(dropout_key, start)
        weights = dropout(weights, dropout_rate, key)
        wg = weights.astype(v.dtype).reshape(batch, kv_heads, groups, stop - start, keys)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", wg, vh[:, :, :keys], preferred_element_type=jnp.float32))
        if return_weights:
            all_weights.append(jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, kv_len - keys))))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)
    if not return_weights:
        return out, None
    weights = all_weights[0] if len(all_weights) == 1 else jnp.concatenate(all_weights, axis=2)
    return out, weights.astype(q.dtype)


def _takes_cpu_kernel(q, k, v, mask, bias, use_dropout, return_weights, implementation) -> bool:
    """Whether this call runs the fused CPU kernel: always for 'cpu' (ValueError when it cannot), and for None
    where _cpu_kernel_unsupported finds nothing against it."""
    if implementation == "cpu":
        reason = _cpu_kernel_unsupported(q, k, v, mask, bias, use_dropout, return_weights, automatic=False)
        if reason:
            raise ValueError(f"implementation='cpu' cannot run this call: {reason}")
        return True
    return implementation is None and not _cpu_kernel_unsupported(q, k, v, mask, bias, use_dropout, return_weights,
                                                                  automatic=True)


def _cpu_kernel_unsupported(q, k, v, mask, bias, use_dropout, return_weights, *, automatic) -> str:
    """Why the fused CPU kernel cannot serve this call ('' when it can). It needs the CPU backend; `automatic`
    also requires a single device (the kernel has no sharding rule) and the switch not set to '0'."""
    if jax.default_backend() != "cpu":
        return f"the kernel runs on XLA:CPU, not on the default backend {jax.default_backend()!r}"
    if automatic and jax.device_count() != 1:
        return "not on a single CPU device"
    if automatic and os.environ.get(CPU_KERNEL_SWITCH) == "0":
        return f"turned off by {CPU_KERNEL_SWITCH}=0"
    if mask is not None or bias is not None:
        return "the CPU kernel takes no mask or bias (only is_causal)"
    if use_dropout:
        return "attention dropout is only implemented on the XLA path"
    if return_weights:
        return "the CPU kernel does not return attention weights"
    return cpu_attention.unsupported_reason(q, k, v) or cpu_attention.unavailable_reason()


def _cudnn_unsupported(q, k, v, mask, bias, use_dropout, return_weights, *, check_backend) -> str:
    """Why cuDNN flash attention cannot serve this call ('' when it can)."""
    if check_backend and jax.default_backend() != "gpu":
        return "not on a GPU backend"
    if use_dropout:
        return "attention dropout is only implemented on the XLA path"
    if return_weights:
        return "cuDNN does not return attention weights"
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _CUDNN_DTYPES:
        return f"q/k/v must share a bf16/fp16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if v.shape[-1] != q.shape[-1]:
        return f"v head_dim must equal q head_dim: q {q.shape}, v {v.shape}"
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > 128:
        return f"head_dim must be a multiple of 8 and <= 128, got {head_dim}"
    if (mask is not None or bias is not None) and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"masked or biased cuDNN attention needs even T and S, got T={q.shape[1]}, S={k.shape[1]}"
    return ""


def _cudnn_attention(q, k, v, mask, bias, is_causal):
    """cuDNN flash attention through jax.nn; masks become full-length [.., T, S] and empty rows are zeroed."""
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    kernel_causal = is_causal and q_len == kv_len
    full_mask = combine_masks(mask, causal_mask(q_len, kv_len)[None, None] if is_causal else None)
    kernel_mask = full_mask if not kernel_causal else mask
    if kernel_mask is not None:
        kernel_mask = jnp.broadcast_to(kernel_mask, kernel_mask.shape[:2] + (q_len, kv_len))
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len)).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=kernel_mask, is_causal=kernel_causal, implementation="cudnn"
    )
    if full_mask is not None:
        row_valid = jnp.broadcast_to(jnp.any(full_mask, axis=-1), (batch, heads, q_len))
        out = jnp.where(row_valid.transpose(0, 2, 1)[..., None], out, jnp.zeros((), out.dtype))
    return out
