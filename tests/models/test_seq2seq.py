"""Seq2Seq: teacher forcing equals step-by-step decoding, attention respects source padding, forcing ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.models.seq2seq import ATTENTIONS, Seq2Seq, Seq2SeqConfig

SRC = np.array([[3, 4, 5, 6, 2], [7, 8, 9, 0, 0], [5, 5, 0, 0, 0]], np.int32)
SRC_LENGTHS = np.array([5, 3, 2], np.int32)
TGT_IN = np.array([[1, 2, 3, 4], [1, 5, 6, 7], [1, 8, 0, 0]], np.int32)


def model(attention: str, seed: int = 0) -> Seq2Seq:
    cfg = Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=9, src_embed_dim=6, tgt_embed_dim=5, hidden_size=7,
                        num_layers=2, dropout=0.2, attention=attention)
    return Seq2Seq(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_teacher_forcing_equals_step_by_step(attention):
    m = model(attention)
    wants_weights = attention != "none"

    @jax.jit
    def run(m):
        full = m(SRC, SRC_LENGTHS, TGT_IN, return_attention=wants_weights)
        state = m.encode(SRC, SRC_LENGTHS)
        steps = []
        for t in range(TGT_IN.shape[1]):
            out = m.decode_step(state, TGT_IN[:, t], return_attention=wants_weights)
            state = out[-1]
            steps.append(out[:-1])
        return full, steps

    full, steps = run(m)
    logits = full[0] if wants_weights else full
    assert logits.shape == (3, 4, 9) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np.stack([s[0] for s in steps], 1), atol=1e-5, rtol=0)
    if wants_weights:
        np.testing.assert_allclose(full[1], np.stack([s[1] for s in steps], 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_attention_weights_cover_only_the_real_source(attention):
    m = model(attention, seed=1)
    logits, weights = m(SRC, SRC_LENGTHS, TGT_IN, return_attention=True)
    assert weights.shape == (3, 4, 5)
    valid = np.arange(5)[None, None, :] < SRC_LENGTHS[:, None, None]
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.asarray(weights)[~np.broadcast_to(valid, weights.shape)] == 0)
    assert np.all(np.asarray(weights)[np.broadcast_to(valid, weights.shape)] > 0)

    repadded = np.where(valid[:, 0], SRC, 9)
    logits2, weights2 = m(repadded, SRC_LENGTHS, TGT_IN, return_attention=True)
    np.testing.assert_allclose(logits2, logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(weights2, weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attention", ["none", "luong"])
def test_ratio_zero_feeds_the_models_own_argmax(attention):
    m = model(attention, seed=2)
    logits = m(SRC, SRC_LENGTHS, TGT_IN, teacher_forcing_ratio=0.0, teacher_forcing_key=jax.random.key(0))
    state = m.encode(SRC, SRC_LENGTHS)
    token, expected = TGT_IN[:, 0], []
    for _ in range(TGT_IN.shape[1]):
        step_logits, state = m.decode_step(state, token)
        expected.append(step_logits)
        token = jnp.argmax(step_logits, -1).astype(jnp.int32)
    np.testing.assert_allclose(logits, np.stack(expected, 1), atol=1e-5, rtol=0)


def test_partial_teacher_forcing_and_dropout_are_reproducible():
    m = model("bahdanau", seed=3)
    run = jax.jit(lambda m, k1, k2: m(SRC, SRC_LENGTHS, TGT_IN, teacher_forcing_ratio=0.5, teacher_forcing_key=k1,
                                     dropout_key=k2))
    a = run(m, jax.random.key(0), jax.random.key(1))
    np.testing.assert_array_equal(a, run(m, jax.random.key(0), jax.random.key(1)))
    assert not np.allclose(a, run(m, jax.random.key(0), jax.random.key(2)))
    assert np.all(np.isfinite(a))


def test_bad_arguments():
    m = model("none")
    with pytest.raises(ValueError, match="teacher_forcing_key"):
        m(SRC, SRC_LENGTHS, TGT_IN, teacher_forcing_ratio=0.5)
    with pytest.raises(ValueError, match="return_attention"):
        m(SRC, SRC_LENGTHS, TGT_IN, return_attention=True)
    with pytest.raises(ValueError, match="src_lengths must have shape"):
        m(SRC, SRC_LENGTHS[:2], TGT_IN)
    with pytest.raises(ValueError, match="tgt_in must have shape"):
        m(SRC, SRC_LENGTHS, TGT_IN[:2])
    for field, value in (("attention", "dot"), ("hidden_size", 0), ("dropout", -0.1)):
        with pytest.raises(ValueError, match=f"Seq2SeqConfig.{field}"):
            Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=9, **{field: value})
