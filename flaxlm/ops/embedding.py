"""Embedding lookup that never silently clamps out-of-range ids."""

import jax
import jax.numpy as jnp
import numpy as np


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table` [V, F] at integer `ids` [...] -> [..., F].

    Out-of-range ids (outside [0, V)) are errors, reported in one of two ways:
      * concrete ids (a NumPy or JAX array, not a jit/grad/vmap tracer): ValueError naming the first bad id in
        row-major order, its index and V;
      * traced ids (inside jax.jit etc.), whose values are unknown at trace time: the rows come back as NaN
        (`jnp.take(..., mode='fill', fill_value=nan)`, negative ids included), so a jitted step shows a non-finite
        loss instead of silently reading a clamped or wrapped row.
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must have shape [V, F], got {table.shape}")
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(f"table must be floating point, got dtype {table.dtype}")
    vocab = table.shape[0]
    if not isinstance(ids, jax.core.Tracer):
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            index = np.unravel_index(np.argmax(bad), ids.shape)
            raise ValueError(f"id {ids[index]} at index {tuple(int(i) for i in index)} is outside [0, {vocab})")
    elif not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = jnp.where(ids < 0, vocab, ids)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
