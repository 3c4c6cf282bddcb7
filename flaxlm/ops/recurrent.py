"""Recurrent cells (Elman RNN, LSTM, GRU) as pure step functions, and a length-aware scan over time.

Parameters follow PyTorch's equations, gate order and two-bias layout, transposed so that inputs multiply on the
left (`x @ w_ih`), so a torch `nn.RNN`/`nn.LSTM`/`nn.GRU` maps on exactly:

    w_ih [F, G*H]   (torch weight_ih_l{k}.T)      b_ih [G*H]  (torch bias_ih_l{k})
    w_hh [H, G*H]   (torch weight_hh_l{k}.T)      b_hh [G*H]  (torch bias_hh_l{k})

with G = 1 (RNN), 4 (LSTM: gates i, f, g, o) or 3 (GRU: gates r, z, n). Biases may be None (no bias).

A step function has the signature `step(params, carry, x_proj) -> (new_carry, out)` where `x_proj = x @ w_ih + b_ih`
[B, G*H] is the input projection. `recurrent_scan` computes that projection for all timesteps with one matmul before
the loop, so only the recurrent matmul `h @ w_hh` runs inside `jax.lax.scan`.
"""

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Carry = Any  # jax.Array [B, H] for RNN/GRU, tuple (h, c) of [B, H] arrays for LSTM.
StepFn = Callable[["CellParams", Carry, jax.Array], tuple[Carry, jax.Array]]


class CellParams(NamedTuple):
    """Weights of one recurrent cell (one layer, one direction); a pytree. Shapes in the module docstring."""

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array | None = None
    b_hh: jax.Array | None = None


def _recurrent_projection(params: CellParams, h: jax.Array) -> jax.Array:
    """h [B, H] -> h @ w_hh + b_hh [B, G*H]."""
    out = h @ params.w_hh
    return out if params.b_hh is None else out + params.b_hh


def rnn_step(
    params: CellParams, carry: jax.Array, x_proj: jax.Array, *, nonlinearity: str = "tanh"
) -> tuple[jax.Array, jax.Array]:
    """Elman RNN step, h' = act(x_proj + h @ w_hh + b_hh) with act in {'tanh', 'relu'}. Returns (h', h')."""
    pre = x_proj + _recurrent_projection(params, carry)
    if nonlinearity == "tanh":
        h = jnp.tanh(pre)
    elif nonlinearity == "relu":
        h = jax.nn.relu(pre)
    else:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return h, h


def lstm_step(
    params: CellParams, carry: tuple[jax.Array, jax.Array], x_proj: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """LSTM step with PyTorch's gate order (i, f, g, o); carry is (h, c), each [B, H]. Returns ((h', c'), h')."""
    h, c = carry
    gates = x_proj + _recurrent_projection(params, h)
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def gru_step(params: CellParams, carry: jax.Array, x_proj: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GRU step with PyTorch's equations (gate order r, z, n). Returns (h', h').

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h
    """
    x_r, x_z, x_n = jnp.split(x_proj, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(_recurrent_projection(params, carry), 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = (1.0 - z) * n + z * carry
    return h, h


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
    """
    step = STEP_FUNCTIONS.get(cell) if isinstance(cell, str) else cell
    if step is None:
        raise ValueError(f"cell must be one of {sorted(STEP_FUNCTIONS)} or a step function, got {cell!r}")
    xs = jnp.asarray(xs)
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape {'[T, B, F]' if time_major else '[B, T, F]'}, got shape {xs.shape}")
    shape = xs.shape
    if not time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    length, batch, features = xs.shape
    if params.w_ih.ndim != 2 or params.w_ih.shape[0] != features:
        raise ValueError(f"xs has {features} features (shape {shape}) but w_ih has shape {params.w_ih.shape}")
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

    x_proj = xs.reshape(length * batch, features) @ params.w_ih
    if params.b_ih is not None:
        x_proj = x_proj + params.b_ih
    x_proj = x_proj.reshape(length, batch, params.w_ih.shape[1])

    if lengths is None:
        def body(carry, x_t):
            return step(params, carry, x_t)

        carry, outs = jax.lax.scan(body, carry0, x_proj, reverse=reverse)
    else:
        valid = jnp.arange(length)[:, None] < lengths[None, :]  # [T, B]

        def masked_body(carry, inputs):
            x_t, valid_t = inputs
            new_carry, out = step(params, carry, x_t)
            keep = valid_t[:, None]
            new_carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
            return new_carry, jnp.where(keep, out, jnp.zeros_like(out))

        carry, outs = jax.lax.scan(masked_body, carry0, (x_proj, valid), reverse=reverse)
    return (outs if time_major else jnp.swapaxes(outs, 0, 1)), carry
