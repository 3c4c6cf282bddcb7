"""Kim (2014)-style CNN text encoder: parallel 1-D convolutions of several widths and masked max-over-time pooling."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.ops.dropout import dropout
from flaxlm.ops.masks import padding_mask

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "identity": lambda x: x,
}


class Conv1DTextEncoder(nnx.Module):
    """Encode x [B, T, F] into [B, N * len(kernel_sizes)] features (N = num_filters).

    For each width K a 'VALID' convolution (torch nn.Conv1d semantics: cross-correlation) gives
    activation(conv + bias) at window starts t; the max over the valid windows is that width's N features, and the
    widths' features are concatenated in the order of `kernel_sizes`, then dropout applies (when a key is given).

    Padding (positions t >= length) never reaches the result: padded inputs are zeroed and only windows lying
    entirely inside the sequence, t + K <= length, take part in the max. A sequence shorter than K (0 < length < K)
    is zero-padded to width K and contributes its single window at t = 0, i.e. the same as running torch Conv1d on the
    sequence right-padded with zeros to length K. A sequence of length 0 gives all-zero features.

    Kernels are [K, F, N] (torch Conv1d weight [N, F, K] transposed), logical axes ('conv_window', 'embed', None);
    initialised like torch: U(-1/sqrt(F*K), 1/sqrt(F*K)) for kernels and biases.
    """

    def __init__(
        self,
        in_features: int,
        num_filters: int,
        kernel_sizes: Sequence[int] = (3, 4, 5),
        *,
        activation: str = "relu",
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (("in_features", in_features), ("num_filters", num_filters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kernel_sizes = tuple(kernel_sizes)
        if not kernel_sizes or any(not isinstance(k, int) or k < 1 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of positive ints, got {kernel_sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.in_features = in_features
        self.num_filters = num_filters
        self.kernel_sizes = kernel_sizes
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        kernels, biases = [], []
        for k in kernel_sizes:
            bound = 1.0 / math.sqrt(in_features * k)
            kernels.append(nnx.Param(
                jax.random.uniform(rngs.params(), (k, in_features, num_filters), param_dtype, -bound, bound),
                out_sharding=("conv_window", "embed", None),
            ))
            if use_bias:
                biases.append(nnx.Param(
                    jax.random.uniform(rngs.params(), (num_filters,), param_dtype, -bound, bound),
                    out_sharding=(None,),
                ))
        self.kernels = nnx.List(kernels)
        self.biases = nnx.List(biases) if use_bias else None

    @property
    def out_features(self) -> int:
        return self.num_filters * len(self.kernel_sizes)

    def _lengths(self, x, mask, seq_lengths) -> jax.Array:
        batch, length = x.shape[:2]
        if mask is not None and seq_lengths is not None:
            raise ValueError("pass at most one of mask and seq_lengths")
        if mask is not None:
            if jnp.shape(mask) != (batch, length):
                raise ValueError(f"mask must have shape [B, T] = {(batch, length)}, got {jnp.shape(mask)}")
            mask = jnp.asarray(mask, bool)
            lengths = mask.sum(-1)
            if not isinstance(mask, jax.core.Tracer) and not np.array_equal(mask, padding_mask(lengths, length)):
                raise ValueError("mask must be left-aligned (True at t < length, False after), as padding_mask gives")
            return lengths
        if seq_lengths is None:
            return jnp.full((batch,), length, jnp.int32)
        if jnp.shape(seq_lengths) != (batch,):
            raise ValueError(f"seq_lengths must have shape [B] = ({batch},) for x of shape {x.shape}, "
                             f"got {jnp.shape(seq_lengths)}")
        seq_lengths = jnp.asarray(seq_lengths)
        if not isinstance(seq_lengths, jax.core.Tracer):
            host = np.asarray(seq_lengths)
            if host.min(initial=0) < 0 or host.max(initial=0) > length:
                raise ValueError(f"seq_lengths must lie in [0, T={length}], got {host.tolist()}")
        return seq_lengths

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        seq_lengths: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, F]; mask [B, T] bool (left-aligned) or seq_lengths [B] -> features [B, N * len(kernel_sizes)]."""
        x = jnp.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"x must have shape [B, T, F], got shape {x.shape}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features (shape {x.shape}), expected F={self.in_features}")
        lengths = self._lengths(x, mask, seq_lengths)
        batch, length = x.shape[:2]
        x = jnp.where(padding_mask(lengths, length)[:, :, None], x.astype(self.dtype), 0)
        widest = max(self.kernel_sizes)
        if length < widest:
            x = jnp.pad(x, ((0, 0), (0, widest - length), (0, 0)))
        act = ACTIVATIONS[self.activation]
        features = []
        for i, k in enumerate(self.kernel_sizes):
            y = jax.lax.conv_general_dilated(
                x, self.kernels[i][...].astype(self.dtype), window_strides=(1,), padding="VALID",
                dimension_numbers=("NWC", "WIO", "NWC"),
            )
            if self.biases is not None:
                y = y + self.biases[i][...].astype(self.dtype)
            y = act(y)
            starts = jnp.arange(y.shape[1])[None, :]
            last_start = jnp.maximum(lengths - k, 0)[:, None]
            pooled = jnp.max(jnp.where((starts <= last_start)[:, :, None], y, jnp.finfo(y.dtype).min), axis=1)
            features.append(jnp.where(lengths[:, None] > 0, pooled, 0))
        out = jnp.concatenate(features, axis=-1)
        return dropout(out, self.dropout_rate, dropout_key)
