"""Dense contractions with the leading (batch, time) axes flattened into one.

`x [B, T, F] @ w [F, ...]` written as an einsum over [B, T] differentiates into a weight gradient that contracts
two axes at once (`btf,bt...->f...`); XLA:CPU runs that form markedly slower than the same FLOPs as one 2-D
product, and the Transformer's backward pass is mostly such products. Flattening the leading axes first keeps
every forward product and weight gradient a plain [N, K] contraction (N = B * T) without touching the
parameters' shapes, so their shardings are unchanged.
"""

import jax
import jax.numpy as jnp


def dense(x: jax.Array, kernel: jax.Array, contract: int = 1) -> jax.Array:
    """x [*lead, *k] and kernel [*k, *out] (k = the last `contract` axes of x) -> [*lead, *out]."""
    k_shape = x.shape[x.ndim - contract:]
    if kernel.shape[:contract] != k_shape:
        raise ValueError(f"dense: x's last {contract} axes {k_shape} must equal kernel's first {contract} axes "
                         f"{kernel.shape[:contract]} (x {x.shape}, kernel {kernel.shape})")
    lead = x.shape[:x.ndim - contract]
    flat = x.reshape((-1,) + k_shape)
    return jnp.tensordot(flat, kernel, axes=contract).reshape(lead + kernel.shape[contract:])


def apply_to_rows(fn, x: jax.Array) -> jax.Array:
    """Apply `fn` ([N, F] -> [N, G], e.g. an nnx.Linear) to x [*lead, F] as one [prod(lead), F] matrix."""
    out = fn(x.reshape(-1, x.shape[-1]))
    return out.reshape(x.shape[:-1] + out.shape[1:])
