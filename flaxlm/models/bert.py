"""BERT: an encoder-only Transformer trained as a masked language model, with a pooled [CLS] head.

`BertEncoder` (token + learned position + token-type embeddings, LayerNorm, dropout, post-norm GELU layers, and
the [CLS] pooler) is the part reused for fine-tuning: `TextClassifier(backbone='bert')` holds a `BertEncoder` of
exactly the same structure as `BertMLM.encoder`, so pretrained weights move over as one subtree:
`nnx.update(classifier.backbone, nnx.state(bert_mlm.encoder))`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.nn.transformer import Remat, TransformerEncoder, TransformerEncoderLayer
from flaxlm.ops.activations import gelu
from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.dropout import dropout
from flaxlm.ops.masks import padding_mask


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT-base defaults; dropout applies to embeddings, attention weights and residual branches."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    unroll: bool = False
    remat: Remat = "dots"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position",
                     "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.num_heads={self.num_heads} must divide BertConfig.hidden_size={self.hidden_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
    )


def _dense(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Linear:
    """[F] -> [F] Linear with BERT's N(0, 0.02) init."""
    return nnx.Linear(
        cfg.hidden_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", None)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
    )


def valid_mask(tokens: jax.Array, lengths: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    """[B, T] bool, True at real tokens: from lengths [B], or a mask [B, T], or all True."""
    batch, length = tokens.shape
    if lengths is not None and mask is not None:
        raise ValueError("pass at most one of lengths and mask")
    if lengths is not None:
        if jnp.shape(lengths) != (batch,):
            raise ValueError(f"lengths must have shape [B] = ({batch},), got {jnp.shape(lengths)}")
        return padding_mask(lengths, length)
    if mask is not None:
        if jnp.shape(mask) != (batch, length):
            raise ValueError(f"mask must have shape [B, T] = {(batch, length)}, got {jnp.shape(mask)}")
        return jnp.asarray(mask, bool)
    return jnp.ones((batch, length), bool)


class BertEncoder(nnx.Module):
    """tokens [B, T] (+ token types [B, T]) -> hidden states [B, T, F]; `pool` gives the [CLS] features [B, F].

    Submodules: token_embed, position_embed, type_embed, embed_norm, layers (TransformerEncoder), pooler.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        normal = nnx.initializers.normal(stddev=0.02)
        self.token_embed = Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=normal, **common)
        self.position_embed = PositionEmbedding("learned", cfg.max_position, cfg.hidden_size,
                                                embedding_init=normal, **common)
        self.type_embed = Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=normal, **common)
        self.embed_norm = _layer_norm(cfg, rngs)

        def layer(layer_rngs: nnx.Rngs) -> TransformerEncoderLayer:
            return TransformerEncoderLayer(
                cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, dropout_rate=cfg.dropout, activation="gelu",
                norm_first=False, layer_norm_eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                rngs=layer_rngs,
            )

        self.layers = TransformerEncoder(cfg.num_layers, layer, unroll=cfg.unroll, remat=cfg.remat, rngs=rngs)
        for path, node in nnx.iter_graph(self.layers):
            if isinstance(node, nnx.Param) and str(path[-1]).endswith("kernel"):
                node.set_value(0.02 * jax.random.normal(rngs.params(), node.shape, node.dtype))
        self.pooler = _dense(cfg, rngs)

    def __call__(
        self,
        tokens: jax.Array,
        token_types: jax.Array | None = None,
        lengths: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [B, T] int, token_types [B, T] (default 0), lengths [B] or mask [B, T] -> hidden [B, T, F].

        Padded positions are never attended to; their own outputs are meaningless and must be masked by the caller.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tokens.shape}")
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        elif jnp.shape(token_types) != tokens.shape:
            raise ValueError(f"token_types must have the shape of tokens {tokens.shape}, got {jnp.shape(token_types)}")
        valid = valid_mask(tokens, lengths, mask)
        x = self.token_embed(tokens) + self.position_embed(tokens.shape[1]) + self.type_embed(token_types)
        embed_key, layers_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(self.embed_norm(x), self.cfg.dropout, embed_key)
        return self.layers(x, mask=valid[:, None, None, :], dropout_key=layers_key)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, F] -> tanh(dense(hidden[:, 0])) [B, F], the [CLS] summary used for classification."""
        return jnp.tanh(self.pooler(hidden[:, 0]))


class BertMLM(nnx.Module):
    """BertEncoder plus the masked-LM head: dense, GELU, LayerNorm, then the tied token embedding and a bias."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = BertEncoder(cfg, rngs=rngs)
        self.mlm_dense = _dense(cfg, rngs)
        self.mlm_norm = _layer_norm(cfg, rngs)
        self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.param_dtype), out_sharding=("vocab",))

    def encode(self, tokens, token_types=None, lengths=None, *, mask=None, dropout_key=None) -> jax.Array:
        """-> hidden states [B, T, F] (see BertEncoder.__call__)."""
        return self.encoder(tokens, token_types, lengths, mask=mask, dropout_key=dropout_key)

    def pooled(self, tokens, token_types=None, lengths=None, *, mask=None, dropout_key=None) -> jax.Array:
        """-> pooled [CLS] features [B, F]."""
        return self.encoder.pool(self.encode(tokens, token_types, lengths, mask=mask, dropout_key=dropout_key))

    def predict(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., F] -> masked-LM logits [..., V] float32 (dense, GELU, LayerNorm, tied embedding + bias)."""
        h = self.mlm_norm(gelu(apply_to_rows(self.mlm_dense, hidden)))
        logits = self.encoder.token_embed.attend(h) + self.mlm_bias[...].astype(h.dtype)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, token_types=None, lengths=None, *, mask=None, dropout_key=None) -> jax.Array:
        """tokens [B, T] -> masked-LM logits [B, T, V] float32."""
        return self.predict(self.encode(tokens, token_types, lengths, mask=mask, dropout_key=dropout_key))


def mask_tokens(
    tokens: jax.Array,
    key: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids=(),
    mask_prob: float = 0.15,
) -> tuple[jax.Array, jax.Array]:
    """BERT's masking: pick each non-special token with probability mask_prob; of the picked tokens 80% become
    mask_id, 10% a uniformly random id in [0, vocab_size) and 10% stay unchanged.

    Returns (inputs [B, T] with the replacements, selected [B, T] bool): the MLM loss predicts the original
    `tokens` at the selected positions only. special_ids (e.g. [PAD], [CLS], [SEP]) are never selected.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
    tokens = jnp.asarray(tokens)
    pick_key, rule_key, random_key = jax.random.split(key, 3)
    candidate = ~jnp.isin(tokens, jnp.asarray(special_ids, tokens.dtype))
    selected = jax.random.bernoulli(pick_key, mask_prob, tokens.shape) & candidate
    rule = jax.random.uniform(rule_key, tokens.shape)
    random_ids = jax.random.randint(random_key, tokens.shape, 0, vocab_size, tokens.dtype)
    replaced = jnp.where(rule < 0.8, jnp.asarray(mask_id, tokens.dtype), jnp.where(rule < 0.9, random_ids, tokens))
    return jnp.where(selected, replaced, tokens), selected
