"""Recurrent NNX modules: RNNCell, LSTMCell, GRUCell (one step) and RNN (multi-layer, bidirectional, padded batches).

Weights use flaxlm.ops.recurrent's layout (torch's equations and two biases, transposed to x @ w), so torch
`nn.RNN`/`nn.LSTM`/`nn.GRU` weights load exactly (flaxlm.interop.torch_recurrent). Every weight's gate axis
G*H carries the logical name 'hidden' (w_ih, w_hh: (None, 'hidden'); biases: ('hidden',)); sharding it is
column-parallel for both the input and the recurrent projection.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.ops.dropout import dropout
from flaxlm.ops.recurrent import STEP_FUNCTIONS, CellParams, recurrent_scan_directions

CELL_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _torch_uniform(bound: float):
    """Initializer sampling U(-bound, bound), torch's default for recurrent weights and biases (bound=1/sqrt(H))."""

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _RecurrentCell(nnx.Module):
    """Shared weights and step logic of the three cells; `kind` picks the step function of flaxlm.ops.recurrent."""

    kind: str
    gates: int

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive("in_features", in_features)
        _check_positive("hidden_features", hidden_features)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = _torch_uniform(1.0 / math.sqrt(hidden_features))
        width = self.gates * hidden_features
        self.w_ih = nnx.Param(init(rngs.params(), (in_features, width), param_dtype), out_sharding=(None, "hidden"))
        self.w_hh = nnx.Param(
            init(rngs.params(), (hidden_features, width), param_dtype), out_sharding=(None, "hidden")
        )
        if use_bias:
            self.b_ih = nnx.Param(init(rngs.params(), (width,), param_dtype), out_sharding=("hidden",))
            self.b_hh = nnx.Param(init(rngs.params(), (width,), param_dtype), out_sharding=("hidden",))
        else:
            self.b_ih = None
            self.b_hh = None

    def cell_params(self) -> CellParams:
        """The weights as flaxlm.ops.recurrent.CellParams, cast to the compute dtype."""
        def cast(param):
            return None if param is None else param[...].astype(self.dtype)

        return CellParams(cast(self.w_ih), cast(self.w_hh), cast(self.b_ih), cast(self.b_hh))

    def initial_carry(self, batch: int):
        """Zero state: [B, H] (RNN, GRU) or (h, c), each [B, H] (LSTM)."""
        h = jnp.zeros((batch, self.hidden_features), self.dtype)
        return (h, h) if self.kind == "lstm" else h

    def __call__(self, carry, x: jax.Array):
        """One step: x [B, F] and carry -> (new_carry, out [B, H])."""
        if x.ndim != 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [B, F={self.in_features}], got {x.shape}")
        params = self.cell_params()
        x_proj = x.astype(self.dtype) @ params.w_ih
        if params.b_ih is not None:
            x_proj = x_proj + params.b_ih
        return STEP_FUNCTIONS[self.kind](params, carry, x_proj)


