"""Boolean attention masks (True = may attend), broadcastable to [B, H, T, S]."""

import jax
import jax.numpy as jnp


def padding_mask(lengths: jax.Array, max_length: int) -> jax.Array:
    """[B] lengths -> [B, T] bool, True at positions t < length."""
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape [B], got {lengths.shape}")
    return jnp.arange(max_length)[None, :] < lengths[:, None]


def causal_mask(q_length: int, kv_length: int | None = None, offset: int = 0) -> jax.Array:
    """[T, S] bool lower-triangular mask: query t (at absolute position offset + t) sees keys s <= offset + t."""
    kv_length = q_length if kv_length is None else kv_length
    q_pos = jnp.arange(q_length)[:, None] + offset
    return jnp.arange(kv_length)[None, :] <= q_pos


def attention_mask(
    q_valid: jax.Array | None, kv_valid: jax.Array | None, *, causal: bool = False
) -> jax.Array | None:
    """Combine padding of queries [B, T] and keys [B, S] (and optionally causality) into [B, 1, T, S].

    Returns None when there is nothing to mask.
    """
    masks = []
    if q_valid is not None or kv_valid is not None:
        q = q_valid if q_valid is not None else jnp.ones(kv_valid.shape[:1] + (1,), bool)
        kv = kv_valid if kv_valid is not None else jnp.ones(q_valid.shape[:1] + (1,), bool)
        masks.append(q[:, None, :, None] & kv[:, None, None, :])
    if causal:
        t = q_valid.shape[1] if q_valid is not None else kv_valid.shape[1]
        s = kv_valid.shape[1] if kv_valid is not None else t
        masks.append(causal_mask(t, s)[None, None])
    return combine_masks(*masks)


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """Packed sequences: [B, T] and [B, S] segment ids -> [B, 1, T, S], True where ids match and are non-zero.

    Segment id 0 marks padding.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
    return (same & real)[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (None entries are skipped); None when none are given."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out
