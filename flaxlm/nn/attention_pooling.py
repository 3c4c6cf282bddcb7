"""Keys-only additive attention pooling (Bahdanau et al. 2015 scoring without a query), as in Flax's sst2 example.

A sequence of hidden states is summarised by a softmax-weighted sum whose weights come from the states alone:
score_t = v . tanh(W h_t), weights = softmax over valid positions, pooled = sum_t weights_t h_t.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class AttentionPooling(nnx.Module):
    """hidden [B, T, F] and valid [B, T] -> (pooled [B, F], weights [B, T]).

    Parameters: `keys` kernel [F, H] (W) and `energy` kernel [H, 1] (v), both without bias, logical axes
    ('embed', 'mlp') and ('mlp', None). Padding gets weight 0 and never reaches the result; a sequence with no
    valid position pools to zeros with all-zero weights.
    """

    def __init__(self, features: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("features", features), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionPooling {name} must be a positive int, got {value!r}")
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.keys = nnx.Linear(
            features, hidden, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            **common,
        )
        self.energy = nnx.Linear(
            hidden, 1, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", None)), **common,
        )

    def __call__(self, hidden: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        if hidden.ndim != 3 or jnp.shape(valid) != hidden.shape[:2]:
            raise ValueError(f"AttentionPooling wants hidden [B, T, F] and valid [B, T], got {hidden.shape} and "
                             f"{jnp.shape(valid)}")
        scores = self.energy(jnp.tanh(self.keys(hidden)))[..., 0].astype(jnp.float32)
        weights = jax.nn.softmax(jnp.where(valid, scores, jnp.finfo(jnp.float32).min), axis=-1)
        weights = jnp.where(valid, weights, 0.0)
        pooled = jnp.einsum("bt,btf->bf", weights.astype(hidden.dtype), hidden)
        return pooled, weights
