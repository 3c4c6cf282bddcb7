"""Token and position embeddings (token-type embeddings are a plain `Embed`)."""

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.embedding import embedding_lookup
from flaxlm.ops.positions import sinusoidal_positions


class Embed(nnx.Module):
    """Lookup table embedding [V, F] ('vocab', 'embed').

    Out-of-range ids raise ValueError for concrete ids and give NaN rows under jit (see ops.embedding_lookup).
    `attend` reuses the table as a tied output projection.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init=nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype), out_sharding=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] integers -> [..., F] in the compute dtype."""
        return embedding_lookup(self.embedding[...], ids).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., F] -> logits [..., V] = x @ table^T (tied input/output embeddings)."""
        if x.shape[-1] != self.features:
            raise ValueError(f"attend expects [..., {self.features}] inputs, got {x.shape}")
        table = self.embedding[...].astype(self.dtype)
        return apply_to_rows(lambda rows: jnp.einsum("nf,vf->nv", rows.astype(self.dtype), table), x)


class PositionEmbedding(nnx.Module):
    """Absolute position embeddings for positions in [0, max_length).

    kind='learned': a trained table [max_length, F] (None, 'embed'). kind='sinusoidal': the fixed Vaswani table,
    computed on the fly (no parameters, nothing to checkpoint).
    """

    KINDS = ("learned", "sinusoidal")

    def __init__(
        self,
        kind: str,
        max_length: int,
        features: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init=nnx.initializers.normal(stddev=0.02),
        rngs: nnx.Rngs,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.kind = kind
        self.max_length = max_length
        self.features = features
        self.dtype = dtype
        self.embedding = (
            nnx.Param(embedding_init(rngs.params(), (max_length, features), param_dtype), out_sharding=(None, "embed"))
            if kind == "learned" else None
        )

    def __call__(self, positions: int | jax.Array) -> jax.Array:
        """An int length T -> [T, F] for positions 0..T-1; an integer array of positions [...] -> [..., F].

        Raises ValueError when T > max_length, or when concrete positions fall outside [0, max_length); traced
        out-of-range positions give NaN rows.
        """
        if isinstance(positions, int):
            if not 0 <= positions <= self.max_length:
                raise ValueError(f"length {positions} is outside [0, max_length={self.max_length}]")
            positions = jnp.arange(positions)
        if self.embedding is not None:
            table = self.embedding[...]
        else:
            table = sinusoidal_positions(self.max_length, self.features)
        try:
            return embedding_lookup(table, positions).astype(self.dtype)
        except ValueError as e:
            raise ValueError(f"position out of range for max_length={self.max_length}: {e}") from e
