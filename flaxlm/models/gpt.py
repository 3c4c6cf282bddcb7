"""GPT: a decoder-only causal language model with nanoGPT's shape options and initialisation.

Token + learned position embeddings, dropout, `n_layer` pre-norm blocks (causal self-attention and a GELU MLP of
width 4 * n_embd; stacked parameters run with `jax.lax.scan`), a final LayerNorm and an output projection tied to
the token embedding. `bias=False` drops the biases of every linear layer and LayerNorm, as in nanoGPT.
Weights of a nanoGPT checkpoint load exactly with `flaxlm.interop.nanogpt.load_nanogpt`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.nn.attention import KVCache
from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.nn.transformer import Remat, TransformerDecoder, TransformerDecoderLayer
from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.dropout import dropout


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """nanoGPT's GPTConfig fields, plus tie_embeddings, layer_norm_eps, unroll, remat (see flaxlm.nn.transformer)
    and dtypes."""

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    unroll: bool = False
    remat: Remat = "dots"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_head={self.n_head} must divide GPTConfig.n_embd={self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")


class GPT(nnx.Module):
    """Causal LM: tokens [B, T] int -> logits [B, T, V] float32.

    Submodules: wte (Embed [V, C]), wpe (learned PositionEmbedding [block_size, C]), blocks (TransformerDecoder of
    GPT blocks with final LayerNorm ln_f), lm_head (only when tie_embeddings=False).
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        normal = nnx.initializers.normal(stddev=0.02)
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, embedding_init=normal, rngs=rngs, **common)
        self.wpe = PositionEmbedding("learned", cfg.block_size, cfg.n_embd, embedding_init=normal, rngs=rngs,
                                     **common)

        def block(layer_rngs: nnx.Rngs) -> TransformerDecoderLayer:
            return TransformerDecoderLayer(
                cfg.n_embd, cfg.n_head, 4 * cfg.n_embd, cross_attention=False, dropout_rate=cfg.dropout,
                activation="gelu", norm_first=True, layer_norm_eps=cfg.layer_norm_eps, use_bias=cfg.bias,
                fused_qkv=True, rngs=layer_rngs, **common,
            )

        self.blocks = TransformerDecoder(cfg.n_layer, block, final_norm=True, unroll=cfg.unroll, remat=cfg.remat,
                                         rngs=rngs)
        self._init_like_nanogpt(rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.n_embd, cfg.vocab_size, use_bias=False, rngs=rngs,
            kernel_init=nnx.with_partitioning(normal, ("embed", "vocab")), **common,
        )

    def _init_like_nanogpt(self, rngs: nnx.Rngs) -> None:
        """Linear weights ~ N(0, 0.02), the residual output projections ~ N(0, 0.02 / sqrt(2 * n_layer))."""
        layers = self.blocks.layers
        proj_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for param, std in (
            (layers.self_attn.qkv_kernel, 0.02),
            (layers.self_attn.out_kernel, proj_std),
            (layers.ffn.up.kernel, 0.02),
            (layers.ffn.down.kernel, proj_std),
        ):
            param.set_value(std * jax.random.normal(rngs.params(), param.shape, param.dtype))

    def init_cache(self, batch: int, max_length: int | None = None, dtype=None) -> KVCache:
        """Empty KV cache for decoding up to max_length (default block_size) positions: k, v [L, B, S_max, H, D]."""
        max_length = self.cfg.block_size if max_length is None else max_length
        if not 0 < max_length <= self.cfg.block_size:
            raise ValueError(f"max_length must be in [1, block_size={self.cfg.block_size}], got {max_length}")
        return self.blocks.init_cache(batch, max_length, dtype)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
    ):
        """tokens [B, T] int -> logits [B, T, V] float32; with a cache -> (logits, new_cache).

        With a cache (from init_cache), tokens sit at positions cache.index + t: prefill a prompt in one call, then
        feed one token [B, 1] per call. dropout_key=None means evaluation (no dropout).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tokens.shape}")
        length = tokens.shape[1]
        if length > self.cfg.block_size:
            raise ValueError(f"tokens length T={length} exceeds block_size={self.cfg.block_size}")
        positions = length if cache is None else cache.index[0] + jnp.arange(length)
        x = self.wte(tokens) + self.wpe(positions)
        embed_key, blocks_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(x, self.cfg.dropout, embed_key)
        out = self.blocks(x, is_causal=True, cache=cache, dropout_key=blocks_key)
        x, new_cache = (out, None) if cache is None else out
        logits = self.wte.attend(x) if self.lm_head is None else apply_to_rows(self.lm_head, x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)
