"""Seq2Seq: an LSTM encoder-decoder with optional Bahdanau or Luong attention and teacher forcing.

The encoder LSTM reads the source up to each length; its final (h, c) starts the decoder LSTM (same layers and
width). attention='bahdanau': the previous top decoder state scores every source position additively,
v . tanh(W_q s + W_k h_j), and the context joins the embedding as the decoder's input; the output layer reads
[s_t; c_t]. attention='luong': the new top state s_t scores s_t . W h_j ("general"), and the output layer reads
tanh(W_c [c_t; s_t]) (no input feeding). Source padding never gets attention weight.

Teacher forcing ratio 1 feeds the true previous tokens `tgt_in`: without attention or with Luong attention the
decoder runs as one recurrent scan over all steps; with Bahdanau attention, or a ratio below 1 (each step and
example then feeds the model's own argmax with probability 1 - ratio, drawn from an explicit key), one
`jax.lax.scan` of `decode_step`. `encode` and `decode_step` are the pieces greedy and beam search use.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.nn.embeddings import Embed
from flaxlm.nn.recurrent import RNN
from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.dropout import dropout
from flaxlm.ops.masks import padding_mask

ATTENTIONS = ("none", "bahdanau", "luong")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """dropout applies to embeddings, between LSTM layers and before the output layer."""

    src_vocab_size: int
    tgt_vocab_size: int
    src_embed_dim: int = 256
    tgt_embed_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    attention: str = "luong"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "src_embed_dim", "tgt_embed_dim", "hidden_size",
                     "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Seq2SeqConfig.{name} must be a positive int, got {value!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig.dropout must be in [0, 1), got {self.dropout!r}")


class Seq2SeqState(NamedTuple):
    """Decoder state: carry (h, c) [L, B, H] each; memory [B, S, H] encoder outputs; keys [B, S, H] the memory
    projected for scoring (Bahdanau W_k h_j + b, Luong W h_j; the memory itself without attention);
    memory_mask [B, S] bool, True at real source tokens."""

    carry: tuple[jax.Array, jax.Array]
    memory: jax.Array
    keys: jax.Array
    memory_mask: jax.Array


class Seq2Seq(nnx.Module):
    """src [B, S], src_lengths [B], tgt_in [B, T] -> logits [B, T, V_tgt] float32.

    Submodules: src_embed, encoder (RNN), tgt_embed, decoder (RNN, stepped through decoder.cells), the attention
    projections (bahdanau: attn_query, attn_key, attn_v; luong: attn_score, attn_combine), output.
    """

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        recurrent = dict(cell="lstm", num_layers=cfg.num_layers, dropout_rate=cfg.dropout, **common)
        self.src_embed = Embed(cfg.src_vocab_size, cfg.src_embed_dim, **common)
        self.encoder = RNN(cfg.src_embed_dim, h, **recurrent)
        self.tgt_embed = Embed(cfg.tgt_vocab_size, cfg.tgt_embed_dim, **common)
        context_input = h if cfg.attention == "bahdanau" else 0
        self.decoder = RNN(cfg.tgt_embed_dim + context_input, h, **recurrent)

        def linear(n_in, n_out, names, use_bias=False):
            return nnx.Linear(
                n_in, n_out, use_bias=use_bias, **common,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
            )

        if cfg.attention == "bahdanau":
            self.attn_query = linear(h, h, ("hidden", None))
            self.attn_key = linear(h, h, ("hidden", None), use_bias=True)
            self.attn_v = nnx.Param(nnx.initializers.normal(h**-0.5)(rngs.params(), (h,), cfg.param_dtype),
                                    out_sharding=(None,))
        elif cfg.attention == "luong":
            self.attn_score = linear(h, h, ("hidden", None))
            self.attn_combine = linear(2 * h, h, ("hidden", None))
        out_in = 2 * h if cfg.attention == "bahdanau" else h
        self.output = linear(out_in, cfg.tgt_vocab_size, ("hidden", "vocab"), use_bias=True)

    def encode(self, src: jax.Array, src_lengths: jax.Array, *, dropout_key: jax.Array | None = None) -> Seq2SeqState:
        """src [B, S] int, src_lengths [B] -> the decoder's initial state (padding never enters it)."""
        src = jnp.asarray(src)
        if src.ndim != 2:
            raise ValueError(f"src must have shape [B, S], got {src.shape}")
        if jnp.shape(src_lengths) != src.shape[:1]:
            raise ValueError(f"src_lengths must have shape [B] = {src.shape[:1]}, got {jnp.shape(src_lengths)}")
        embed_key, rnn_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(self.src_embed(src), self.cfg.dropout, embed_key)
        memory, carry = self.encoder(x, seq_lengths=src_lengths, return_carry=True, dropout_key=rnn_key)
        if self.cfg.attention == "bahdanau":
            keys = apply_to_rows(self.attn_key, memory)
        elif self.cfg.attention == "luong":
            keys = apply_to_rows(self.attn_score, memory)
        else:
            keys = memory
        return Seq2SeqState(carry, memory, keys, padding_mask(src_lengths, src.shape[1]))

    def _attend(self, state: Seq2SeqState, query: jax.Array) -> tuple[jax.Array, jax.Array]:
        """query [B, T, H] -> context [B, T, H], weights [B, T, S] (softmax over real source positions)."""
        if self.cfg.attention == "bahdanau":
            hidden = jnp.tanh(self.attn_query(query)[:, :, None, :] + state.keys[:, None, :, :])
            scores = hidden @ self.attn_v[...].astype(hidden.dtype)
        else:
            scores = jnp.einsum("bth,bsh->bts", query, state.keys)
        valid = state.memory_mask[:, None, :]
        scores = jnp.where(valid, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jnp.where(valid, jax.nn.softmax(scores, axis=-1), 0.0)
        context = jnp.einsum("bts,bsh->bth", weights.astype(state.memory.dtype), state.memory)
        return context, weights

    def _logits(self, state: Seq2SeqState, top: jax.Array, context: jax.Array | None, key) -> jax.Array:
        """Top decoder states [B, T, H] (+ context) -> logits [B, T, V] float32."""
        if self.cfg.attention == "luong":
            top = jnp.tanh(apply_to_rows(self.attn_combine, jnp.concatenate([context, top], axis=-1)))
        elif self.cfg.attention == "bahdanau":
            top = jnp.concatenate([top, context], axis=-1)
        return apply_to_rows(self.output, dropout(top, self.cfg.dropout, key)).astype(jnp.float32)

    def decode_step(
        self,
        state: Seq2SeqState,
        token: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        return_attention: bool = False,
    ):
        """Feed previous tokens [B] -> (logits [B, V], new_state), or (logits, weights [B, S], new_state)."""
        if return_attention and self.cfg.attention == "none":
            raise ValueError("return_attention needs attention='bahdanau' or 'luong', got attention='none'")
        embed_key, rnn_key, out_key = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        x = dropout(self.tgt_embed(token), self.cfg.dropout, embed_key)
        context = weights = None
        if self.cfg.attention == "bahdanau":
            context, weights = self._attend(state, state.carry[0][-1][:, None])
            x = jnp.concatenate([x, context[:, 0]], axis=-1)
        h, c = state.carry
        new_h, new_c = [], []
        for layer, cell in enumerate(self.decoder.cells):
            if layer > 0 and rnn_key is not None:
                x = dropout(x, self.cfg.dropout, jax.random.fold_in(rnn_key, layer))
            (h_l, c_l), x = cell((h[layer], c[layer]), x)
            new_h.append(h_l)
            new_c.append(c_l)
        state = state._replace(carry=(jnp.stack(new_h), jnp.stack(new_c)))
        top = x[:, None]
        if self.cfg.attention == "luong":
            context, weights = self._attend(state, top)
        logits = self._logits(state, top, context, out_key)[:, 0]
        return (logits, weights[:, 0], state) if return_attention else (logits, state)

    def __call__(
        self,
        src: jax.Array,
        src_lengths: jax.Array,
        tgt_in: jax.Array,
        *,
        teacher_forcing_ratio: float = 1.0,
        teacher_forcing_key: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_attention: bool = False,
    ):
        """src [B, S], src_lengths [B], tgt_in [B, T] (BOS + target[:-1]) -> logits [B, T, V] float32, or
        (logits, attention weights [B, T, S]) when return_attention.

        teacher_forcing_ratio < 1 needs teacher_forcing_key: step t > 0 of each example feeds tgt_in[:, t] with
        probability ratio and the argmax of step t - 1's logits otherwise. dropout_key=None: evaluation.
        """
        tgt_in = jnp.asarray(tgt_in)
        if tgt_in.ndim != 2 or tgt_in.shape[0] != jnp.shape(src)[0]:
            raise ValueError(
                f"tgt_in must have shape [B, T] with the batch of src {jnp.shape(src)}, got {tgt_in.shape}"
            )
        if not 0.0 <= teacher_forcing_ratio <= 1.0:
            raise ValueError(f"teacher_forcing_ratio must be in [0, 1], got {teacher_forcing_ratio!r}")
        if teacher_forcing_ratio < 1.0 and teacher_forcing_key is None:
            raise ValueError("teacher_forcing_ratio < 1 needs an explicit teacher_forcing_key")
        if return_attention and self.cfg.attention == "none":
            raise ValueError("return_attention needs attention='bahdanau' or 'luong', got attention='none'")
        encode_key, decode_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        state = self.encode(src, src_lengths, dropout_key=encode_key)
        if teacher_forcing_ratio == 1.0 and self.cfg.attention != "bahdanau":
            logits, weights = self._teacher_forced(state, tgt_in, decode_key)
        else:
            logits, weights = self._scan(state, tgt_in, teacher_forcing_ratio, teacher_forcing_key, decode_key)
        return (logits, weights) if return_attention else logits

    def _teacher_forced(self, state: Seq2SeqState, tgt_in: jax.Array, key):
        """All steps at once: one recurrent scan over the true previous tokens, then attention over all steps."""
        embed_key, rnn_key, out_key = (None,) * 3 if key is None else jax.random.split(key, 3)
        x = dropout(self.tgt_embed(tgt_in), self.cfg.dropout, embed_key)
        top = self.decoder(x, initial_carry=state.carry, dropout_key=rnn_key)
        context = weights = None
        if self.cfg.attention == "luong":
            context, weights = self._attend(state, top)
        return self._logits(state, top, context, out_key), weights

    def _scan(self, state: Seq2SeqState, tgt_in: jax.Array, ratio: float, forcing_key, key):
        """One lax.scan of decode_step over the T steps, choosing each input token by teacher forcing."""
        batch, length = tgt_in.shape
        if ratio < 1.0:
            teacher = jax.random.bernoulli(forcing_key, ratio, (length, batch)).at[0].set(True)
        else:
            teacher = jnp.ones((length, batch), bool)
        step_keys = None if key is None else jax.random.split(key, length)
        attention = self.cfg.attention != "none"

        def step(carry, xs):
            state, previous_logits = carry
            true_token, use_true, step_key = xs
            token = jnp.where(use_true, true_token, jnp.argmax(previous_logits, -1).astype(true_token.dtype))
            out = self.decode_step(state, token, dropout_key=step_key, return_attention=attention)
            logits, state = out[0], out[-1]
            return (state, logits), (logits, out[1] if attention else None)

        start = jnp.zeros((batch, self.cfg.tgt_vocab_size), jnp.float32)
        _, (logits, weights) = jax.lax.scan(step, (state, start), (tgt_in.T, teacher, step_keys))
        return logits.swapaxes(0, 1), None if weights is None else weights.swapaxes(0, 1)
