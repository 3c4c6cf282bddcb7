"""Transformer encoder/decoder layers (torch.nn.TransformerEncoderLayer/DecoderLayer semantics) and layer stacks.

Stacks build the parameters of all layers at once with `jax.vmap` over split keys (every leaf gains a leading
layers axis) and run them with `jax.lax.scan`, so trace and compile time do not grow with depth. `unroll=True`
runs a Python loop over the same stacked parameters instead (same results, one copy of the layer per depth).

`remat` picks what the backward pass keeps from each layer's forward pass (`jax.checkpoint` on the layer):
'dots' (the default) keeps only the outputs of the weight matmuls (`dots_with_no_batch_dims_saveable`) and
recomputes attention and the elementwise ops; 'dots_all' also keeps attention's two batched products
(`checkpoint_dots`); 'full' keeps only the layer inputs; 'none' keeps everything. Where attention runs as the
fused CPU kernel (flaxlm.ops.cpu_attention), 'dots' and 'dots_all' also keep its output and log-sum-exp
([B, T, H, D] and [B, H, T]), so the backward pass does not run the forward kernel again (gpt_cpu step 0.967,
gpt_large 0.93 of the time with recomputation, alternated in one process).
On XLA:CPU 'dots' is the fastest for short contexts (the GPT train step of the nanoGPT CPU config, context 64:
64 ms against 76 ms with 'dots_all', and in another sitting 60 ms against 95 ms with 'none': the stacked buffers
of saved attention weights and activations cost more to fill and read than the recomputation), and it needs less
memory everywhere. With long contexts recomputing attention costs more than keeping it: context 256
(benchmarks' gpt_large), 'dots_all' 3.27 s against 3.63 s for 'dots' and 3.82 s for 'none'.
"""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.nn.attention import KVCache, MultiHeadAttention
from flaxlm.nn.feedforward import FeedForward
from flaxlm.ops import cpu_attention
from flaxlm.ops.dropout import dropout


def _layer_norm(features, eps, use_bias, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    """torch-equivalent LayerNorm (two-pass variance), scale/bias with logical axis ('embed',)."""
    return nnx.LayerNorm(
        features, epsilon=eps, use_bias=use_bias, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs,
    )


_KERNEL_RESIDUALS = jax.checkpoint_policies.save_only_these_names(*cpu_attention.RESIDUAL_NAMES)
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KERNEL_RESIDUALS),
    "dots_all": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _KERNEL_RESIDUALS),
    "full": jax.checkpoint_policies.nothing_saveable,
}
Remat = Literal["none", "dots", "dots_all", "full"]


def _check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")


def _rematted(fn: Callable, remat: str) -> Callable:
    """`fn` under jax.checkpoint with the policy named by `remat` ('none': fn itself)."""
    return fn if remat == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[remat])


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class TransformerEncoderLayer(nnx.Module):
    """Self-attention block then feed-forward block, each with residual dropout and LayerNorm.

    norm_first=False (post-norm, the original Transformer): x = norm(x + dropout(block(x))).
    norm_first=True (pre-norm, GPT-2 style): x = x + dropout(block(norm(x))).
    use_bias=False drops the biases of every linear layer and LayerNorm (like torch's and nanoGPT's bias=False).
    Submodules: self_attn, self_attn_norm, ffn, ffn_norm (torch: self_attn, norm1, linear1/linear2, norm2).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        dropout_rate: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        use_bias: bool = True,
        num_kv_heads: int | None = None,
        fused_qkv: bool = False,
        rope: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_model = d_model
        self.dropout_rate = dropout_rate
        self.norm_first = norm_first
        self.layer_norm_eps = layer_norm_eps
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.self_attn = MultiHeadAttention(
            num_heads, d_model, num_kv_heads=num_kv_heads, fused_qkv=fused_qkv, use_bias=use_bias,
            dropout_rate=dropout_rate, rope=rope, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.self_attn_norm = _layer_norm(d_model, layer_norm_eps, use_bias, dtype, param_dtype, rngs)
        self.ffn = FeedForward(
            d_model, dim_feedforward, activation=activation, use_bias=use_bias, dropout_rate=dropout_rate,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.ffn_norm = _layer_norm(d_model, layer_norm_eps, use_bias, dtype, param_dtype, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, F] -> [B, T, F]. mask: bool broadcastable to [B, H, T, T], True = attend."""
        k_attn, k_res1, k_ffn, k_res2 = _split(dropout_key, 4)

        def attn(h):
            out = self.self_attn(h, mask=mask, is_causal=is_causal, positions=positions, dropout_key=k_attn)
            return dropout(out, self.dropout_rate, k_res1)

        def ffn(h):
            return dropout(self.ffn(h, dropout_key=k_ffn), self.dropout_rate, k_res2)

        if self.norm_first:
            x = x + attn(self.self_attn_norm(x))
            return x + ffn(self.ffn_norm(x))
        x = self.self_attn_norm(x + attn(x))
        return self.ffn_norm(x + ffn(x))


