"""Embed (lookup, tied attend, id validation) and PositionEmbedding (learned / sinusoidal, length checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.nn.embeddings import Embed, PositionEmbedding
from flaxlm.ops.positions import sinusoidal_positions


def test_embed_lookup_and_tied_attend():
    embed = Embed(10, 4, rngs=nnx.Rngs(0))
    table = np.asarray(embed.embedding[...])
    ids = jnp.array([[1, 9], [0, 0]])
    np.testing.assert_array_equal(embed(ids), table[np.asarray(ids)])
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    np.testing.assert_allclose(embed.attend(x), np.asarray(x) @ table.T, atol=1e-5)
    assert embed.embedding.out_sharding == ("vocab", "embed")
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        embed.attend(jnp.ones((2, 5)))


def test_embed_out_of_range_ids_raise_when_concrete_and_give_nan_under_jit():
    embed = Embed(10, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"id 10 at index \(0, 1\) is outside \[0, 10\)"):
        embed(jnp.array([[3, 10]]))
    out = jax.jit(lambda m, ids: m(ids))(embed, jnp.array([3, 10, -2]))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))


def test_embed_compute_dtype():
    embed = Embed(10, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert embed(jnp.array([1])).dtype == jnp.bfloat16 and embed.embedding.dtype == jnp.float32
    assert embed.attend(jnp.ones((1, 4))).dtype == jnp.bfloat16


def test_sinusoidal_position_embedding_is_the_fixed_table():
    pos = PositionEmbedding("sinusoidal", 16, 6, rngs=nnx.Rngs(0))
    assert jax.tree.leaves(pos) == []
    np.testing.assert_array_equal(pos(5), sinusoidal_positions(16, 6)[:5])
    positions = jnp.array([[2, 3], [7, 15]])
    np.testing.assert_array_equal(pos(positions), sinusoidal_positions(16, 6)[positions])


def test_learned_position_embedding():
    pos = PositionEmbedding("learned", 8, 4, rngs=nnx.Rngs(0))
    assert pos.embedding.shape == (8, 4) and pos.embedding.out_sharding == (None, "embed")
    np.testing.assert_array_equal(pos(3), pos.embedding[...][:3])
    grad = jax.grad(lambda m: m(jnp.array([1, 1])).sum())(pos)
    np.testing.assert_array_equal(grad.embedding[...][:, 0], [0, 2, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_position_embedding_rejects_too_long_inputs(kind):
    pos = PositionEmbedding(kind, 8, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"length 9 is outside \[0, max_length=8\]"):
        pos(9)
    with pytest.raises(ValueError, match=r"max_length=8.*id 8 at index \(1,\)"):
        pos(jnp.array([7, 8]))
    assert np.all(np.isnan(jax.jit(lambda m, p: m(p))(pos, jnp.array([8]))))


def test_position_embedding_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        PositionEmbedding("rotary", 8, 4, rngs=nnx.Rngs(0))
