"""TextClassifier: embedding -> backbone -> pooling -> dropout -> [tanh MLP ->] linear, over padded batches.

Backbones: 'rnn', 'lstm', 'gru', 'bilstm' (flaxlm.nn.RNN), 'cnn' (Kim CNN, which max-pools over time itself),
'transformer' (a TransformerEncoder over learned or sinusoidal positions), 'bert' (a pretrained-compatible
`BertEncoder` with its own embeddings; load BertMLM weights with
`nnx.update(classifier.backbone, nnx.state(bert_mlm.encoder))`).
Poolings: 'last' (state after the last valid token; for 'bilstm' the forward state at the last valid token joined
with the backward state at the first), 'mean' and 'max' over valid positions, 'cls' (position 0; for 'bert' the
pooler's tanh(dense([CLS]))), 'attention' (keys-only additive attention, as in Flax's sst2 example). With
head_hidden > 0 the head is Linear -> tanh -> dropout -> Linear (Flax's sst2 MLP). Padding never reaches the
logits: recurrent scans stop at each length, attention never looks at padding, and pooling reads valid positions
only.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.models.bert import BertConfig, BertEncoder, valid_mask
from flaxlm.nn.attention_pooling import AttentionPooling
from flaxlm.nn.cnn import Conv1DTextEncoder
from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.nn.recurrent import RNN
from flaxlm.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from flaxlm.ops.dropout import dropout, word_dropout

RECURRENT = {"rnn": ("rnn", False), "lstm": ("lstm", False), "gru": ("gru", False), "bilstm": ("lstm", True)}
POOLINGS = {
    **{name: ("last", "mean", "max", "attention") for name in RECURRENT},
    "cnn": ("max",),
    "transformer": ("last", "mean", "max", "cls", "attention"),
    "bert": ("last", "mean", "max", "cls", "attention"),
}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """vocab_size and embed_dim are unused by 'bert', which takes its sizes from `bert`.

    hidden_size: recurrent state per direction. num_layers: recurrent or transformer layers.
    num_filters, kernel_sizes: 'cnn'. num_heads, mlp_dim, max_length, positions, norm_first: 'transformer'
    (its width is embed_dim). dropout: before the output layer, between recurrent layers and inside transformer
    layers. embed_dropout: dropout on the token embeddings; word_dropout: probability of zeroing a whole token's
    embedding (both before the backbone, training only, not for 'bert'). head_hidden: width of the tanh hidden
    layer of the head (0: a single linear layer); attention_hidden: width of the scoring MLP of 'attention' pooling.
    """

    vocab_size: int
    num_classes: int
    backbone: str = "lstm"
    pooling: str = "last"
    embed_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    embed_dropout: float = 0.0
    word_dropout: float = 0.0
    num_filters: int = 100
    kernel_sizes: tuple[int, ...] = (3, 4, 5)
    num_heads: int = 4
    mlp_dim: int = 512
    max_length: int = 512
    positions: str = "learned"
    norm_first: bool = True
    head_hidden: int = 0
    attention_hidden: int = 256
    bert: BertConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.backbone not in POOLINGS:
            raise ValueError(f"ClassifierConfig.backbone must be one of {sorted(POOLINGS)}, got {self.backbone!r}")
        if self.pooling not in POOLINGS[self.backbone]:
            raise ValueError(
                f"ClassifierConfig.pooling must be one of {POOLINGS[self.backbone]} for backbone "
                f"{self.backbone!r}, got {self.pooling!r}"
            )
        for name in ("vocab_size", "num_classes", "embed_dim", "hidden_size", "num_layers", "num_filters",
                     "num_heads", "mlp_dim", "max_length", "attention_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.head_hidden, int) or self.head_hidden < 0:
            raise ValueError(f"ClassifierConfig.head_hidden must be an int >= 0, got {self.head_hidden!r}")
        if not self.kernel_sizes or any(not isinstance(k, int) or k < 1 for k in self.kernel_sizes):
            raise ValueError(f"ClassifierConfig.kernel_sizes must be positive ints, got {self.kernel_sizes!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ClassifierConfig.num_heads={self.num_heads} must divide ClassifierConfig.embed_dim={self.embed_dim}"
            )
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"ClassifierConfig.positions must be 'learned' or 'sinusoidal', got {self.positions!r}")
        for name in ("dropout", "embed_dropout", "word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ClassifierConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if (self.backbone == "bert") != (self.bert is not None):
            raise ValueError("ClassifierConfig.bert must be a BertConfig exactly when backbone='bert', got "
                             f"backbone={self.backbone!r}, bert={self.bert!r}")
        if self.bert is not None and self.bert.vocab_size != self.vocab_size:
            raise ValueError(f"ClassifierConfig.vocab_size={self.vocab_size} must equal "
                             f"bert.vocab_size={self.bert.vocab_size}")


class TextClassifier(nnx.Module):
    """tokens [B, T] (+ lengths [B] or a left-aligned mask [B, T]) -> class logits [B, C] float32.

    Submodules: embed (None for 'bert'), positions ('transformer' only), backbone, attention_pool ('attention'
    pooling only), head_hidden (head_hidden > 0 only), head.
    """

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.backbone == "bert":
            self.embed = None
            self.positions = None
            self.backbone = BertEncoder(cfg.bert, rngs=rngs)
            features = cfg.bert.hidden_size
        else:
            self.embed = Embed(cfg.vocab_size, cfg.embed_dim, **common)
            self.positions = (
                PositionEmbedding(cfg.positions, cfg.max_length, cfg.embed_dim, **common)
                if cfg.backbone == "transformer" else None
            )
            self.backbone, features = self._backbone(cfg, rngs)
        self.attention_pool = (
            AttentionPooling(features, cfg.attention_hidden, **common) if cfg.pooling == "attention" else None
        )
        self.head_hidden = nnx.data(None)
        if cfg.head_hidden:
            self.head_hidden = nnx.Linear(
                features, cfg.head_hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
            )
            features = cfg.head_hidden
        self.head = nnx.Linear(
            features, cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "classes")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("classes",)),
        )

    @staticmethod
    def _backbone(cfg: ClassifierConfig, rngs: nnx.Rngs) -> tuple[nnx.Module, int]:
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.backbone in RECURRENT:
            cell, bidirectional = RECURRENT[cfg.backbone]
            rnn = RNN(cfg.embed_dim, cfg.hidden_size, cell=cell, num_layers=cfg.num_layers,
                      bidirectional=bidirectional, dropout_rate=cfg.dropout, **common)
            return rnn, rnn.out_features
        if cfg.backbone == "cnn":
            cnn = Conv1DTextEncoder(cfg.embed_dim, cfg.num_filters, cfg.kernel_sizes, **common)
            return cnn, cnn.out_features

        def layer(layer_rngs: nnx.Rngs) -> TransformerEncoderLayer:
            return TransformerEncoderLayer(
                cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, dropout_rate=cfg.dropout, activation="gelu",
                norm_first=cfg.norm_first, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=layer_rngs,
            )

        encoder = TransformerEncoder(cfg.num_layers, layer, final_norm=cfg.norm_first, rngs=rngs)
        return encoder, cfg.embed_dim

    def __call__(
        self,
        tokens: jax.Array,
        lengths: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        token_types: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [B, T] int; lengths [B] or mask [B, T] (True at real tokens, padding at the end; default: no
        padding); token_types [B, T] for 'bert' -> logits [B, C] float32. dropout_key=None: evaluation."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tokens.shape}")
        if token_types is not None and self.cfg.backbone != "bert":
            raise ValueError(f"token_types are used by backbone='bert' only, got backbone={self.cfg.backbone!r}")
        valid = valid_mask(tokens, lengths, mask)
        lengths = valid.sum(-1).astype(jnp.int32)
        backbone_key, head_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        features = self._features(tokens, token_types, valid, lengths, backbone_key)
        if self.head_hidden is not None:
            hidden_key, head_key = (None, None) if head_key is None else jax.random.split(head_key)
            features = jnp.tanh(self.head_hidden(dropout(features, self.cfg.dropout, hidden_key)))
        features = dropout(features, self.cfg.dropout, head_key)
        return self.head(features).astype(jnp.float32)

    def _features(self, tokens, token_types, valid, lengths, key) -> jax.Array:
        """-> pooled features [B, F]."""
        backbone, pooling = self.cfg.backbone, self.cfg.pooling
        if backbone == "bert":
            hidden = self.backbone(tokens, token_types, mask=valid, dropout_key=key)
            return self.backbone.pool(hidden) if pooling == "cls" else self._pool(hidden, valid, lengths)
        embed_key, word_key, key = (None,) * 3 if key is None else jax.random.split(key, 3)
        x = word_dropout(dropout(self.embed(tokens), self.cfg.embed_dropout, embed_key), self.cfg.word_dropout,
                         word_key)
        if backbone == "cnn":
            return self.backbone(x, seq_lengths=lengths)
        if backbone == "transformer":
            x = x + self.positions(tokens.shape[1])
            hidden = self.backbone(x, mask=valid[:, None, None, :], dropout_key=key)
            return self._pool(hidden, valid, lengths)
        outputs, carry = self.backbone(x, seq_lengths=lengths, return_carry=True, dropout_key=key)
        if pooling != "last":
            return self._pool(outputs, valid, lengths)
        h = carry[0] if isinstance(carry, tuple) else carry
        top = h[-self.backbone.num_directions:]
        return jnp.concatenate(list(top), axis=-1)

    def _pool(self, hidden, valid, lengths) -> jax.Array:
        """hidden [B, T, F] -> [B, F] with the configured pooling."""
        if self.attention_pool is not None:
            return self.attention_pool(hidden, valid)[0]
        return pool(hidden, valid, lengths, self.cfg.pooling)


def pool(hidden: jax.Array, valid: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    """hidden [B, T, F] -> [B, F] over valid [B, T] positions; a sequence of length 0 pools to zeros.

    'last': hidden at lengths - 1; 'mean', 'max': over valid positions; 'cls': hidden at position 0.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        return jnp.where(lengths[:, None] > 0, last, 0)
    keep = valid[:, :, None]
    if pooling == "mean":
        total = jnp.where(keep, hidden, 0).sum(axis=1)
        return total / jnp.maximum(lengths, 1)[:, None].astype(hidden.dtype)
    if pooling == "max":
        peak = jnp.where(keep, hidden, jnp.finfo(hidden.dtype).min).max(axis=1)
        return jnp.where(lengths[:, None] > 0, peak, 0)
    raise ValueError(f"pooling must be one of 'last', 'mean', 'max', 'cls', got {pooling!r}")
