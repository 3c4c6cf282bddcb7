"""flaxlm.ops.dense: flattened contractions equal the einsums they replace, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.dense import apply_to_rows, dense

KEYS = jax.random.split(jax.random.key(0), 3)


@pytest.mark.parametrize("x_shape, w_shape, contract, spec", [
    ((2, 5, 6), (6, 3, 2, 4), 1, "btf,fjhd->btjhd"),
    ((2, 5, 2, 4), (2, 4, 6), 2, "bthd,hdf->btf"),
    ((7, 6), (6, 3), 1, "nf,fg->ng"),
])
def test_dense_equals_einsum_with_gradients(x_shape, w_shape, contract, spec):
    x = jax.random.normal(KEYS[0], x_shape)
    w = jax.random.normal(KEYS[1], w_shape)
    np.testing.assert_allclose(dense(x, w, contract), jnp.einsum(spec, x, w), atol=1e-5, rtol=0)
    grads = jax.grad(lambda x, w: (dense(x, w, contract) ** 2).sum(), argnums=(0, 1))(x, w)
    expected = jax.grad(lambda x, w: (jnp.einsum(spec, x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_dense_names_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"x \(2, 5, 6\), kernel \(5, 3\)"):
        dense(jnp.ones((2, 5, 6)), jnp.ones((5, 3)))


def test_apply_to_rows_keeps_the_leading_axes():
    x = jax.random.normal(KEYS[2], (2, 3, 4))
    w = jnp.arange(20.0).reshape(4, 5)
    out = apply_to_rows(lambda rows: rows @ w, x)
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out, x @ w, atol=1e-5, rtol=0)
