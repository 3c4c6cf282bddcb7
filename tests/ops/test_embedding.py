"""embedding_lookup: gathers rows, rejects concrete out-of-range ids, gives NaN rows for traced ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.embedding import embedding_lookup

TABLE = jnp.arange(12.0).reshape(4, 3)


def test_lookup_gathers_rows():
    ids = np.array([[0, 3], [2, 2]])
    np.testing.assert_array_equal(embedding_lookup(TABLE, ids), np.asarray(TABLE)[ids])
    assert embedding_lookup(TABLE, jnp.int32(1)).shape == (3,)


@pytest.mark.parametrize("ids, bad, index", [([[0, 1], [4, 2]], 4, "(1, 0)"), ([1, -1, 9], -1, "(1,)")])
def test_concrete_out_of_range_raises_naming_id_index_and_vocab(ids, bad, index):
    with pytest.raises(ValueError) as info:
        embedding_lookup(TABLE, jnp.array(ids))
    message = str(info.value)
    assert f"id {bad} " in message and index in message and "[0, 4)" in message


def test_traced_out_of_range_gives_nan_rows():
    out = jax.jit(embedding_lookup)(TABLE, jnp.array([1, 4, -1, 3]))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))
    np.testing.assert_array_equal(np.asarray(out)[[0, 3]], np.asarray(TABLE)[[1, 3]])


def test_gradient_flows_to_looked_up_rows():
    grad = jax.grad(lambda t: embedding_lookup(t, jnp.array([1, 1, 3])).sum())(TABLE)
    np.testing.assert_array_equal(grad[:, 0], [0.0, 2.0, 0.0, 1.0])


def test_rejects_bad_dtypes_and_shapes():
    with pytest.raises(ValueError, match="integers"):
        embedding_lookup(TABLE, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[V, F\]"):
        embedding_lookup(jnp.ones(4), np.array([0]))
