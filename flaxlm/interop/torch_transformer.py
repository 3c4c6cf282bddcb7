"""Load torch.nn.MultiheadAttention / TransformerEncoderLayer / TransformerDecoderLayer state_dicts.

Each converter takes a flaxlm module built with matching hyper-parameters (the template) and a torch state_dict,
and returns a NEW module holding the torch weights; the template is left untouched. Unknown keys, missing keys and
shape mismatches raise ValueError naming the key (and both shapes). Torch is not imported: the state_dict values
may be torch tensors or anything numpy.asarray accepts.

Torch layout -> flaxlm layout (F in, Fkv key/value in, H heads, D head_dim, y = x @ W.T + b in torch):
    in_proj_weight [3HD, F]           -> qkv_kernel [F, 3, H, D] (fused) or q/k/v_kernel [F, H, D]
    q/k/v_proj_weight [HD, F|Fkv]     -> q/k/v_kernel [F|Fkv, H, D] (or the slices of a fused qkv_kernel)
    in_proj_bias [3HD]                -> qkv_bias [3, H, D] or q/k/v_bias [H, D]
    out_proj.weight [Fout, HD]        -> out_kernel [H, D, Fout];  out_proj.bias -> out_bias
    linear1/linear2 .weight/.bias     -> ffn.up / ffn.down .kernel (transposed) / .bias
    norm1, norm2[, norm3] .weight/.bias -> self_attn_norm, [cross_attn_norm,] ffn_norm .scale/.bias
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.nn.attention import MultiHeadAttention
from flaxlm.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer


class _Write(NamedTuple):
    path: tuple[str, ...]  # attribute path of an nnx.Param in the new module
    index: Any  # None = the whole parameter, else the slice that receives the value
    transform: Callable[[np.ndarray], np.ndarray]


class _Entry(NamedTuple):
    key: str
    shape: tuple[int, ...]  # the torch shape this module expects
    writes: tuple[_Write, ...]


def mha_from_torch(module: MultiHeadAttention, state_dict: Mapping[str, Any]) -> MultiHeadAttention:
    """New MultiHeadAttention with the weights of a torch.nn.MultiheadAttention state_dict.

    Both torch layouts load into both flaxlm layouts: in_proj_weight (kdim == vdim == embed_dim) and separate
    q/k/v_proj_weight (kdim/vdim differ from embed_dim; flaxlm needs kdim == vdim == kv_features).
    add_bias_kv (bias_k, bias_v) has no flaxlm equivalent and is rejected as unknown keys.
    """
    _check_type(module, MultiHeadAttention)
    sd = _numpy_state_dict(state_dict)
    return _convert(module, sd, _mha_entries(module, sd, ""))


def encoder_layer_from_torch(module: TransformerEncoderLayer, state_dict: Mapping[str, Any]) -> TransformerEncoderLayer:
    """New TransformerEncoderLayer with the weights of a torch.nn.TransformerEncoderLayer state_dict.

    The template must match torch's d_model, nhead, dim_feedforward, activation, norm_first, layer_norm_eps and
    bias (only shapes can be checked from a state_dict).
    """
    _check_type(module, TransformerEncoderLayer)
    sd = _numpy_state_dict(state_dict)
    entries = _mha_entries(module.self_attn, sd, "self_attn.")
    entries += _ffn_entries(module)
    entries += _norm_entries(module, "norm1.", "self_attn_norm") + _norm_entries(module, "norm2.", "ffn_norm")
    return _convert(module, sd, entries)


def decoder_layer_from_torch(module: TransformerDecoderLayer, state_dict: Mapping[str, Any]) -> TransformerDecoderLayer:
    """New TransformerDecoderLayer (cross_attention=True) with a torch.nn.TransformerDecoderLayer's weights."""
    _check_type(module, TransformerDecoderLayer)
    if not module.cross_attention:
        raise ValueError("torch.nn.TransformerDecoderLayer has cross-attention; the template has cross_attention=False")
    sd = _numpy_state_dict(state_dict)
    entries = _mha_entries(module.self_attn, sd, "self_attn.")
    entries += _mha_entries(module.cross_attn, sd, "multihead_attn.", path=("cross_attn",))
    entries += _ffn_entries(module)
    entries += _norm_entries(module, "norm1.", "self_attn_norm") + _norm_entries(module, "norm2.", "cross_attn_norm")
    entries += _norm_entries(module, "norm3.", "ffn_norm")
    return _convert(module, sd, entries)


def _check_type(module, cls) -> None:
    if not isinstance(module, cls):
        raise ValueError(f"expected a flaxlm {cls.__name__} template, got {type(module).__name__}")


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    def to_numpy(value):
        if hasattr(value, "detach"):  # torch.Tensor, without importing torch
            return value.detach().cpu().float().numpy()
        return np.asarray(value)

    return {key: to_numpy(value) for key, value in state_dict.items()}


