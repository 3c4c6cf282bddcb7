"""Recurrent cells (Elman RNN, LSTM, GRU) as pure step functions, and a length-aware scan over time.

Parameters follow PyTorch's equations, gate order and two-bias layout, transposed so that inputs multiply on the
left (`x @ w_ih`), so a torch `nn.RNN`/`nn.LSTM`/`nn.GRU` maps on exactly:

    w_ih [F, G*H]   (torch weight_ih_l{k}.T)      b_ih [G*H]  (torch bias_ih_l{k})
    w_hh [H, G*H]   (torch weight_hh_l{k}.T)      b_hh [G*H]  (torch bias_hh_l{k})

with G = 1 (RNN), 4 (LSTM: gates i, f, g, o) or 3 (GRU: gates r, z, n). Biases may be None (no bias).

A step function has the signature `step(params, carry, x_proj) -> (new_carry, out)` where `x_proj = x @ w_ih + b_ih`
[B, G*H] is the input projection. `recurrent_scan` computes that projection for all timesteps with one matmul before
the loop, so only the recurrent matmul `h @ w_hh` runs inside `jax.lax.scan`. A cell named by a string runs with a
custom backward pass that computes the gradient of w_hh with one matmul after the loop instead of one small product
per step: the LSTM as `lstm_scan.lstm_scan` (closed-form gradient), RNN and GRU as their matmul-free
`core(carry, x_proj, rec)` under `recurrent_grad.hoisted_scan`. A step function passed in runs under plain autodiff.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.ops.activations import sigmoid
from flaxlm.ops.lstm_scan import lstm_gates, lstm_scan, lstm_update
from flaxlm.ops.recurrent_grad import hoisted_scan, masked_core, recurrent_projection

Carry = Any  # jax.Array [B, H] for RNN/GRU, tuple (h, c) of [B, H] arrays for LSTM.
StepFn = Callable[["CellParams", Carry, jax.Array], tuple[Carry, jax.Array]]


class CellParams(NamedTuple):
    """Weights of one recurrent cell (one layer, one direction); a pytree. Shapes in the module docstring."""

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array | None = None
    b_hh: jax.Array | None = None


def rnn_core(carry: jax.Array, x_proj: jax.Array, rec: jax.Array, *, nonlinearity: str = "tanh"):
    """Elman RNN step from both projections (rec = h @ w_hh + b_hh): h' = act(x_proj + rec). Returns (h', h')."""
    pre = x_proj + rec
    if nonlinearity == "tanh":
        h = jnp.tanh(pre)
    elif nonlinearity == "relu":
        h = jax.nn.relu(pre)
    else:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return h, h


def lstm_core(carry: tuple[jax.Array, jax.Array], x_proj: jax.Array, rec: jax.Array):
    """LSTM step from both projections, PyTorch's gate order (i, f, g, o); carry (h, c). Returns ((h', c'), h')."""
    h, c = lstm_update(lstm_gates(x_proj + rec), carry[1])
    return (h, c), h


