"""GPT: causality, cached decoding equals the full forward, vmap over seeds, config validation, nanoGPT init."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=23, block_size=10, n_layer=2, n_head=2, n_embd=16)
MODEL = GPT(CFG, rngs=nnx.Rngs(0))
FORWARD = jax.jit(lambda m, t: m(t))


@settings(max_examples=15, deadline=None)
@given(
    data=st.lists(st.integers(0, 22), min_size=20, max_size=20),
    t=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_at_t_ignores_later_tokens(data, t, seed):
    tokens = np.asarray(data, np.int32).reshape(2, 10)
    changed = tokens.copy()
    changed[:, t + 1:] = np.random.default_rng(seed).integers(0, 23, (2, 9 - t))
    a, b = FORWARD(MODEL, tokens), FORWARD(MODEL, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])


@pytest.mark.parametrize("bias, tie", [(True, True), (False, False)])
def test_cached_decoding_equals_full_forward(bias, tie):
    cfg = dataclasses.replace(CFG, bias=bias, tie_embeddings=tie)
    model = GPT(cfg, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(0).integers(0, 23, (3, 9)).astype(np.int32)
    full = FORWARD(model, tokens)
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    logits, cache = step(model, tokens[:, :4], model.init_cache(3))  # prefill the prompt in one pass
    pieces = [logits]
    for t in range(4, 9):
        logits, cache = step(model, tokens[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.index, [9, 9])


def test_vmap_over_keys_builds_independent_models():
    keys = jax.random.split(jax.random.key(7), 4)
    models = jax.jit(jax.vmap(lambda k: GPT(CFG, rngs=nnx.Rngs(k))))(keys)
    assert models.wte.embedding.shape == (4, 23, 16)
    assert models.blocks.layers.self_attn.qkv_kernel.shape == (4, 2, 16, 3, 2, 8)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    logits = jax.jit(jax.vmap(lambda m: m(tokens)))(models)
    assert logits.shape == (4, 2, 6, 23)
    single = GPT(CFG, rngs=nnx.Rngs(keys[2]))
    np.testing.assert_allclose(logits[2], FORWARD(single, tokens), atol=1e-6, rtol=0)
    assert not np.allclose(logits[0], logits[1])


def test_nanogpt_initialisation_and_logical_axes():
    model = MODEL
    layers = model.blocks.layers
    np.testing.assert_allclose(np.std(layers.self_attn.qkv_kernel[...]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(layers.ffn.down.kernel[...]), 0.02 / math.sqrt(2 * CFG.n_layer), rtol=0.1)
    np.testing.assert_allclose(np.std(model.wte.embedding[...]), 0.02, rtol=0.15)
    np.testing.assert_array_equal(layers.self_attn.qkv_bias[...], 0)
    assert model.wte.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert layers.ffn.up.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")

    no_bias = GPT(dataclasses.replace(CFG, bias=False), rngs=nnx.Rngs(0))
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(nnx.state(no_bias))}
    assert not any("bias" in n for n in names), names


def test_dropout_is_driven_by_the_key():
    model = GPT(dataclasses.replace(CFG, dropout=0.2), rngs=nnx.Rngs(0))
    tokens = np.arange(10, dtype=np.int32).reshape(1, 10) % 23
    train = jax.jit(lambda m, k: m(tokens, dropout_key=k))
    a, b = train(model, jax.random.key(0)), train(model, jax.random.key(1))
    np.testing.assert_array_equal(a, train(model, jax.random.key(0)))
    assert not np.allclose(a, b)
    assert not np.allclose(a, FORWARD(model, tokens))


def test_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="T=11 exceeds block_size=10"):
        MODEL(np.zeros((1, 11), np.int32))
    with pytest.raises(ValueError, match="tokens must have shape"):
        MODEL(np.zeros((11,), np.int32))
    with pytest.raises(ValueError, match="max_length"):
        MODEL.init_cache(1, 11)
    with pytest.raises(ValueError, match="outside"):
        MODEL(np.full((1, 3), 23, np.int32))
    for field, value in (("n_head", 3), ("vocab_size", 0), ("dropout", 1.0), ("block_size", 2.5)):
        with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
            dataclasses.replace(CFG, **{field: value})
