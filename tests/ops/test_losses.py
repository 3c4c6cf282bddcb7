"""Losses: parity with torch.nn.functional, normalisation by real tokens, penalties over parameter subsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.losses import (
    l1_penalty,
    l2_penalty,
    mse,
    sequence_cross_entropy,
    soft_target_cross_entropy,
    softmax_cross_entropy,
)

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")
F = torch.nn.functional

B, T, V = 3, 5, 7


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
    labels[0, 3:] = -100
    labels[2, 1] = -100
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch_with_ignore_index(smoothing):
    logits, labels = _data()
    expected = F.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(labels).reshape(-1),
        ignore_index=-100, label_smoothing=smoothing, reduction="none",
    ).reshape(B, T).numpy()
    weights = (labels != -100).astype(np.float32)
    labels = jnp.asarray(labels, jnp.int32)
    got = softmax_cross_entropy(jnp.asarray(logits), labels, weights=weights, label_smoothing=smoothing)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sequence_cross_entropy_is_mean_over_real_tokens(smoothing):
    logits, labels = _data(1)
    expected = F.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(labels).reshape(-1),
        ignore_index=-100, label_smoothing=smoothing,
    ).item()
    mask = labels != -100
    targets = jnp.asarray(labels, jnp.int32)
    loss_sum, count = sequence_cross_entropy(jnp.asarray(logits), targets, mask, label_smoothing=smoothing)
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(loss_sum / count), expected, rtol=1e-5)


def test_sequence_cross_entropy_ignores_padding_content_and_length():
    logits, labels = _data(2)
    mask = labels != -100
    base = sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), mask)
    padded_logits = np.concatenate([logits, np.full((B, 4, V), 1e4, np.float32)], axis=1)
    padded_labels = np.concatenate([labels, np.full((B, 4), -100)], axis=1)
    padded_mask = padded_labels != -100
    padded = sequence_cross_entropy(jnp.asarray(padded_logits), jnp.asarray(padded_labels, jnp.int32), padded_mask)
    np.testing.assert_allclose(padded, base, rtol=1e-6)


def test_unmasked_out_of_range_label_is_nan_not_clamped():
    logits, labels = _data(3)
    labels[1, 2] = V
    loss = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), weights=(labels != -100))
    assert np.isnan(loss[1, 2]) and np.isfinite(np.delete(np.asarray(loss).ravel(), 1 * T + 2)).all()


def test_soft_targets_match_torch():
    logits, _ = _data(4)
    probs = np.random.default_rng(5).dirichlet(np.ones(V), size=(B, T)).astype(np.float32)
    expected = F.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(probs).reshape(-1, V), reduction="none"
    ).reshape(B, T).numpy()
    got = soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(probs))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_mse_matches_torch_and_weights_select_elements():
    rng = np.random.default_rng(6)
    pred, target = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 4)).astype(np.float32)
    expected = F.mse_loss(torch.from_numpy(pred), torch.from_numpy(target)).item()
    np.testing.assert_allclose(float(mse(jnp.asarray(pred), jnp.asarray(target))), expected, rtol=1e-6)
    row_mask = np.array([[1.0], [0.0]])[:, :, None]
    first_row = np.mean((pred[0] - target[0]) ** 2)
    np.testing.assert_allclose(float(mse(pred, target, weights=row_mask)), first_row, rtol=1e-6)


def test_penalties_cover_kernels_only_by_default():
    tree = {
        "dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 5.0)},
        "norm": {"scale": jnp.full((3,), 7.0)},
        "embed": {"embedding": jnp.full((4, 2), 9.0)},
        "out": {"kernel": jnp.full((3, 1), -1.0)},
    }
    assert float(l2_penalty(tree)) == 6 * 4.0 + 3 * 1.0
    assert float(l1_penalty(tree)) == 6 * 2.0 + 3 * 1.0
    everything = lambda names, leaf: True
    assert float(l2_penalty(tree, everything)) == 24 + 3 * 25 + 3 * 49 + 8 * 81 + 3


def test_l2_penalty_gradient_is_weight():
    tree = {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}
    grads = jax.grad(lambda t: 0.5 * l2_penalty(t))(tree)
    np.testing.assert_array_equal(grads["kernel"], tree["kernel"])
    np.testing.assert_array_equal(grads["bias"], 0.0)