class RNNCell(_RecurrentCell):
    """Elman RNN cell, h' = act(x W_ih + b_ih + h W_hh + b_hh), act 'tanh' or 'relu' (torch nn.RNNCell)."""

    gates = 1

    def __init__(self, in_features: int, hidden_features: int, *, nonlinearity: str = "tanh", **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.kind = f"rnn_{nonlinearity}"
        super().__init__(in_features, hidden_features, **kwargs)


class LSTMCell(_RecurrentCell):
    """LSTM cell with torch's gate order (i, f, g, o); carry is (h, c) (torch nn.LSTMCell)."""

    gates = 4
    kind = "lstm"


class GRUCell(_RecurrentCell):
    """GRU cell with torch's equations, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)) (torch nn.GRUCell)."""

    gates = 3
    kind = "gru"


class RNN(nnx.Module):
    """Multi-layer, optionally bidirectional RNN/LSTM/GRU over padded batches, equivalent to torch nn.RNN/LSTM/GRU.

    Cells are stored in `self.cells` in torch's order: index layer * D + direction (D = 2 if bidirectional else 1;
    direction 1 reads each sequence backwards within its length). Layer k > 0 reads the D*H concatenated outputs of
    layer k - 1, after dropout with `dropout_rate` (never after the last layer), as in torch.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        cell: str = "rnn",
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout_rate: float = 0.0,
        nonlinearity: str = "tanh",
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if cell not in CELL_GATES:
            raise ValueError(f"cell must be one of {sorted(CELL_GATES)}, got {cell!r}")
        _check_positive("in_features", in_features)
        _check_positive("hidden_features", hidden_features)
        _check_positive("num_layers", num_layers)
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if cell != "rnn" and nonlinearity != "tanh":
            raise ValueError(f"nonlinearity applies to cell='rnn' only, got nonlinearity={nonlinearity!r} for {cell!r}")
        self.cell = cell
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.dropout_rate = dropout_rate
        self.nonlinearity = nonlinearity
        self.use_bias = use_bias
        self.dtype = dtype
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cells = []
        for layer in range(num_layers):
            layer_in = in_features if layer == 0 else self.num_directions * hidden_features
            for _ in range(self.num_directions):
                if cell == "rnn":
                    cells.append(RNNCell(layer_in, hidden_features, nonlinearity=nonlinearity, **common))
                elif cell == "lstm":
                    cells.append(LSTMCell(layer_in, hidden_features, **common))
                else:
                    cells.append(GRUCell(layer_in, hidden_features, **common))
        self.cells = nnx.List(cells)

    @property
    def out_features(self) -> int:
        """Width of the output sequence: D * H."""
        return self.num_directions * self.hidden_features

    def initial_carry(self, batch: int):
        """Zero state in torch's layout: h [L*D, B, H], or (h, c) for LSTM."""
        h = jnp.zeros((self.num_layers * self.num_directions, batch, self.hidden_features), self.dtype)
        return (h, h) if self.cell == "lstm" else h

    def _check_inputs(self, xs, seq_lengths, initial_carry) -> None:
        if xs.ndim != 3:
            raise ValueError(f"xs must have shape [B, T, F], got shape {xs.shape}")
        if xs.shape[-1] != self.in_features:
            raise ValueError(f"xs has {xs.shape[-1]} features (shape {xs.shape}), expected F={self.in_features}")
        batch = xs.shape[0]
        if seq_lengths is not None and jnp.shape(seq_lengths) != (batch,):
            raise ValueError(f"seq_lengths must have shape [B] = ({batch},) for xs of shape {xs.shape}, "
                             f"got {jnp.shape(seq_lengths)}")
        if initial_carry is not None:
            expected = (self.num_layers * self.num_directions, batch, self.hidden_features)
            parts = initial_carry if self.cell == "lstm" else (initial_carry,)
            if self.cell == "lstm" and not (isinstance(initial_carry, tuple) and len(initial_carry) == 2):
                raise ValueError("initial_carry for an LSTM must be a tuple (h0, c0)")
            for part in parts:
                if jnp.shape(part) != expected:
                    raise ValueError(f"initial_carry arrays must have shape [L*D, B, H] = {expected}, "
                                     f"got {jnp.shape(part)}")

    def _start(self, carry0: tuple, index: int):
        """Cell `index`'s initial carry from the stacked carry0 parts [L*D, B, H]: (h, c) or h."""
        start = tuple(part[index].astype(self.dtype) for part in carry0)
        return start if self.cell == "lstm" else start[0]

    def __call__(
        self,
        xs: jax.Array,
        *,
        seq_lengths: jax.Array | None = None,
        initial_carry=None,
        return_sequences: bool = True,
        return_carry: bool = False,
        dropout_key: jax.Array | None = None,
    ):
        """Run all layers over xs [B, T, F] (batch first; transpose time-major data with xs.swapaxes(0, 1)).

        seq_lengths: optional [B] valid lengths in [0, T]; outputs at t >= length are zero and each final state is
          the one after the sequence's last valid step (length 0 keeps the initial state).
        initial_carry: as returned with return_carry (default zeros, see `initial_carry`).
        dropout_key: enables inter-layer dropout (None = evaluation, no dropout).

        Returns outputs [B, T, D*H] if return_sequences, the final carry if return_carry (h [L*D, B, H], or (h, c)
        for LSTM, torch's ordering), or (outputs, carry) if both.
        """
        if not (return_sequences or return_carry):
            raise ValueError("at least one of return_sequences and return_carry must be True")
        xs = jnp.asarray(xs)
        self._check_inputs(xs, seq_lengths, initial_carry)
        if initial_carry is None:
            initial_carry = self.initial_carry(xs.shape[0])
        carry0 = initial_carry if self.cell == "lstm" else (initial_carry,)

        layer_input = jnp.swapaxes(xs.astype(self.dtype), 0, 1)  # time-major [T, B, F] through all layers
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and dropout_key is not None:
                key = jax.random.fold_in(dropout_key, layer)  # the mask is drawn batch-major, as it always was
                layer_input = dropout(layer_input.swapaxes(0, 1), self.dropout_rate, key).swapaxes(0, 1)
            indices = range(layer * self.num_directions, (layer + 1) * self.num_directions)
            outputs, layer_finals = recurrent_scan_directions(
                self.cells[indices[0]].kind,
                [self.cells[i].cell_params() for i in indices],
                layer_input,
                [self._start(carry0, i) for i in indices],
                lengths=seq_lengths,
                reverses=[direction == 1 for direction in range(self.num_directions)],
                time_major=True,
            )
            finals.extend(final if self.cell == "lstm" else (final,) for final in layer_finals)
            layer_input = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)

        stacked = tuple(jnp.stack(parts) for parts in zip(*finals))
        carry = stacked if self.cell == "lstm" else stacked[0]
        outputs = jnp.swapaxes(layer_input, 0, 1)
        if return_sequences and return_carry:
            return outputs, carry
        return outputs if return_sequences else carry
