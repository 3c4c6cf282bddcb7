"""Transformer (encoder-decoder): cached decoding equals the full forward, cross-attention respects padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(src_vocab_size=17, tgt_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=2,
                        num_decoder_layers=2, mlp_dim=32, max_length=10, dropout=0.1)
SRC = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [12, 13, 0, 0, 0, 0]], np.int32)
SRC_LENGTHS = np.array([6, 3, 2], np.int32)
TGT_IN = np.array([[1, 2, 3, 4, 5, 6, 7], [1, 8, 9, 10, 0, 0, 0], [1, 11, 12, 0, 0, 0, 0]], np.int32)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(norm_first=True, positions="learned", share_embeddings=True, tgt_vocab_size=17, tie_output=False)],
    ids=["post-norm", "pre-norm-learned-shared"],
)
def test_cached_decoding_equals_full_forward(overrides):
    model = Transformer(dataclasses.replace(CFG, **overrides), rngs=nnx.Rngs(0))

    @jax.jit
    def run(model):
        full = model(SRC, SRC_LENGTHS, TGT_IN)
        memory = model.encode(SRC, SRC_LENGTHS)
        logits, cache = model.decode(TGT_IN[:, :3], memory, SRC_LENGTHS, cache=model.init_cache(3, 8))
        pieces = [logits]
        for t in range(3, 7):
            logits, cache = model.decode(TGT_IN[:, t : t + 1], memory, SRC_LENGTHS, cache=cache)
            pieces.append(logits)
        return full, jnp.concatenate(pieces, axis=1)

    full, cached = run(model)
    assert full.shape == (3, 7, overrides.get("tgt_vocab_size", 13)) and full.dtype == jnp.float32
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


def test_cross_attention_weights_and_source_padding():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    valid = np.arange(6)[None, :] < SRC_LENGTHS[:, None]
    repadded = np.where(valid, SRC, 16)

    @jax.jit
    def run(model):
        return (model(SRC, SRC_LENGTHS, TGT_IN, return_attention=True), model(SRC, SRC_LENGTHS, TGT_IN),
                model(repadded, valid, TGT_IN))

    (logits, weights), plain, repadded_logits = run(model)
    assert weights.shape == (2, 3, 2, 7, 6)  # [L, B, H, T, S]
    np.testing.assert_allclose(logits, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(repadded_logits, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    padded = np.broadcast_to(~valid[None, :, None, None, :], weights.shape)
    assert np.all(np.asarray(weights)[padded] == 0)


def test_embedding_options_and_dropout():
    shared = Transformer(dataclasses.replace(CFG, tgt_vocab_size=17, share_embeddings=True), rngs=nnx.Rngs(0))
    assert shared.tgt_embed is None and shared.output is None
    untied = Transformer(dataclasses.replace(CFG, tie_output=False), rngs=nnx.Rngs(0))
    assert untied.output.kernel.shape == (16, 13)
    train = jax.jit(lambda m, k: m(SRC, SRC_LENGTHS, TGT_IN, dropout_key=k))
    a = train(shared, jax.random.key(0))
    np.testing.assert_array_equal(a, train(shared, jax.random.key(0)))
    assert not np.allclose(a, train(shared, jax.random.key(1)))


def test_bad_inputs_and_configs():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="source lengths must have shape"):
        model(SRC, SRC_LENGTHS[:2], TGT_IN)
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(3, 11)
    with pytest.raises(ValueError, match="outside"):
        model(SRC, SRC_LENGTHS, np.ones((3, 11), np.int32))
    for field, value in (("num_heads", 3), ("positions", "rope"), ("activation", "tanh"), ("dropout", 1.0),
                         ("share_embeddings", True)):
        with pytest.raises(ValueError, match=f"TransformerConfig.{field}"):
            dataclasses.replace(CFG, **{field: value})
