"""flaxlm.nn.cnn.Conv1DTextEncoder: parity with torch Conv1d + max-over-time, masking, short sequences, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.nn.cnn import Conv1DTextEncoder
from flaxlm.ops.masks import padding_mask

B, T, F, N = 3, 7, 4, 5
KERNELS = (2, 3, 5)


def make_encoder(activation="relu", **kwargs):
    return Conv1DTextEncoder(F, N, KERNELS, activation=activation, rngs=nnx.Rngs(0), **kwargs)


def make_x(seed=0, length=T):
    return np.random.default_rng(seed).normal(size=(B, length, F)).astype(np.float32)


def torch_features(torch, encoder, x_row, activation):
    """Features of one unpadded sequence x_row [t, F] (torch tensor): torch conv1d with the encoder's weights,
    activation, max_pool1d over all positions; a sequence shorter than K is first zero-padded to K."""
    x = x_row.T[None]  # [1, F, t]
    feats = []
    for kernel, bias, k in zip(encoder.kernels, encoder.biases, KERNELS):
        weight = torch.tensor(np.asarray(kernel[...]).transpose(2, 1, 0))  # [N, F, K], torch Conv1d layout
        inp = torch.nn.functional.pad(x, (0, max(k - x.shape[-1], 0)))
        y = getattr(torch, activation)(torch.nn.functional.conv1d(inp, weight, torch.tensor(np.asarray(bias[...]))))
        feats.append(torch.nn.functional.max_pool1d(y, y.shape[-1])[0, :, 0])
    return torch.cat(feats)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_matches_torch_conv1d_max_pool(activation):
    torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")
    encoder = make_encoder(activation)
    x = make_x()
    lengths = [T, 4, 1]  # full, longer than some kernels, shorter than all but padded to K
    got = encoder(jnp.asarray(x), seq_lengths=jnp.array(lengths))
    assert got.shape == (B, N * len(KERNELS))
    for b, n in enumerate(lengths):
        ref = torch_features(torch, encoder, torch.tensor(x[b, :n]), activation).detach().numpy()
        assert np.abs(np.asarray(got[b]) - ref).max() <= 1e-5

    x_t = torch.tensor(x, requires_grad=True)
    ref_full = torch.stack([torch_features(torch, encoder, x_t[b], activation) for b in range(B)])
    ref_full.square().sum().backward()
    grad = jax.grad(lambda v: jnp.sum(encoder(v) ** 2))(jnp.asarray(x))
    assert np.abs(np.asarray(encoder(jnp.asarray(x))) - ref_full.detach().numpy()).max() <= 1e-5
    assert np.abs(np.asarray(grad) - x_t.grad.numpy()).max() <= 1e-4


def test_sequence_shorter_than_widest_kernel_and_empty_sequence():
    encoder = make_encoder()
    x = make_x(1, length=2)  # T = 2 < 5: the time axis is zero-padded to the widest kernel
    got = encoder(jnp.asarray(x), seq_lengths=jnp.array([2, 1, 0]))
    padded = np.concatenate([x, np.zeros((B, 3, F), np.float32)], axis=1)
    same = encoder(jnp.asarray(padded), seq_lengths=jnp.array([2, 1, 0]))
    np.testing.assert_allclose(got, same, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)  # length 0: all-zero features
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda v: encoder(v, seq_lengths=jnp.array([2, 1, 0])).sum())(x))))


def test_mask_equals_seq_lengths_and_bad_inputs():
    encoder = make_encoder()
    x, lengths = jnp.asarray(make_x()), jnp.array([7, 3, 0])
    np.testing.assert_array_equal(encoder(x, mask=padding_mask(lengths, T)), encoder(x, seq_lengths=lengths))
    with pytest.raises(ValueError, match="left-aligned"):
        encoder(x, mask=jnp.ones((B, T), bool).at[0, 0].set(False))
    with pytest.raises(ValueError, match="at most one"):
        encoder(x, mask=padding_mask(lengths, T), seq_lengths=lengths)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\] = \(3, 7\), got \(3, 6\)"):
        encoder(x, mask=jnp.ones((B, T - 1), bool))
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \[B\] = \(3,\).*\(2,\)"):
        encoder(x, seq_lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, T=7\].*8"):
        encoder(x, seq_lengths=jnp.array([8, 1, 1]))
    with pytest.raises(ValueError, match=r"\[B, T, F\].*\(3, 4\)"):
        encoder(x[:, 0])
    with pytest.raises(ValueError, match=r"3 features.*expected F=4"):
        encoder(x[..., :3])
    with pytest.raises(ValueError, match="kernel_sizes"):
        Conv1DTextEncoder(F, N, (3, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        Conv1DTextEncoder(F, N, activation="swish", rngs=nnx.Rngs(0))


def test_dropout_keyed_and_jit():
    encoder = make_encoder(dropout_rate=0.5)
    x = jnp.asarray(make_x())
    key = jax.random.key(3)
    eval_out = encoder(x)
    train_out = jax.jit(lambda m, v, k: m(v, dropout_key=k))(encoder, x, key)
    kept = train_out != 0
    assert 0 < int(kept.sum()) < kept.size
    np.testing.assert_allclose(train_out[kept], 2.0 * eval_out[kept], rtol=1e-6)
    assert encoder.kernels[1].get_metadata()["out_sharding"] == ("conv_window", "embed", None)


_pool = jax.jit(lambda x, n: make_encoder()(x, seq_lengths=n))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, T), min_size=B, max_size=B), seed=st.integers(0, 2**16))
def test_padding_never_changes_pooled_features(lengths, seed):
    lengths = jnp.array(lengths)
    x = jnp.asarray(make_x(seed))
    noise = jnp.asarray(np.random.default_rng(seed + 1).normal(size=x.shape) * 100, jnp.float32)
    padded = jnp.where(jnp.arange(T)[None, :, None] >= lengths[:, None, None], noise, x)
    np.testing.assert_array_equal(_pool(x, lengths), _pool(padded, lengths))