class TransformerDecoderLayer(nnx.Module):
    """Causal-capable self-attention, optional cross-attention over `memory`, then feed-forward.

    cross_attention=True is torch's TransformerDecoderLayer; cross_attention=False is a GPT block.
    Submodules: self_attn, self_attn_norm, [cross_attn, cross_attn_norm], ffn, ffn_norm
    (torch: self_attn/norm1, multihead_attn/norm2, linear1/linear2/norm3).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        cross_attention: bool = True,
        dropout_rate: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        use_bias: bool = True,
        num_kv_heads: int | None = None,
        fused_qkv: bool = False,
        rope: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_model = d_model
        self.cross_attention = cross_attention
        self.dropout_rate = dropout_rate
        self.norm_first = norm_first
        self.layer_norm_eps = layer_norm_eps
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.self_attn = MultiHeadAttention(
            num_heads, d_model, num_kv_heads=num_kv_heads, fused_qkv=fused_qkv, use_bias=use_bias,
            dropout_rate=dropout_rate, rope=rope, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.self_attn_norm = _layer_norm(d_model, layer_norm_eps, use_bias, dtype, param_dtype, rngs)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(
                num_heads, d_model, num_kv_heads=num_kv_heads, fused_qkv=fused_qkv, use_bias=use_bias,
                dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )
            self.cross_attn_norm = _layer_norm(d_model, layer_norm_eps, use_bias, dtype, param_dtype, rngs)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.ffn = FeedForward(
            d_model, dim_feedforward, activation=activation, use_bias=use_bias, dropout_rate=dropout_rate,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.ffn_norm = _layer_norm(d_model, layer_norm_eps, use_bias, dtype, param_dtype, rngs)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """Empty self-attention cache for this layer (see MultiHeadAttention.init_cache)."""
        return self.self_attn.init_cache(batch, max_length, dtype)

    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ):
        """x [B, T, F], memory [B, S, F] -> [B, T, F], or (out, new_cache) when a self-attention cache is given.

        mask: self-attention mask broadcastable to [B, H, T, T] (to [B, H, T, S_max] with a cache);
        memory_mask: cross-attention mask broadcastable to [B, H, T, S]. True = attend.
        """
        if self.cross_attention and memory is None:
            raise ValueError("this decoder layer has cross-attention: memory [B, S, F] is required")
        if not self.cross_attention and memory is not None:
            raise ValueError("memory given to a decoder layer built with cross_attention=False")
        k_self, k_res1, k_cross, k_res2, k_ffn, k_res3 = _split(dropout_key, 6)
        new_cache = None

        def self_block(h):
            nonlocal new_cache
            out = self.self_attn(h, mask=mask, is_causal=is_causal, cache=cache, positions=positions,
                                 dropout_key=k_self)
            if cache is not None:
                out, new_cache = out
            return dropout(out, self.dropout_rate, k_res1)

        def cross_block(h):
            out = self.cross_attn(h, memory, mask=memory_mask, dropout_key=k_cross)
            return dropout(out, self.dropout_rate, k_res2)

        def ffn_block(h):
            return dropout(self.ffn(h, dropout_key=k_ffn), self.dropout_rate, k_res3)

        if self.norm_first:
            x = x + self_block(self.self_attn_norm(x))
            if self.cross_attention:
                x = x + cross_block(self.cross_attn_norm(x))
            x = x + ffn_block(self.ffn_norm(x))
        else:
            x = self.self_attn_norm(x + self_block(x))
            if self.cross_attention:
                x = self.cross_attn_norm(x + cross_block(x))
            x = self.ffn_norm(x + ffn_block(x))
        return x if cache is None else (x, new_cache)


def _stack_layers(num_layers: int, layer_factory: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """One module whose every parameter has a leading [num_layers] axis, built by vmapping the factory."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    keys = jax.random.split(rngs.params(), num_layers)
    return jax.vmap(lambda key: layer_factory(nnx.Rngs(key)))(keys)


def _layer(stacked: nnx.Module, i: int) -> nnx.Module:
    return jax.tree.map(lambda a: a[i], stacked)


