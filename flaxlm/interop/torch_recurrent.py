"""Load torch nn.RNN / nn.LSTM / nn.GRU state_dicts into a flaxlm.nn.recurrent.RNN.

torch keys weight_ih_l{k}{s} [G*H, F_k], weight_hh_l{k}{s} [G*H, H], bias_ih_l{k}{s} [G*H], bias_hh_l{k}{s} [G*H]
(s = '' forward, '_reverse' backward) map to cell k * D + (s == '_reverse') as w_ih = weight_ih.T, w_hh = weight_hh.T,
b_ih = bias_ih, b_hh = bias_hh. Gate orders are already torch's, so no reordering happens.

torch's batch_first flag only changes the input layout, never the weights: flaxlm's RNN is batch first, so feed
time-major data [T, B, F] (a torch module with batch_first=False) as xs.swapaxes(0, 1) and swap the outputs back.
Final states already use torch's [L*D, B, H] layout. The RNN nonlinearity ('tanh'/'relu') is not stored in a
state_dict: build the flaxlm RNN with the same nonlinearity as the torch module.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.nn.recurrent import CELL_GATES, RNN

_GATES_TO_KIND = {gates: kind for kind, gates in CELL_GATES.items()}


def _to_numpy(value: Any) -> np.ndarray:
    """torch tensor (any device, any float dtype) or array-like -> numpy array."""
    if hasattr(value, "detach"):
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def _infer_kind(arrays: Mapping[str, np.ndarray]) -> str:
    for key in ("weight_ih_l0", "weight_hh_l0"):
        if key not in arrays:
            raise ValueError(f"state_dict has no {key!r}: not a torch nn.RNN/nn.LSTM/nn.GRU state_dict "
                             f"(keys: {sorted(arrays)})")
    rows, hidden = arrays["weight_hh_l0"].shape[0], arrays["weight_hh_l0"].shape[-1]
    kind = _GATES_TO_KIND.get(rows // hidden) if rows % hidden == 0 else None
    if kind is None:
        raise ValueError(f"cannot infer the cell kind from weight_hh_l0 of shape {arrays['weight_hh_l0'].shape}: "
                         f"expected [G*H, H] with G in {sorted(_GATES_TO_KIND)}")
    return kind


def recurrent_from_torch(
    module: RNN, state_dict: Mapping[str, Any], *, torch_module_kind: str | None = None
) -> RNN:
    """Return a copy of `module` holding the weights of a torch nn.RNN/nn.LSTM/nn.GRU `state_dict`.

    `module` is left untouched. torch_module_kind ('rnn' | 'lstm' | 'gru') is inferred from the weight shapes when
    None; it must match module.cell. Missing or unknown keys and shape mismatches raise ValueError naming the key
    (and both shapes, in torch's layout). Parameters are cast to the module's param dtype.
    """
    if not isinstance(module, RNN):
        raise TypeError(f"module must be a flaxlm.nn.recurrent.RNN, got {type(module).__name__}")
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    inferred = _infer_kind(arrays)
    if torch_module_kind is not None and torch_module_kind not in CELL_GATES:
        raise ValueError(f"torch_module_kind must be one of {sorted(CELL_GATES)}, got {torch_module_kind!r}")
    if torch_module_kind is not None and torch_module_kind != inferred:
        raise ValueError(f"torch_module_kind={torch_module_kind!r} but the state_dict weights are {inferred!r} "
                         f"(weight_hh_l0 shape {arrays['weight_hh_l0'].shape})")
    if inferred != module.cell:
        raise ValueError(f"state_dict is a torch {inferred!r} module but the flaxlm RNN has cell={module.cell!r}")

    new = nnx.clone(module)
    expected_keys = set()
    for layer in range(module.num_layers):
        for direction in range(module.num_directions):
            suffix = f"l{layer}" + ("_reverse" if direction == 1 else "")
            cell = new.cells[layer * module.num_directions + direction]
            targets = {f"weight_ih_{suffix}": (cell.w_ih, True), f"weight_hh_{suffix}": (cell.w_hh, True)}
            if module.use_bias:
                targets.update({f"bias_ih_{suffix}": (cell.b_ih, False), f"bias_hh_{suffix}": (cell.b_hh, False)})
            for key, (param, transpose) in targets.items():
                expected_keys.add(key)
                if key not in arrays:
                    raise ValueError(f"state_dict is missing {key!r} needed by the flaxlm RNN "
                                     f"(num_layers={module.num_layers}, bidirectional={module.bidirectional}, "
                                     f"use_bias={module.use_bias})")
                value = arrays[key]
                torch_shape = tuple(reversed(param.shape)) if transpose else tuple(param.shape)
                if value.shape != torch_shape:
                    raise ValueError(f"{key}: state_dict shape {value.shape}, expected {torch_shape} "
                                     f"(torch layout) for the flaxlm RNN")
                param[...] = jnp.array(value.T if transpose else value, dtype=param.dtype)
    unknown = sorted(set(arrays) - expected_keys)
    if unknown:
        hint = " (LSTM proj_size is not supported)" if any(k.startswith("weight_hr") for k in unknown) else ""
        raise ValueError(f"state_dict has keys the flaxlm RNN does not use: {unknown}{hint} "
                         f"(num_layers={module.num_layers}, bidirectional={module.bidirectional}, "
                         f"use_bias={module.use_bias})")
    return new