def gru_core(carry: jax.Array, x_proj: jax.Array, rec: jax.Array):
    """GRU step from both projections, PyTorch's equations (gate order r, z, n). Returns (h', h').

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h
    """
    x_r, x_z, x_n = jnp.split(x_proj, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(rec, 3, axis=-1)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = (1.0 - z) * n + z * carry
    return h, h


def _each_direction(scan):
    """A scan over directions (tuples) run as one scan per direction."""
    def run(reverses, w_hh, b_hh, x_proj, valid, carry0):
        results = [scan((r,), (w,), (b,), (x,), valid, (c,))
                   for r, w, b, x, c in zip(reverses, w_hh, b_hh, x_proj, carry0)]
        return tuple(carries[0] for carries, _ in results), tuple(outs[0] for _, outs in results)

    return run


# Named cells whose two biases only enter as x_proj + h @ w_hh + b_ih + b_hh: their b_ih is added inside the loop,
# with b_hh, where the add is part of a kernel the step runs anyway, instead of in a pass over all of x_proj [T, B,
# G*H] after the input projection (one read and write of 16 MiB per BiLSTM direction, and a second reduction over
# d x_proj for b_ih's gradient). The GRU's b_hn sits inside r * (h @ w_hn + b_hn), so it keeps b_ih in x_proj.
ADDITIVE_BIASES = frozenset({"rnn", "rnn_tanh", "rnn_relu", "lstm"})

# name -> scan(reverses, w_hh, b_hh, x_proj [T, B, G*H], valid [T, B] | None, carry0) -> (carries, outputs [T, B, H]),
# every argument but valid (and every result) a tuple over directions. LSTM and GRU run all directions in one loop
# (a bidirectional layer's gradient at T = B = 64, H = 256: GRU 1-3% faster than one loop per direction); the
# Elman RNN's per-step work is too small to gain from it (1% slower), so it runs one loop per direction.
SCANS = {
    "rnn": _each_direction(partial(hoisted_scan, rnn_core)),
    "rnn_tanh": _each_direction(partial(hoisted_scan, rnn_core)),
    "rnn_relu": _each_direction(partial(hoisted_scan, partial(rnn_core, nonlinearity="relu"))),
    "lstm": lstm_scan,
    "gru": partial(hoisted_scan, gru_core),
}


def rnn_step(
    params: CellParams, carry: jax.Array, x_proj: jax.Array, *, nonlinearity: str = "tanh"
) -> tuple[jax.Array, jax.Array]:
    """Elman RNN step, h' = act(x_proj + h @ w_hh + b_hh) with act in {'tanh', 'relu'}. Returns (h', h')."""
    return rnn_core(carry, x_proj, recurrent_projection(carry, params.w_hh, params.b_hh), nonlinearity=nonlinearity)


def lstm_step(
    params: CellParams, carry: tuple[jax.Array, jax.Array], x_proj: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """LSTM step with PyTorch's gate order (i, f, g, o); carry is (h, c), each [B, H]. Returns ((h', c'), h')."""
    return lstm_core(carry, x_proj, recurrent_projection(carry[0], params.w_hh, params.b_hh))


def gru_step(params: CellParams, carry: jax.Array, x_proj: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GRU step with PyTorch's equations (see gru_core). Returns (h', h')."""
    return gru_core(carry, x_proj, recurrent_projection(carry, params.w_hh, params.b_hh))


STEP_FUNCTIONS: dict[str, StepFn] = {
    "rnn": rnn_step,
    "rnn_tanh": rnn_step,
    "rnn_relu": partial(rnn_step, nonlinearity="relu"),
    "lstm": lstm_step,
    "gru": gru_step,
}


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def recurrent_scan(
    cell: str | StepFn,
    params: CellParams,
    xs: jax.Array,
    carry0: Carry,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    time_major: bool = False,
) -> tuple[jax.Array, Carry]:
    """Run a recurrent cell over xs [B, T, F] from carry0; returns (outputs [B, T, H], final carry).

    cell: 'rnn' (= 'rnn_tanh'), 'rnn_relu', 'lstm', 'gru', or a step function `step(params, carry, x_proj)`.
    carry0: [B, H] (RNN, GRU) or (h0, c0) (LSTM).
    lengths: optional [B] int valid lengths in [0, T]. Outputs at t >= lengths[b] are zero, and the final carry is
      the state after step lengths[b] - 1 (the last valid step, not the last padded one); a sequence of length 0
      returns carry0 unchanged and all-zero outputs. Concrete lengths outside [0, T] raise ValueError; traced
      lengths are not checked.
    reverse: process each sequence from its last valid step to its first (like the backward direction of a torch
      packed sequence). outputs[:, t] is still the output at input position t.
    time_major: xs is [T, B, F] and outputs are [T, B, H] (no transposes; stacked layers stay time-major).

    The input projection xs @ w_ih + b_ih is one [T*B, F] x [F, G*H] matmul done before the scan; only h @ w_hh
    runs inside `jax.lax.scan`. Padding sits at the end of each sequence, so the reverse direction scans from
    t = T - 1 down and keeps carry0 until it meets the sequence's last valid step: no per-sequence reversal.
    Named cells differentiate through custom VJPs (see the module docstring), so they support reverse mode
    (jax.grad, jax.vjp) but not forward mode; pass the step function (e.g. `lstm_step`) for jax.jvp / jacfwd.
    """
    (outputs,), (carry,) = recurrent_scan_directions(cell, (params,), xs, (carry0,), lengths=lengths,
                                                     reverses=(reverse,), time_major=time_major)
    return outputs, carry


def recurrent_scan_directions(
    cell: str | StepFn,
    params: Sequence[CellParams],
    xs: jax.Array,
    carries0: Sequence[Carry],
    *,
    reverses: Sequence[bool],
    lengths: jax.Array | None = None,
    time_major: bool = False,
) -> tuple[tuple[jax.Array, ...], tuple[Carry, ...]]:
    """`recurrent_scan` of the same xs for several directions (e.g. a bidirectional layer's two cells).

    params, carries0 and reverses have one entry per direction; returns (outputs, final carries), tuples with one
    entry per direction, each as `recurrent_scan` returns it. A named LSTM or GRU runs all directions in one loop
    over time (`flaxlm.ops.direction_scan`), whose independent per-direction kernels XLA:CPU runs side by side; an
    Elman RNN or a step function runs one scan per direction.
    """
    step = STEP_FUNCTIONS.get(cell) if isinstance(cell, str) else cell
    if step is None:
        raise ValueError(f"cell must be one of {sorted(STEP_FUNCTIONS)} or a step function, got {cell!r}")
    if not len(params) == len(carries0) == len(reverses) > 0:
        raise ValueError(f"params, carries0 and reverses need one entry per direction, got {len(params)}, "
                         f"{len(carries0)} and {len(reverses)}")
    xs = jnp.asarray(xs)
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape {'[T, B, F]' if time_major else '[B, T, F]'}, got shape {xs.shape}")
    shape = xs.shape
    if not time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    length, batch, features = xs.shape
    for p in params:
        if p.w_ih.ndim != 2 or p.w_ih.shape[0] != features:
            raise ValueError(f"xs has {features} features (shape {shape}) but w_ih has shape {p.w_ih.shape}")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [B] = ({batch},) for xs of shape {shape}, got {lengths.shape}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        if _is_concrete(lengths):
            host = np.asarray(lengths)
            if host.min(initial=0) < 0 or host.max(initial=0) > length:
                raise ValueError(f"lengths must lie in [0, T={length}], got {host.tolist()}")

    bias_in_loop = cell in ADDITIVE_BIASES
    x_proj = tuple(_input_projection(xs, p, with_bias=not bias_in_loop) for p in params)
    valid = None if lengths is None else jnp.arange(length)[:, None] < lengths[None, :]  # [T, B]
    with jax.named_scope("recurrence"):  # profiles (benchmarks/profile_step.py) attribute time by this scope
        if isinstance(cell, str):
            b_hh = tuple(_summed_bias(p) if bias_in_loop else p.b_hh for p in params)
            carries, outs = SCANS[cell](tuple(reverses), tuple(p.w_hh for p in params), b_hh, x_proj, valid,
                                        tuple(carries0))
        else:
            carries, outs = zip(*(_step_scan(step, p, x, valid, c, r)
                                  for p, x, c, r in zip(params, x_proj, carries0, reverses)))
    return tuple(o if time_major else jnp.swapaxes(o, 0, 1) for o in outs), carries


def _input_projection(xs: jax.Array, params: CellParams, with_bias: bool = True) -> jax.Array:
    """Time-major xs [T, B, F] -> xs @ w_ih (+ b_ih) [T, B, G*H], as one [T*B, F] x [F, G*H] product."""
    length, batch, features = xs.shape
    x_proj = xs.reshape(length * batch, features) @ params.w_ih
    if with_bias and params.b_ih is not None:
        x_proj = x_proj + params.b_ih
    return x_proj.reshape(length, batch, params.w_ih.shape[1])


def _summed_bias(params: CellParams) -> jax.Array | None:
    """b_ih + b_hh (either may be None) for cells where both biases only enter the pre-activation's sum."""
    if params.b_ih is None:
        return params.b_hh
    return params.b_ih if params.b_hh is None else params.b_ih + params.b_hh


def _step_scan(step: StepFn, params: CellParams, x_proj, valid, carry0, reverse: bool):
    """A user's step function under `jax.lax.scan` (plain autodiff) -> (final carry, outputs [T, B, H])."""
    def body(carry, inputs):
        x_t, valid_t = inputs
        return masked_core(lambda c, x, _: step(params, c, x), carry, x_t, None, valid_t)

    return jax.lax.scan(body, carry0, (x_proj, valid), reverse=reverse)
