"""Inverted dropout and word dropout as pure functions of an explicit key."""

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Zero each element of `x` with probability `rate` and scale the rest by 1 / (1 - rate).

    Identity when `key` is None or `rate` is 0 (evaluation mode). Shape and dtype of `x` are kept.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def word_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """x [B, T, F] token embeddings -> the same with whole tokens zeroed with probability `rate` (no rescaling).

    Like replacing a word by an unknown token (Flax's sst2 example, Iyyer et al. 2015), the model learns not to
    lean on any single word. Identity when `key` is None or `rate` is 0.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"word dropout rate must be in [0, 1), got {rate}")
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape[:-1])
    return jnp.where(keep[..., None], x, jnp.zeros_like(x))
