"""Beam search over a decoder's step function: the Flax wmt example's alive and finished sets, fairseq's EOS rule.

Every source keeps K = beam_size alive hypotheses and a separate set of up to K finished ones. Each step extends
every alive hypothesis by every token and keeps the 2K candidates with the highest summed log-probability (2K,
so that at least K of them do not end in EOS). The K best candidates not ending in EOS stay alive. A candidate
ending in EOS joins the finished set when it ranks among the K best candidates of its step (fairseq's rule);
the finished set keeps the K best by score / lp, GNMT's length penalty lp = ((5 + length) / 6) ** alpha with
length counting the EOS.

A source is done, its finished set frozen, once the set is full and no alive hypothesis scores higher than the
set's worst member: scores only fall as hypotheses grow, so with alpha = 0 nothing could enter the set anymore
(with alpha > 0 longer hypotheses that would gain from the penalty are not waited for, as in fairseq). With
K = 1 this is exactly greedy decoding. At max_length a source without any finished hypothesis returns its best
alive one. The loop is one `jax.lax.scan` of max_length steps.
"""

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp


class Decoder(Protocol):
    """A model's decoder seen one token at a time. Row n of the state belongs to hypothesis n."""

    def step(self, state, tokens: jax.Array):
        """tokens [N] -> (logits [N, V], new_state)."""

    def reorder(self, state, rows: jax.Array):
        """rows [N] -> the state whose row n is the old state's row rows[n]."""


class Beams(NamedTuple):
    """Alive hypotheses: tokens [B, K, T] (eos_id beyond the current step), scores [B, K] summed log-probs,
    sorted best first. Finished: tokens [B, K, T], scores [B, K], ranks [B, K] (score / lp, -inf at empty slots)
    and flags [B, K], sorted by rank, best first."""

    alive_tokens: jax.Array
    alive_scores: jax.Array
    finished_tokens: jax.Array
    finished_scores: jax.Array
    finished_ranks: jax.Array
    finished: jax.Array


def length_penalty_factor(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's lp = ((5 + length) / 6) ** alpha; alpha = 0 ranks by the raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, ...], index [B, M] -> x[b, index[b, m], ...] of shape [B, M, ...]."""
    return jax.vmap(lambda row, i: row[i])(x, index)


def run_beam_search(decoder: Decoder, state, *, batch: int, bos_id: int, eos_id: int, max_length: int,
                    beam_size: int, length_penalty: float) -> tuple[jax.Array, jax.Array]:
    """state: the decoder state of B * K rows, row b * K + k for source b (each source repeated K times).

    Returns tokens [B, max_length] int32 (without BOS, eos_id after the first EOS) and scores [B] float32, the
    summed log-probability of the chosen hypothesis up to and including its EOS.
    """
    k = beam_size
    neg_inf = jnp.float32(-jnp.inf)
    beams = Beams(
        alive_tokens=jnp.full((batch, k, max_length), eos_id, jnp.int32),
        alive_scores=jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (batch, k)),
        finished_tokens=jnp.full((batch, k, max_length), eos_id, jnp.int32),
        finished_scores=jnp.zeros((batch, k), jnp.float32),
        finished_ranks=jnp.full((batch, k), neg_inf),
        finished=jnp.zeros((batch, k), bool),
    )

    def body(carry, t):
        beams, state, last = carry
        logits, state = decoder.step(state, last)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, -1)
        vocab = log_probs.shape[-1]
        totals = (beams.alive_scores[:, :, None] + log_probs).reshape(batch, k * vocab)
        scores, index = jax.lax.top_k(totals, 2 * k)
        origin, token = index // vocab, (index % vocab).astype(jnp.int32)
        tokens = _take(beams.alive_tokens, origin).at[:, :, t].set(token)
        is_eos = token == eos_id

        alive_scores, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, scores), k)
        done = jnp.all(beams.finished, axis=1) & (beams.alive_scores[:, 0] <= jnp.min(beams.finished_scores, axis=1))
        joins = is_eos & (jnp.arange(2 * k) < k) & jnp.isfinite(scores) & ~done[:, None]
        ranks = jnp.where(joins, scores / length_penalty_factor(t + 1.0, length_penalty), neg_inf)
        finished_ranks, keep = jax.lax.top_k(jnp.concatenate([beams.finished_ranks, ranks], axis=1), k)
        beams = Beams(
            alive_tokens=_take(tokens, pick),
            alive_scores=alive_scores,
            finished_tokens=_take(jnp.concatenate([beams.finished_tokens, tokens], axis=1), keep),
            finished_scores=_take(jnp.concatenate([beams.finished_scores, scores], axis=1), keep),
            finished_ranks=finished_ranks,
            finished=_take(jnp.concatenate([beams.finished, joins], axis=1), keep),
        )
        rows = (jnp.arange(batch)[:, None] * k + _take(origin, pick)).reshape(-1)
        return (beams, decoder.reorder(state, rows), _take(token, pick).reshape(-1)), None

    start = (beams, state, jnp.full((batch * k,), bos_id, jnp.int32))
    (beams, _, _), _ = jax.lax.scan(body, start, jnp.arange(max_length))
    has_finished = beams.finished[:, 0]
    tokens = jnp.where(has_finished[:, None], beams.finished_tokens[:, 0], beams.alive_tokens[:, 0])
    scores = jnp.where(has_finished, beams.finished_scores[:, 0], beams.alive_scores[:, 0])
    return tokens, scores
