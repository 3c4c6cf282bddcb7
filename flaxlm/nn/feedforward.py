"""Position-wise feed-forward block: Linear(F -> F_mlp), activation, dropout, Linear(F_mlp -> F)."""

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.ops.activations import gelu
from flaxlm.ops.dense import apply_to_rows
from flaxlm.ops.dropout import dropout

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class FeedForward(nnx.Module):
    """The Transformer MLP: linear1 -> activation -> dropout -> linear2 on [..., F] inputs (torch layer order).

    Parameters: up.kernel [F, F_mlp] ('embed', 'mlp'), up.bias [F_mlp] ('mlp',), down.kernel [F_mlp, F]
    ('mlp', 'embed'), down.bias [F] ('embed',). activation: 'relu', 'gelu' (exact erf, torch's default) or
    'gelu_tanh' (the tanh approximation used by GPT-2).
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        activation: str = "relu",
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.up = nnx.Linear(
            features, hidden_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(kernel_init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs,
        )
        self.down = nnx.Linear(
            hidden_features, features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(kernel_init, ("mlp", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """[..., F] -> [..., F]; dropout_key=None disables dropout.

        The leading axes are flattened first so that both matmuls and their weight gradients are 2-D products
        (see flaxlm.ops.dense).
        """
        def mlp(rows):
            h = ACTIVATIONS[self.activation](self.up(rows))
            return self.down(dropout(h, self.dropout_rate, dropout_key))

        return apply_to_rows(mlp, x)
