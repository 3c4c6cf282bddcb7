"""A tiny language model and its loss for the training-engine tests (swap in flaxlm.models.GPT later).

TinyLM: token embedding -> LayerNorm -> Linear + GELU (+ dropout) -> Linear to vocabulary logits, every
parameter named with logical axes. `lm_loss` follows the train step's contract: (loss SUM, counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.ops.dropout import dropout
from flaxlm.ops.losses import sequence_cross_entropy

VOCAB, EMBED, HIDDEN = 32, 16, 32


class TinyLM(nnx.Module):
    """ids [B, T] -> logits [B, T, V]."""

    def __init__(
        self, vocab: int = VOCAB, embed: int = EMBED, hidden: int = HIDDEN, *, dropout_rate: float = 0.0, rngs: nnx.Rngs
    ):
        part = nnx.with_partitioning
        init = nnx.initializers
        self.embed = nnx.Embed(vocab, embed, embedding_init=part(init.normal(1.0), ("vocab", "embed")), rngs=rngs)
        self.norm = nnx.LayerNorm(
            embed, scale_init=part(init.ones, ("embed",)), bias_init=part(init.zeros, ("embed",)), rngs=rngs
        )
        self.hidden = nnx.Linear(
            embed, hidden, kernel_init=part(init.lecun_normal(), ("embed", "mlp")),
            bias_init=part(init.normal(0.1), ("mlp",)), rngs=rngs,
        )
        self.out = nnx.Linear(
            hidden, vocab, kernel_init=part(init.lecun_normal(), ("mlp", "vocab")),
            bias_init=part(init.normal(0.1), ("vocab",)), rngs=rngs,
        )
        self.dropout_rate = dropout_rate

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        h = jax.nn.gelu(self.hidden(self.norm(self.embed(ids))))
        return self.out(dropout(h, self.dropout_rate, dropout_key))


def make_model(seed, *, dropout_rate: float = 0.0) -> TinyLM:
    """TinyLM from an int seed or a PRNG key (traceable under jax.vmap)."""
    return TinyLM(dropout_rate=dropout_rate, rngs=nnx.Rngs(seed))


def lm_loss(model, batch, dropout_key):
    """(summed token cross-entropy, {'weight': real tokens, 'correct': correct predictions})."""
    logits = model(batch["inputs"], dropout_key=dropout_key)
    loss_sum, count = sequence_cross_entropy(logits, batch["targets"], batch["mask"])
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]) * batch["mask"]
    return loss_sum, {"weight": count, "correct": jnp.sum(hits).astype(jnp.float32)}


def make_batch(seed: int, batch: int = 8, length: int = 8, *, pad_rows=()) -> dict[str, np.ndarray]:
    """Numpy LM batch of counting sequences (next = token + 1 mod V, from random starts: learnable fast);
    a tenth of the tokens are random. Rows in `pad_rows` keep only their first (row % length) + 1 tokens."""
    rng = np.random.default_rng(seed)
    tokens = (rng.integers(0, VOCAB, size=(batch, 1)) + np.arange(length + 1)) % VOCAB
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, VOCAB, size=tokens.shape), tokens).astype(np.int32)
    mask = np.ones((batch, length), np.float32)
    for row in pad_rows:
        mask[row, row % length + 1 :] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
