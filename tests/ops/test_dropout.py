import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.dropout import dropout, word_dropout


def test_word_dropout_zeroes_whole_tokens_at_the_rate():
    x = jnp.ones((64, 128, 8))
    out = np.asarray(word_dropout(x, 0.25, jax.random.key(0)))
    per_token = out.sum(-1)
    assert set(np.unique(per_token)) <= {0.0, 8.0}
    assert abs((per_token == 0).mean() - 0.25) < 0.02


def test_word_dropout_is_identity_without_a_key_or_rate():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    np.testing.assert_array_equal(word_dropout(x, 0.5, None), x)
    np.testing.assert_array_equal(word_dropout(x, 0.0, jax.random.key(2)), x)


def test_dropout_scales_kept_elements():
    x = jnp.ones((1000,))
    out = np.asarray(dropout(x, 0.5, jax.random.key(3)))
    assert set(np.unique(out)) <= {0.0, 2.0}


@pytest.mark.parametrize("fn", [dropout, word_dropout])
def test_rates_outside_range_are_rejected(fn):
    with pytest.raises(ValueError, match="rate"):
        fn(jnp.ones((2, 3, 4)), 1.0, jax.random.key(0))
