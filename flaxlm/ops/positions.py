"""Position encodings: the fixed sinusoidal table of Vaswani et al. and rotary embeddings (RoPE)."""

import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """[T, F] float32 table: column 2i is sin(t / 10000^(2i/F)), column 2i + 1 is cos(t / 10000^(2i/F)).

    The layout of the PyTorch tutorial's `PositionalEncoding` (sin on even features, cos on odd ones).
    Computed in float64 on the host, so the result is a compile-time constant under jit.
    """
    if length < 0 or dim <= 0:
        raise ValueError(f"need length >= 0 and dim > 0, got length={length}, dim={dim}")
    position = np.arange(length, dtype=np.float64)[:, None]
    inv_freq = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-np.log(10000.0) / dim))
    angles = position * inv_freq
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : dim // 2])
    return jnp.asarray(table, dtype=jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, Llama).

    Feature i < D/2 is paired with feature i + D/2 and the pair is rotated by angle p * base^(-2i/D), where p is the
    token's position. Dot products of rotated queries and keys then depend only on relative positions.

    Args:
      x: [B, T, H, D] queries or keys, D even.
      positions: [B, T] or [T] integer (or float) positions.
      base: the frequency base.

    Returns:
      [B, T, H, D] in x's dtype (the rotation is computed in float32).
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [B, T, H, D], got {x.shape}")
    batch, length, _, dim = x.shape
    if dim % 2:
        raise ValueError(f"rope needs an even head_dim, got x of shape {x.shape}")
    given = positions.shape
    if positions.ndim == 1:
        positions = positions[None]
    if positions.ndim != 2 or positions.shape[1] != length or positions.shape[0] not in (1, batch):
        raise ValueError(f"positions must have shape [B, T] or [T] matching x {x.shape}, got {given}")
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = dim // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
