"""sinusoidal_positions against the PyTorch tutorial table; apply_rope against a rotate-half reference."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.positions import apply_rope, sinusoidal_positions

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")


def _torch_tutorial_table(length, dim):
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.numpy()


def _torch_rope(x, positions, base):
    """Llama/GPT-NeoX rotate-half rope on [B, T, H, D]."""
    x = torch.tensor(x)
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return (x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()).numpy()


def test_sinusoidal_matches_torch_tutorial():
    table = sinusoidal_positions(50, 16)
    assert table.shape == (50, 16) and table.dtype == jnp.float32
    np.testing.assert_allclose(table, _torch_tutorial_table(50, 16), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(table[0], np.tile([0.0, 1.0], 8))


def test_sinusoidal_odd_dim_and_bad_args():
    np.testing.assert_allclose(sinusoidal_positions(7, 5), _odd_reference(7, 5), atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_positions(4, 0)


def _odd_reference(length, dim):
    """Column j: sin (j even) or cos (j odd) of t / 10000^((j - j % 2) / dim), written out per column."""
    pos = np.arange(length)[:, None]
    out = np.zeros((length, dim))
    for j in range(dim):
        angle = pos[:, 0] / 10000 ** ((j - j % 2) / dim)
        out[:, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return out


@pytest.mark.parametrize("positions_shape", ["T", "BT"])
def test_rope_matches_rotate_half_reference(positions_shape):
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 8), dtype=np.float32)
    positions = np.arange(5) + 3 if positions_shape == "T" else np.array([np.arange(5), np.arange(5) + 7])
    out = apply_rope(x, positions, base=500.0)
    np.testing.assert_allclose(out, _torch_rope(x, positions, 500.0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 1, 16), dtype=np.float32)
    k = rng.standard_normal((1, 1, 1, 16), dtype=np.float32)

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n]))))

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_rope_keeps_dtype_and_validates():
    x = jnp.ones((1, 4, 2, 6), jnp.bfloat16)
    assert apply_rope(x, jnp.arange(4)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="even"):
        apply_rope(jnp.ones((1, 4, 2, 5)), jnp.arange(4))
    with pytest.raises(ValueError, match=r"positions.*\(3,\)"):
        apply_rope(x, jnp.arange(3))
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        apply_rope(jnp.ones((4, 2, 6)), jnp.arange(4))
