"""Import PyTorch weights into flaxlm modules.

`from_torch(module, state_dict)` returns a NEW flaxlm module holding the weights of a PyTorch
`nn.RNN` / `nn.LSTM` / `nn.GRU` (into `flaxlm.nn.RNN`), `nn.MultiheadAttention` (into
`flaxlm.nn.MultiHeadAttention`), `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` (into the
matching flaxlm layers). The input module is left untouched. `load_nanogpt(path)` reads a nanoGPT
`ckpt.pt` into `(GPT, GPTConfig)`. Unknown or missing keys and shape mismatches raise ValueError naming
the key. torch itself is never imported here: state dicts may hold torch tensors or numpy arrays.
"""

from flaxlm.interop.nanogpt import load_nanogpt
from flaxlm.interop.torch_recurrent import recurrent_from_torch
from flaxlm.interop.torch_transformer import (
    decoder_layer_from_torch,
    encoder_layer_from_torch,
    mha_from_torch,
)
from flaxlm.nn.attention import MultiHeadAttention
from flaxlm.nn.recurrent import RNN
from flaxlm.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

_CONVERTERS = (
    (RNN, recurrent_from_torch),
    (MultiHeadAttention, mha_from_torch),
    (TransformerEncoderLayer, encoder_layer_from_torch),
    (TransformerDecoderLayer, decoder_layer_from_torch),
)

__all__ = ["from_torch", "load_nanogpt"]


def from_torch(module, state_dict):
    """Return a copy of flaxlm `module` with the weights of a PyTorch `state_dict` of the same layer kind."""
    for kind, convert in _CONVERTERS:
        if isinstance(module, kind):
            return convert(module, state_dict)
    supported = ", ".join(kind.__name__ for kind, _ in _CONVERTERS)
    raise TypeError(f"from_torch: no converter for {type(module).__name__}; supported: {supported}")
