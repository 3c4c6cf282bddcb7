"""BertMLM: its encoder transplants into TextClassifier(backbone='bert'), padding is masked, mask_tokens' 80/10/10."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.models.bert import BertConfig, BertMLM, mask_tokens
from flaxlm.models.classifier import ClassifierConfig, TextClassifier

CFG = BertConfig(vocab_size=31, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=12,
                 dropout=0.1)
TOKENS = np.array([[1, 5, 6, 7, 8, 2, 0, 0], [1, 9, 10, 2, 11, 12, 2, 0]], np.int32)
TYPES = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]], np.int32)
LENGTHS = np.array([6, 7], np.int32)


def test_pretrained_encoder_transplants_into_the_classifier():
    mlm = BertMLM(CFG, rngs=nnx.Rngs(0))
    classifier = TextClassifier(
        ClassifierConfig(vocab_size=31, num_classes=4, backbone="bert", pooling="cls", bert=CFG), rngs=nnx.Rngs(1)
    )
    pretrained = nnx.state(mlm.encoder)
    assert jax.tree.structure(nnx.state(classifier.backbone)) == jax.tree.structure(pretrained)
    assert nnx.graphdef(classifier.backbone) == nnx.graphdef(mlm.encoder)

    nnx.update(classifier.backbone, pretrained)
    for a, b in zip(jax.tree.leaves(nnx.state(classifier.backbone)), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(a, b)

    @jax.jit
    def run(mlm, classifier):
        features = classifier.backbone.pool(classifier.backbone(TOKENS, TYPES, LENGTHS))
        expected = classifier.head(mlm.pooled(TOKENS, TYPES, LENGTHS))
        return features, mlm.pooled(TOKENS, TYPES, LENGTHS), classifier(TOKENS, LENGTHS, token_types=TYPES), expected

    features, pooled, logits, expected = run(mlm, classifier)
    np.testing.assert_allclose(features, pooled, atol=1e-6, rtol=0)
    np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0)


def test_mlm_logits_padding_token_types_and_tying():
    mlm = BertMLM(CFG, rngs=nnx.Rngs(0))
    repadded = np.where(np.arange(8) < LENGTHS[:, None], TOKENS, 30)

    @jax.jit
    def run(mlm):
        return (mlm(TOKENS, TYPES, LENGTHS), mlm(repadded, TYPES, LENGTHS),
                mlm(TOKENS, None, LENGTHS), mlm(TOKENS, TYPES, mask=np.arange(8) < LENGTHS[:, None]))

    logits, logits_repadded, no_types, masked = run(mlm)
    assert logits.shape == (2, 8, 31) and logits.dtype == jnp.float32
    valid = np.arange(8) < LENGTHS[:, None]
    np.testing.assert_allclose(np.asarray(logits_repadded)[valid], np.asarray(logits)[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(masked, logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(no_types[0], logits[0], atol=1e-6, rtol=0)  # row 0 is all type 0
    assert not np.allclose(no_types[1], logits[1])
    assert "decoder" not in str(nnx.state(mlm))  # the output projection is the token embedding


def test_mlm_gradients_and_dropout():
    mlm = BertMLM(CFG, rngs=nnx.Rngs(0))

    def loss(m, key):
        return jnp.mean(m(TOKENS, TYPES, LENGTHS, dropout_key=key) ** 2)

    train_loss = jax.jit(loss)
    assert train_loss(mlm, jax.random.key(0)) != train_loss(mlm, jax.random.key(1))
    grads = jax.jit(jax.grad(loss))(mlm, None)
    assert float(jnp.abs(grads.encoder.token_embed.embedding[...]).sum()) > 0
    assert float(jnp.abs(grads.encoder.layers.layers.ffn.up.kernel[...]).sum()) > 0
    assert float(jnp.abs(grads.mlm_bias[...]).sum()) > 0


def test_mask_tokens_follows_the_80_10_10_rule():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 1000, (64, 256)).astype(np.int32)
    tokens[:, 0] = 1  # [CLS]
    tokens[:, -40:] = 0  # [PAD]
    special = (0, 1, 2)
    inputs, selected = mask_tokens(tokens, jax.random.key(0), mask_id=3, vocab_size=1000, special_ids=special)
    inputs, selected = np.asarray(inputs), np.asarray(selected)
    candidates = ~np.isin(tokens, special)
    assert not selected[~candidates].any()
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
    assert abs(selected[candidates].mean() - 0.15) < 0.01
    picked_in, picked_orig = inputs[selected], tokens[selected]
    masked = picked_in == 3
    kept = picked_in == picked_orig
    randomised = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02
    assert abs(randomised.mean() - 0.1) < 0.02
    assert len(np.unique(picked_in[randomised])) > 100
    again, _ = mask_tokens(tokens, jax.random.key(0), mask_id=3, vocab_size=1000, special_ids=special)
    np.testing.assert_array_equal(again, inputs)


def test_bad_inputs_and_configs():
    mlm = BertMLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_length=12"):
        mlm(np.ones((1, 13), np.int32))
    with pytest.raises(ValueError, match="token_types must have the shape"):
        mlm(TOKENS, TYPES[:, :4])
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(TOKENS, jax.random.key(0), mask_id=3, vocab_size=31, mask_prob=0.0)
    for field, value in (("num_heads", 3), ("max_position", 0), ("dropout", 1.5), ("layer_norm_eps", 0.0)):
        with pytest.raises(ValueError, match=f"BertConfig.{field}"):
            dataclasses.replace(CFG, **{field: value})
