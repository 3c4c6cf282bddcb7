"""TextClassifier: every backbone x pooling runs, padding never leaks, lengths and masks agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.models.bert import BertConfig
from flaxlm.models.classifier import POOLINGS, ClassifierConfig, TextClassifier

VOCAB = 13
TINY_BERT = BertConfig(vocab_size=VOCAB, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                       max_position=8, dropout=0.1)
COMBOS = [(backbone, pooling) for backbone, poolings in POOLINGS.items() for pooling in poolings]


def config(backbone: str, pooling: str, **overrides) -> ClassifierConfig:
    fields = dict(
        vocab_size=VOCAB, num_classes=3, backbone=backbone, pooling=pooling, embed_dim=8, hidden_size=6,
        num_layers=2, dropout=0.1, num_filters=4, kernel_sizes=(2, 3), num_heads=2, mlp_dim=16, max_length=8,
        bert=TINY_BERT if backbone == "bert" else None,
    )
    return ClassifierConfig(**{**fields, **overrides})


TOKENS = np.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 0, 0, 0], [11, 12, 1, 2, 3, 0, 0]], np.int32)
LENGTHS = np.array([7, 3, 5], np.int32)


@pytest.mark.parametrize("backbone, pooling", COMBOS)
def test_padding_never_leaks(backbone, pooling):
    model = TextClassifier(config(backbone, pooling), rngs=nnx.Rngs(0))
    other_padding = np.where(np.arange(7) < LENGTHS[:, None], TOKENS, 12)

    @jax.jit
    def run(model):
        return (
            model(TOKENS, LENGTHS),
            model(other_padding, LENGTHS),
            model(TOKENS[2:, :5]),  # the last row alone, without padding
        )

    logits, repadded, alone = run(model)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(repadded, logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(alone[0], logits[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", ["bilstm", "transformer"])
def test_mask_equals_lengths_and_dropout_follows_the_key(backbone):
    model = TextClassifier(config(backbone, "mean"), rngs=nnx.Rngs(1))
    mask = np.arange(7)[None, :] < LENGTHS[:, None]
    expected = model(TOKENS, LENGTHS)
    np.testing.assert_allclose(model(TOKENS, mask=mask), expected, atol=1e-6, rtol=0)
    train = jax.jit(lambda m, k: m(TOKENS, LENGTHS, dropout_key=k))
    a = train(model, jax.random.key(0))
    np.testing.assert_array_equal(a, train(model, jax.random.key(0)))
    assert not np.allclose(a, train(model, jax.random.key(1)))
    assert not np.allclose(a, expected)


@pytest.mark.parametrize("backbone", ["bilstm", "cnn"])
def test_embedding_and_word_dropout_act_in_training_only(backbone):
    plain = TextClassifier(config(backbone, "max"), rngs=nnx.Rngs(1))
    noisy = TextClassifier(dataclasses.replace(config(backbone, "max"), embed_dropout=0.3, word_dropout=0.3),
                           rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(noisy(TOKENS, LENGTHS), plain(TOKENS, LENGTHS))
    key = jax.random.key(0)
    assert not np.allclose(noisy(TOKENS, LENGTHS, dropout_key=key), plain(TOKENS, LENGTHS, dropout_key=key))


def test_bilstm_last_joins_forward_end_and_backward_start():
    model = TextClassifier(config("bilstm", "last", num_layers=1), rngs=nnx.Rngs(2))
    x = model.embed(TOKENS)
    outputs = model.backbone(x, seq_lengths=LENGTHS)
    hidden = model.cfg.hidden_size
    rows = np.arange(3)
    expected = np.concatenate([outputs[rows, LENGTHS - 1, :hidden], outputs[:, 0, hidden:]], axis=-1)
    features = model._features(jnp.asarray(TOKENS), None, jnp.arange(7) < LENGTHS[:, None], LENGTHS, None)
    np.testing.assert_allclose(features, expected, atol=1e-6, rtol=0)


def test_attention_pooling_is_a_softmax_over_valid_positions_of_the_scoring_mlp():
    model = TextClassifier(config("bilstm", "attention", attention_hidden=5, head_hidden=4), rngs=nnx.Rngs(4))
    valid = np.arange(7)[None, :] < LENGTHS[:, None]
    outputs = np.asarray(model.backbone(model.embed(TOKENS), seq_lengths=LENGTHS))
    pooled, weights = model.attention_pool(jnp.asarray(outputs), jnp.asarray(valid))
    w_keys = np.asarray(model.attention_pool.keys.kernel[...])
    v = np.asarray(model.attention_pool.energy.kernel[...])[:, 0]
    scores = np.tanh(outputs @ w_keys) @ v
    expected = np.where(valid, np.exp(scores - np.where(valid, scores, -np.inf).max(-1, keepdims=True)), 0.0)
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(pooled, np.einsum("bt,btf->bf", expected, outputs), atol=1e-5, rtol=0)
    hidden = np.tanh(np.asarray(pooled) @ np.asarray(model.head_hidden.kernel[...]) + np.asarray(
        model.head_hidden.bias[...]))
    logits = hidden @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(model(TOKENS, LENGTHS), logits, atol=1e-5, rtol=0)


def test_attention_pooling_of_an_empty_sequence_is_zero():
    model = TextClassifier(config("lstm", "attention"), rngs=nnx.Rngs(5))
    hidden = jnp.ones((2, 4, model.backbone.out_features))
    valid = jnp.array([[True, True, False, False], [False] * 4])
    pooled, weights = model.attention_pool(hidden, valid)
    np.testing.assert_allclose(weights[0], [0.5, 0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(weights[1], 0.0)
    np.testing.assert_array_equal(pooled[1], 0.0)


def test_gradients_flow_to_every_parameter():
    model = TextClassifier(config("transformer", "cls"), rngs=nnx.Rngs(3))
    grads = jax.grad(lambda m: m(TOKENS, LENGTHS).sum())(model)
    norms = {jax.tree_util.keystr(p): float(jnp.abs(g).sum()) for p, g in jax.tree.leaves_with_path(grads)}
    assert norms and all(v > 0 for v in norms.values()), norms


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(backbone="gpt"), "ClassifierConfig.backbone"),
        (dict(pooling="cls"), "ClassifierConfig.pooling"),
        (dict(backbone="cnn", pooling="mean"), "ClassifierConfig.pooling"),
        (dict(num_classes=0), "ClassifierConfig.num_classes"),
        (dict(kernel_sizes=()), "ClassifierConfig.kernel_sizes"),
        (dict(num_heads=3), "ClassifierConfig.num_heads"),
        (dict(dropout=1.0), "ClassifierConfig.dropout"),
        (dict(word_dropout=-0.1), "ClassifierConfig.word_dropout"),
        (dict(head_hidden=-1), "ClassifierConfig.head_hidden"),
        (dict(pooling="attention", attention_hidden=0), "ClassifierConfig.attention_hidden"),
        (dict(backbone="cnn", pooling="attention"), "ClassifierConfig.pooling"),
        (dict(backbone="bert", pooling="cls"), "ClassifierConfig.bert"),
        (dict(backbone="bert", pooling="cls", bert=dataclasses.replace(TINY_BERT, vocab_size=99)),
         "ClassifierConfig.vocab_size"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    base = dict(vocab_size=VOCAB, num_classes=3, backbone="lstm", pooling="last")
    with pytest.raises(ValueError, match=field):
        ClassifierConfig(**{**base, **overrides})


def test_bad_inputs_are_rejected():
    model = TextClassifier(config("gru", "last"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lengths must have shape"):
        model(TOKENS, LENGTHS[:2])
    with pytest.raises(ValueError, match="at most one of lengths and mask"):
        model(TOKENS, LENGTHS, mask=TOKENS > 0)
    with pytest.raises(ValueError, match="token_types"):
        model(TOKENS, LENGTHS, token_types=np.zeros_like(TOKENS))
