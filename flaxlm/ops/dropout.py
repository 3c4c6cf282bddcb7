"""Inverted dropout as a pure function of an explicit key."""

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