def _final_norm(enabled: bool, layers: nnx.Module, rngs: nnx.Rngs) -> nnx.LayerNorm | None:
    if not enabled:
        return None
    return _layer_norm(layers.d_model, layers.layer_norm_eps, layers.use_bias, layers.dtype, layers.param_dtype, rngs)


class TransformerEncoder(nnx.Module):
    """num_layers encoder layers (stacked parameters, scanned) and an optional final LayerNorm (for pre-norm).

    layer_factory(rngs) -> TransformerEncoderLayer builds one layer, e.g.
    `TransformerEncoder(6, lambda rngs: TransformerEncoderLayer(512, 8, 2048, rngs=rngs), rngs=nnx.Rngs(0))`.
    `layers` holds all layers' parameters with a leading layers axis.
    """

    def __init__(
        self,
        num_layers: int,
        layer_factory: Callable[[nnx.Rngs], TransformerEncoderLayer],
        *,
        final_norm: bool = False,
        unroll: bool = False,
        remat: Remat = "dots",
        rngs: nnx.Rngs,
    ):
        _check_remat(remat)
        self.num_layers = num_layers
        self.unroll = unroll
        self.remat = remat
        self.layers = _stack_layers(num_layers, layer_factory, rngs)
        self.final_norm = _final_norm(final_norm, self.layers, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, F] -> [B, T, F]; each layer gets its own dropout key split from dropout_key."""
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)

        def apply(layer, h, key):
            return layer(h, mask=mask, is_causal=is_causal, positions=positions, dropout_key=key)

        apply = _rematted(apply, self.remat)

        if self.unroll:
            for i in range(self.num_layers):
                x = apply(_layer(self.layers, i), x, None if keys is None else keys[i])
        else:
            x, _ = jax.lax.scan(lambda h, xs: (apply(xs[0], h, xs[1]), None), x, (self.layers, keys))
        return x if self.final_norm is None else self.final_norm(x)


class TransformerDecoder(nnx.Module):
    """num_layers decoder layers (stacked, scanned), optional final LayerNorm, and a stacked KV cache for decoding.

    layer_factory(rngs) -> TransformerDecoderLayer. With cross_attention=False layers this is a GPT trunk.
    """

    def __init__(
        self,
        num_layers: int,
        layer_factory: Callable[[nnx.Rngs], TransformerDecoderLayer],
        *,
        final_norm: bool = False,
        unroll: bool = False,
        remat: Remat = "dots",
        rngs: nnx.Rngs,
    ):
        _check_remat(remat)
        self.num_layers = num_layers
        self.unroll = unroll
        self.remat = remat
        self.layers = _stack_layers(num_layers, layer_factory, rngs)
        self.final_norm = _final_norm(final_norm, self.layers, rngs)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """Empty stacked cache: k, v [L, B, S_max, K, D], index [L] (all layers advance together)."""
        one = self.layers.self_attn.init_cache(batch, max_length, dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers,) + a.shape), one)

    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ):
        """x [B, T, F] (memory [B, S, F]) -> [B, T, F], or (out, new_cache) with a stacked cache from init_cache."""
        if cache is not None and (cache.k.ndim != 5 or cache.k.shape[0] != self.num_layers):
            raise ValueError(
                f"cache must be stacked per layer, k [L={self.num_layers}, B, S_max, K, D], got {cache.k.shape}"
            )
        if (cache is not None and not isinstance(cache.index, jax.core.Tracer)
                and int(jnp.max(cache.index)) + x.shape[1] > cache.k.shape[2]):
            raise ValueError(
                f"cache overflow: index {int(jnp.max(cache.index))} + {x.shape[1]} new positions > "
                f"S_max={cache.k.shape[2]}"
            )
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)

        def apply(layer, h, layer_cache, key):
            out = layer(h, memory, mask=mask, memory_mask=memory_mask, is_causal=is_causal, cache=layer_cache,
                        positions=positions, dropout_key=key)
            return out if layer_cache is not None else (out, None)

        apply = _rematted(apply, self.remat if cache is None else "none")

        if self.unroll:
            new_caches = []
            for i in range(self.num_layers):
                layer_cache = None if cache is None else _layer(cache, i)
                x, c = apply(_layer(self.layers, i), x, layer_cache, None if keys is None else keys[i])
                new_caches.append(c)
            new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
        else:
            x, new_cache = jax.lax.scan(lambda h, xs: apply(xs[0], h, xs[1], xs[2]), x, (self.layers, cache, keys))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if cache is None else (x, new_cache)
