"""Multi-head attention (self, cross, grouped-query) with an explicit key/value cache for decoding.

Parameters and their logical axes (einsum-ready, one array per projection):

    fused_qkv=False:  q_kernel [F, H, D] ('embed', 'heads', 'kv')      q_bias [H, D] ('heads', 'kv')
                      k_kernel [Fkv, K, D] ('embed', 'heads', 'kv')    k_bias [K, D] ('heads', 'kv')
                      v_kernel [Fkv, K, D] ('embed', 'heads', 'kv')    v_bias [K, D] ('heads', 'kv')
    fused_qkv=True:   qkv_kernel [F, 3, H, D] ('embed', None, 'heads', 'kv')   qkv_bias [3, H, D]
                      (torch's in_proj_weight [3F, F] transposed and reshaped: one matmul for q, k and v)
    always:           out_kernel [H, D, Fout] ('heads', 'kv', 'embed')  out_bias [Fout] ('embed',)

F = in_features, Fkv = kv_features, H = num_heads, K = num_kv_heads, D = qkv_features // num_heads.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.ops.attention import dot_product_attention, dot_product_self_attention
from flaxlm.ops.dense import dense
from flaxlm.ops.masks import causal_mask, combine_masks
from flaxlm.ops.positions import apply_rope


class KVCache(NamedTuple):
    """Keys and values of the positions decoded so far.

    k, v: [B, S_max, K, D]; index: int32 scalar, the number of filled positions (the next write position).
    A decoder stack holds one KVCache whose arrays have a leading layers axis ([L, B, S_max, K, D], index [L]).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array


