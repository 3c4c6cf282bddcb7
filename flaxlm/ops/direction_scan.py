"""One loop over time for several independent recurrences, each running in its own time direction.

A bidirectional layer's two recurrences are independent, but as two `jax.lax.scan`s XLA:CPU runs them one after
the other, each step's small matmul split over all threads. In one loop the two directions' steps are independent
kernels of the same iteration, which XLA:CPU's thunk executor runs side by side: on the BiLSTM benchmark's shapes
(T = B = 64, H = 256) the forward recurrence of both directions took 24.5-25 ms in one loop against 27.3-28.2 ms as
two scans.

A stacked output may take over the memory of an array of its shape that is dead after the loop (`buffers`): XLA
then updates that array in place instead of zero-filling a fresh [T, ...] buffer before the loop (16 MiB per
direction for an LSTM's gates at those shapes). The array may be one of the loop's inputs, whose row t step t
reads before writing its output there; that stays in place only while every kernel reading row t runs before
the write, which XLA does not guarantee: when it recomputes the output in two kernels that both read the row,
it copies the whole array twice per step (tests/ops/test_direction_scan.py checks the LSTM's loops for that).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def scan_directions(body: Callable, carry: tuple, xs: tuple, reverses: Sequence[bool], buffers: tuple | None = None):
    """Like `jax.lax.scan`, for D recurrences at once, direction d reading time T - 1 - i at iteration i if reverses[d].

    body(carry, x) -> (carry, y): carry, x and y are tuples with one entry per direction; x[d] is xs[d] at that
    direction's time index. xs[d] is a pytree of time-major arrays [T, ...] (None leaves are passed through).
    buffers: optional, per direction a pytree shaped like y[d] whose leaves are None (a fresh zero-filled buffer) or
    an array of y's stacked shape and dtype that the output overwrites step by step (its old contents are never
    seen): an array the loop does not read, or one of xs[d]'s (the same object) that no other direction reads.
    Returns (final carry, ys): ys[d] is the pytree of y[d] stacked over time [T, ...], in time order (outputs of a
    reverse direction are not flipped).
    """
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("scan_directions needs at least one array in xs to know the number of steps")
    length = leaves[0].shape[0]
    directions = range(len(reverses))
    step_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    out_shapes = jax.eval_shape(lambda c, x: body(c, x)[1], carry, step_shapes)
    if buffers is None:
        buffers = tuple(None for _ in directions)

    # Every input and output array is one slot of the loop state, an output sharing its input's slot.
    slots, slot_of = [], {}

    def slot(array):
        if id(array) not in slot_of:
            slot_of[id(array)] = len(slots)
            slots.append(array)
        return slot_of[id(array)]

    x_slots = jax.tree.map(slot, xs)
    y_slots = tuple(_output_slots(out_shapes[d], buffers[d], slot, length, _others_inputs(xs, d)) for d in directions)
    if length == 0:
        return carry, jax.tree.map(lambda k: slots[k], y_slots)

    def time_of(d, i):
        return length - 1 - i if reverses[d] else i

    def step(i, state):
        carry, arrays = state
        x = tuple(jax.tree.map(lambda k: jax.lax.dynamic_index_in_dim(arrays[k], time_of(d, i), keepdims=False),
                               x_slots[d]) for d in directions)
        carry, y = body(carry, x)
        arrays = list(arrays)
        for d in directions:
            for k, value in zip(jax.tree.leaves(y_slots[d]), jax.tree.leaves(y[d])):
                arrays[k] = jax.lax.dynamic_update_index_in_dim(arrays[k], value, time_of(d, i), 0)
        return carry, tuple(arrays)

    carry, arrays = jax.lax.fori_loop(0, length, step, (carry, tuple(slots)))
    return carry, jax.tree.map(lambda k: arrays[k], y_slots)


def _others_inputs(xs: tuple, d: int) -> set:
    """ids of the arrays that directions other than d read (which d's outputs must not overwrite)."""
    return {id(a) for e, x in enumerate(xs) if e != d for a in jax.tree.leaves(x)}


def _output_slots(shapes, buffers, slot: Callable, length: int, others_inputs: set):
    """Slot numbers for one direction's outputs: the given buffer's slot, or a fresh zero-filled array's."""
    shape_leaves, treedef = jax.tree.flatten(shapes)
    buffer_leaves = [None] * len(shape_leaves) if buffers is None else treedef.flatten_up_to(buffers)
    slots = []
    for shape, buffer in zip(shape_leaves, buffer_leaves):
        stacked = (length, *shape.shape)
        if buffer is None:
            buffer = jnp.zeros(stacked, shape.dtype)
        elif buffer.shape != stacked or buffer.dtype != shape.dtype:
            raise ValueError(f"an output buffer must have the output's stacked shape {stacked} and dtype "
                             f"{shape.dtype}, got {buffer.shape} {buffer.dtype}")
        elif id(buffer) in others_inputs:
            raise ValueError("an output buffer must not be an input of another direction")
        slots.append(slot(buffer))
    return treedef.unflatten(slots)