def _mha_entries(mha: MultiHeadAttention, sd, prefix: str, path: tuple[str, ...] = ("self_attn",)) -> list[_Entry]:
    path = path if prefix else ()
    h, kv, d = mha.num_heads, mha.num_kv_heads, mha.head_dim
    f, fkv, fout = mha.in_features, mha.kv_features, mha.out_features

    def kernel(heads):
        return lambda w: w.T.reshape(w.shape[1], heads, d)

    def proj_writes(j, heads):
        if mha.fused_qkv:
            return (_Write(path + ("qkv_kernel",), (slice(None), j), kernel(heads)),)
        return (_Write(path + ("qkv"[j] + "_kernel",), None, kernel(heads)),)

    entries = []
    if prefix + "in_proj_weight" in sd:
        if fkv != f:
            raise ValueError(
                f"{prefix}in_proj_weight is torch's layout for kdim == vdim == embed_dim, but the template has "
                f"kv_features={fkv} != in_features={f}"
            )
        sizes = (h * d, kv * d, kv * d)
        bounds = np.cumsum((0,) + sizes)
        writes = tuple(
            _Write(w.path, w.index, (lambda w_, lo=bounds[j], hi=bounds[j + 1], t=w.transform: t(w_[lo:hi])))
            for j, heads in enumerate((h, kv, kv))
            for w in proj_writes(j, heads)
        )
        entries.append(_Entry(prefix + "in_proj_weight", (sum(sizes), f), writes))
    else:
        for j, (name, heads, fin) in enumerate((("q", h, f), ("k", kv, fkv), ("v", kv, fkv))):
            entries.append(_Entry(f"{prefix}{name}_proj_weight", (heads * d, fin), proj_writes(j, heads)))
    if mha.use_bias:
        sizes = (h * d, kv * d, kv * d)
        bounds = np.cumsum((0,) + sizes)
        if mha.fused_qkv:
            bias_writes = (_Write(path + ("qkv_bias",), None, lambda b: b.reshape(3, h, d)),)
        else:
            bias_writes = tuple(
                _Write(path + (name + "_bias",), None, lambda b, lo=bounds[j], hi=bounds[j + 1], n=heads:
                       b[lo:hi].reshape(n, d))
                for j, (name, heads) in enumerate((("q", h), ("k", kv), ("v", kv)))
            )
        entries.append(_Entry(prefix + "in_proj_bias", (sum(sizes),), bias_writes))
        entries.append(_Entry(prefix + "out_proj.bias", (fout,), (_Write(path + ("out_bias",), None, lambda b: b),)))
    entries.append(
        _Entry(prefix + "out_proj.weight", (fout, h * d),
               (_Write(path + ("out_kernel",), None, lambda w: w.T.reshape(h, d, fout)),))
    )
    return entries


def _ffn_entries(layer) -> list[_Entry]:
    up, down = layer.ffn.up.kernel, layer.ffn.down.kernel
    transpose = lambda w: w.T  # noqa: E731
    entries = [
        _Entry("linear1.weight", up.shape[::-1], (_Write(("ffn", "up", "kernel"), None, transpose),)),
        _Entry("linear2.weight", down.shape[::-1], (_Write(("ffn", "down", "kernel"), None, transpose),)),
    ]
    if layer.use_bias:
        entries.append(_Entry("linear1.bias", (up.shape[1],), (_Write(("ffn", "up", "bias"), None, lambda b: b),)))
        entries.append(_Entry("linear2.bias", (down.shape[1],), (_Write(("ffn", "down", "bias"), None, lambda b: b),)))
    return entries


def _norm_entries(layer, prefix: str, name: str) -> list[_Entry]:
    features = (layer.d_model,)
    entries = [_Entry(prefix + "weight", features, (_Write((name, "scale"), None, lambda w: w),))]
    if layer.use_bias:
        entries.append(_Entry(prefix + "bias", features, (_Write((name, "bias"), None, lambda b: b),)))
    return entries


def _convert(module: nnx.Module, sd: dict[str, np.ndarray], entries: list[_Entry]) -> nnx.Module:
    expected = {entry.key: entry for entry in entries}
    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in state_dict for {type(module).__name__} (expected keys: "
                         f"{sorted(expected)})")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"missing key {missing[0]!r} in state_dict for {type(module).__name__}")
    for key, entry in expected.items():
        if sd[key].shape != entry.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: state_dict has {sd[key].shape}, module expects {entry.shape}"
            )
    new = nnx.clone(module)
    for entry in entries:
        for write in entry.writes:
            param = new
            for name in write.path:
                param = getattr(param, name)
            value = jnp.array(write.transform(sd[entry.key]), dtype=param.dtype)
            if write.index is None:
                param[...] = value
            else:
                param[...] = param[...].at[write.index].set(value)
    return new
