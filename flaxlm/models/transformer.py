"""Transformer: the encoder-decoder of "Attention Is All You Need" for translation.

Token embeddings (scaled by sqrt(d_model) when scale_embeddings) plus sinusoidal or learned positions, dropout,
an encoder stack over the source (padding masked) and a causal decoder stack with cross-attention, each stack's
layers stacked and run with `jax.lax.scan`. share_embeddings uses one table for both vocabularies (they must be
the same size); tie_output computes logits with the target embedding table instead of a separate projection.
Pre-norm (norm_first) stacks end with a final LayerNorm. Label smoothing belongs to the loss.

The source's second argument is either lengths [B] or a mask [B, S] (True at real tokens). Decoding reuses the
decoder stack's stacked KV cache: `init_cache`, then `decode(tokens, memory, src, cache=cache)` one step at a time.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.nn.attention import KVCache
from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.nn.transformer import (
    Remat,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.dropout import dropout
from flaxlm.ops.masks import padding_mask


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Transformer-base defaults (post-norm, ReLU, dropout 0.1, sinusoidal positions)."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    mlp_dim: int = 2048
    dropout: float = 0.1
    max_length: int = 256
    positions: str = "sinusoidal"
    norm_first: bool = False
    activation: str = "relu"
    share_embeddings: bool = False
    tie_output: bool = True
    scale_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    unroll: bool = False
    remat: Remat = "dots"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "mlp_dim", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig.num_heads={self.num_heads} must divide TransformerConfig.d_model={self.d_model}"
            )
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"TransformerConfig.positions must be 'learned' or 'sinusoidal', got {self.positions!r}")
        if self.activation not in ("relu", "gelu", "gelu_tanh"):
            raise ValueError(
                f"TransformerConfig.activation must be 'relu', 'gelu' or 'gelu_tanh', got {self.activation!r}"
            )
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "TransformerConfig.share_embeddings needs src_vocab_size == tgt_vocab_size, got "
                f"{self.src_vocab_size} and {self.tgt_vocab_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout!r}")


class Transformer(nnx.Module):
    """src [B, S], source lengths [B] or mask [B, S], tgt_in [B, T] -> logits [B, T, V_tgt] float32.

    Submodules: src_embed, tgt_embed (None when share_embeddings), positions, encoder, decoder, output (None when
    tie_output).
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.src_embed = Embed(cfg.src_vocab_size, cfg.d_model, rngs=rngs, **common)
        self.tgt_embed = None if cfg.share_embeddings else Embed(cfg.tgt_vocab_size, cfg.d_model, rngs=rngs,
                                                                 **common)
        self.positions = PositionEmbedding(cfg.positions, cfg.max_length, cfg.d_model, rngs=rngs, **common)
        layer_args = dict(dropout_rate=cfg.dropout, activation=cfg.activation, norm_first=cfg.norm_first,
                          layer_norm_eps=cfg.layer_norm_eps, **common)

        def encoder_layer(layer_rngs: nnx.Rngs) -> TransformerEncoderLayer:
            return TransformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.mlp_dim, rngs=layer_rngs, **layer_args)

        def decoder_layer(layer_rngs: nnx.Rngs) -> TransformerDecoderLayer:
            return TransformerDecoderLayer(cfg.d_model, cfg.num_heads, cfg.mlp_dim, cross_attention=True,
                                           rngs=layer_rngs, **layer_args)

        stack = dict(final_norm=cfg.norm_first, unroll=cfg.unroll, remat=cfg.remat, rngs=rngs)
        self.encoder = TransformerEncoder(cfg.num_encoder_layers, encoder_layer, **stack)
        self.decoder = TransformerDecoder(cfg.num_decoder_layers, decoder_layer, **stack)
        self.output = None if cfg.tie_output else nnx.Linear(
            cfg.d_model, cfg.tgt_vocab_size, rngs=rngs, **common,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",)),
        )

    def _target_embed(self) -> Embed:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    def _embed(self, embed: Embed, tokens: jax.Array, positions, key) -> jax.Array:
        x = embed(tokens)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        return dropout(x + self.positions(positions), self.cfg.dropout, key)

    def init_cache(self, batch: int, max_length: int | None = None, dtype=None) -> KVCache:
        """Empty decoder self-attention cache for up to max_length (default cfg.max_length) target positions."""
        max_length = self.cfg.max_length if max_length is None else max_length
        if not 0 < max_length <= self.cfg.max_length:
            raise ValueError(f"max_length must be in [1, cfg.max_length={self.cfg.max_length}], got {max_length}")
        return self.decoder.init_cache(batch, max_length, dtype)

    def encode(self, src: jax.Array, src_mask_or_lengths=None, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """src [B, S] int, lengths [B] or mask [B, S] (default: no padding) -> memory [B, S, F]."""
        src = _tokens(src, "src")
        valid = source_mask(*src.shape, src_mask_or_lengths)
        embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = self._embed(self.src_embed, src, src.shape[1], embed_key)
        return self.encoder(x, mask=valid[:, None, None, :], dropout_key=encoder_key)

    def decode(
        self,
        tgt: jax.Array,
        memory: jax.Array,
        src_mask_or_lengths=None,
        *,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
        return_attention: bool = False,
    ):
        """tgt [B, T] (BOS + target[:-1]), memory [B, S, F] from encode -> logits [B, T, V] float32.

        With a cache (from init_cache) the tokens sit at positions cache.index + t and (logits, new_cache) comes
        back. return_attention (no cache) also returns the cross-attention weights [L, B, H, T, S] of every decoder
        layer: (logits, weights).
        """
        tgt = _tokens(tgt, "tgt")
        if memory.ndim != 3 or memory.shape[0] != tgt.shape[0]:
            raise ValueError(f"memory must have shape [B={tgt.shape[0]}, S, F], got {memory.shape}")
        if return_attention and cache is not None:
            raise ValueError("return_attention is for full (uncached) decoding; got a cache")
        memory_mask = source_mask(*memory.shape[:2], src_mask_or_lengths)[:, None, None, :]
        embed_key, decoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        positions = tgt.shape[1] if cache is None else cache.index[0] + jnp.arange(tgt.shape[1])
        x = self._embed(self._target_embed(), tgt, positions, embed_key)
        weights = new_cache = None
        if return_attention:
            x, weights = self._decode_with_weights(x, memory, memory_mask, decoder_key)
        elif cache is None:
            x = self.decoder(x, memory, memory_mask=memory_mask, is_causal=True, dropout_key=decoder_key)
        else:
            x, new_cache = self.decoder(x, memory, memory_mask=memory_mask, is_causal=True, cache=cache,
                                        dropout_key=decoder_key)
        logits = self._target_embed().attend(x) if self.output is None else apply_to_rows(self.output, x)
        logits = logits.astype(jnp.float32)
        if return_attention:
            return logits, weights
        return logits if cache is None else (logits, new_cache)

    def _decode_with_weights(self, x, memory, memory_mask, key):
        """The decoder stack run layer by layer, also collecting each layer's cross-attention weights.

        TransformerDecoderLayer does not return its attention weights, so each layer's cross-attention query is
        recomputed here from the layer's own submodules (same residual/norm order as the layer, without dropout),
        then the layer itself produces the output.
        """
        layers = self.decoder.layers
        keys = [None] * self.decoder.num_layers if key is None else jax.random.split(key, self.decoder.num_layers)
        all_weights = []
        for i in range(self.decoder.num_layers):
            layer = jax.tree.map(lambda a, i=i: a[i], layers)
            if layer.norm_first:
                h = x + layer.self_attn(layer.self_attn_norm(x), is_causal=True)
                query = layer.cross_attn_norm(h)
            else:
                query = layer.self_attn_norm(x + layer.self_attn(x, is_causal=True))
            _, weights = layer.cross_attn(query, memory, mask=memory_mask, return_weights=True)
            all_weights.append(weights)
            x = layer(x, memory, memory_mask=memory_mask, is_causal=True, dropout_key=keys[i])
        if self.decoder.final_norm is not None:
            x = self.decoder.final_norm(x)
        return x, jnp.stack(all_weights)

    def __call__(
        self,
        src: jax.Array,
        src_mask_or_lengths,
        tgt_in: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        return_attention: bool = False,
    ):
        """src [B, S], lengths [B] or mask [B, S], tgt_in [B, T] -> logits [B, T, V] float32, or (logits,
        cross-attention weights [L, B, H, T, S]) when return_attention. dropout_key=None: evaluation."""
        encode_key, decode_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        memory = self.encode(src, src_mask_or_lengths, dropout_key=encode_key)
        return self.decode(tgt_in, memory, src_mask_or_lengths, dropout_key=decode_key,
                           return_attention=return_attention)


def _tokens(tokens, name: str) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [B, L], got {tokens.shape}")
    return tokens


def source_mask(batch: int, length: int, src_mask_or_lengths) -> jax.Array:
    """[B, S] bool, True at real source tokens, from lengths [B], a mask [B, S] or None (no padding)."""
    if src_mask_or_lengths is None:
        return jnp.ones((batch, length), bool)
    value = jnp.asarray(src_mask_or_lengths)
    if value.shape == (batch,):
        return padding_mask(value, length)
    if value.shape == (batch, length):
        return value.astype(bool)
    raise ValueError(f"source lengths must have shape [B] = ({batch},) or a mask [B, S] = {(batch, length)}, "
                     f"got {value.shape}")