def _param(init, rngs: nnx.Rngs, fan_shape, shape, dtype, names) -> nnx.Param:
    """Initialise as a 2-D [fan_in, fan_out] matrix (so fan-based inits see the true fans), then reshape."""
    return nnx.Param(init(rngs.params(), fan_shape, dtype).reshape(shape), out_sharding=names)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention over [B, T, F] inputs, like torch.nn.MultiheadAttention(batch_first=True).

    Masks are boolean, True = attend, broadcastable to [B, H, T, S] (torch's key_padding_mask and attn_mask use
    True = ignore: pass their negation). Attention dropout acts on the weights, as in torch.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        kv_features: int | None = None,
        fused_qkv: bool = False,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        rope: bool = False,
        rope_base: float = 10000.0,
        implementation: str | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kv_features = in_features if kv_features is None else kv_features
        if num_heads <= 0 or qkv_features % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide qkv_features={qkv_features}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if fused_qkv and (num_kv_heads != num_heads or kv_features != in_features):
            raise ValueError(
                "fused_qkv needs num_kv_heads == num_heads and kv_features == in_features, got "
                f"num_kv_heads={num_kv_heads}, num_heads={num_heads}, kv_features={kv_features}, "
                f"in_features={in_features}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        head_dim = qkv_features // num_heads
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.in_features = in_features
        self.kv_features = kv_features
        self.out_features = out_features
        self.fused_qkv = fused_qkv
        self.use_bias = use_bias
        self.dropout_rate = dropout_rate
        self.rope = rope
        self.rope_base = rope_base
        self.implementation = implementation
        self.dtype = dtype

        h, k, d = num_heads, num_kv_heads, head_dim
        embed_heads_kv = ("embed", "heads", "kv")
        if fused_qkv:
            self.qkv_kernel = _param(
                kernel_init, rngs, (in_features, 3 * h * d), (in_features, 3, h, d), param_dtype,
                ("embed", None, "heads", "kv"),
            )
            self.qkv_bias = (
                nnx.Param(bias_init(rngs.params(), (3, h, d), param_dtype), out_sharding=(None, "heads", "kv"))
                if use_bias else None
            )
        else:
            self.q_kernel = _param(kernel_init, rngs, (in_features, h * d), (in_features, h, d), param_dtype,
                                   embed_heads_kv)
            self.k_kernel = _param(kernel_init, rngs, (kv_features, k * d), (kv_features, k, d), param_dtype,
                                   embed_heads_kv)
            self.v_kernel = _param(kernel_init, rngs, (kv_features, k * d), (kv_features, k, d), param_dtype,
                                   embed_heads_kv)
            if use_bias:
                self.q_bias = nnx.Param(bias_init(rngs.params(), (h, d), param_dtype), out_sharding=("heads", "kv"))
                self.k_bias = nnx.Param(bias_init(rngs.params(), (k, d), param_dtype), out_sharding=("heads", "kv"))
                self.v_bias = nnx.Param(bias_init(rngs.params(), (k, d), param_dtype), out_sharding=("heads", "kv"))
            else:
                self.q_bias = self.k_bias = self.v_bias = None
        self.out_kernel = _param(kernel_init, rngs, (h * d, out_features), (h, d, out_features), param_dtype,
                                 ("heads", "kv", "embed"))
        self.out_bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), out_sharding=("embed",))
            if use_bias else None
        )

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """Empty cache: zeros k, v [B, S_max, K, D] (dtype defaults to the compute dtype), index 0."""
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def __call__(
        self,
        x_q: jax.Array,
        x_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_weights: bool = False,
    ):
        """Attend from x_q [B, T, F] to x_kv [B, S, Fkv] (x_kv=None: self-attention over x_q).

        Args:
          mask: bool broadcastable to [B, H, T, S] (with a cache, S = S_max of the cache). True = attend.
          is_causal: add a causal mask (query t sees keys s <= t).
          cache: self-attention only. The new keys/values are written at cache.index, queries are at absolute
            positions cache.index + t and attend causally to the filled prefix (is_causal is implied).
            cache.index + T must not exceed S_max (checked when the index is concrete).
          positions: [B, T] or [T] positions for rope; default cache.index + arange(T) (0 without a cache).
          dropout_key: key for attention dropout; None = no dropout.
          return_weights: also return the attention weights [B, H, T, S].

        Returns:
          out [B, T, Fout]; then the weights if return_weights; then the new cache if a cache was given, e.g.
          (out, new_cache) or (out, weights, new_cache).
        """
        self._check_inputs(x_q, x_kv, cache)
        options = dict(dropout_rate=self.dropout_rate, dropout_key=dropout_key, return_weights=return_weights,
                       implementation=self.implementation)
        if self.fused_qkv and x_kv is None and cache is None and not self.rope:
            result = dot_product_self_attention(self._project_packed(x_q.astype(self.dtype)), mask=mask,
                                                is_causal=is_causal, **options)
            return self._output(result, return_weights, None)
        q, k, v = self._project(x_q.astype(self.dtype), None if x_kv is None else x_kv.astype(self.dtype))
        q_len = q.shape[1]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if self.rope:
            if positions is None:
                positions = start + jnp.arange(q_len)
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0)),
                jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0)),
                start + q_len,
            )
            k, v = new_cache.k.astype(self.dtype), new_cache.v.astype(self.dtype)
            mask = combine_masks(mask, causal_mask(q_len, k.shape[1], offset=start)[None, None])
            is_causal = False
        result = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, **options)
        return self._output(result, return_weights, new_cache)

    def _output(self, result, return_weights: bool, new_cache: KVCache | None):
        """The output projection of the attention result, with the weights and the new cache as __call__ returns."""
        out, weights = result if return_weights else (result, None)
        out = dense(out, self.out_kernel[...].astype(self.dtype), contract=2)
        if self.out_bias is not None:
            out = out + self.out_bias[...].astype(self.dtype)
        outputs = (out,) + ((weights,) if return_weights else ()) + ((new_cache,) if new_cache is not None else ())
        return outputs[0] if len(outputs) == 1 else outputs

    def _check_inputs(self, x_q, x_kv, cache) -> None:
        if x_q.ndim != 3 or x_q.shape[-1] != self.in_features:
            raise ValueError(f"x_q must have shape [B, T, {self.in_features}], got {x_q.shape}")
        if x_kv is not None:
            if x_kv.ndim != 3 or x_kv.shape[-1] != self.kv_features:
                raise ValueError(f"x_kv must have shape [B, S, {self.kv_features}], got {x_kv.shape}")
            if x_kv.shape[0] != x_q.shape[0]:
                raise ValueError(f"x_q and x_kv batch sizes differ: {x_q.shape} vs {x_kv.shape}")
            if self.rope:
                raise ValueError("rope applies to self-attention only; got x_kv for cross-attention")
        if cache is not None:
            if x_kv is not None:
                raise ValueError("a KV cache is for self-attention; got x_kv for cross-attention")
            expected = (x_q.shape[0], None, self.num_kv_heads, self.head_dim)
            if cache.k.ndim != 4 or any(e is not None and e != s for e, s in zip(expected, cache.k.shape)):
                raise ValueError(
                    f"cache.k must have shape [B={x_q.shape[0]}, S_max, K={self.num_kv_heads}, "
                    f"D={self.head_dim}], got {cache.k.shape}"
                )
            if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + x_q.shape[1] > cache.k.shape[1]:
                raise ValueError(
                    f"cache overflow: index {int(cache.index)} + {x_q.shape[1]} new positions > "
                    f"S_max={cache.k.shape[1]}"
                )

    def _qkv_kernel_and_bias(self):
        """The fused projection's kernel [F, 3, H, D] and bias [3, H, D] (zeros without bias), compute dtype."""
        w = self.qkv_kernel[...].astype(self.dtype)
        b = self.qkv_bias[...].astype(self.dtype) if self.qkv_bias is not None else jnp.zeros((3,) + w.shape[2:],
                                                                                             self.dtype)
        return w, b

    def _project_packed(self, x):
        """Self-attention's fused projection of x [B, T, F] -> qkv [B, T, 3, H, D] (fused_qkv only)."""
        w, b = self._qkv_kernel_and_bias()
        return dense(x, w) + b

    def _project(self, x_q, x_kv):
        """-> q [B, T, H, D], k [B, S, K, D], v [B, S, K, D] in the compute dtype."""
        dt = self.dtype
        if self.fused_qkv:
            if x_kv is None:
                # jnp.split, not indexing: its gradient is one concatenate, where three slices' gradients are three
                # zero-padded copies added together (XLA:CPU then ran an extra pass over [B, T, 3, H, D]).
                q, k, v = jnp.split(self._project_packed(x_q), 3, axis=2)
                return q[:, :, 0], k[:, :, 0], v[:, :, 0]
            w, b = self._qkv_kernel_and_bias()
            q = dense(x_q, w[:, 0]) + b[0]
            kv = dense(x_kv, w[:, 1:]) + b[1:]
            return q, kv[:, :, 0], kv[:, :, 1]
        x_kv = x_q if x_kv is None else x_kv
        q = dense(x_q, self.q_kernel[...].astype(dt))
        k = dense(x_kv, self.k_kernel[...].astype(dt))
        v = dense(x_kv, self.v_kernel[...].astype(dt))
        if self.use_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        return q, k, v
