"""Load nanoGPT checkpoints (`ckpt.pt` with 'model' and 'model_args') into `flaxlm.models.gpt.GPT`.

nanoGPT keys and their GPT parameters (torch Linear weights are [out, in]; flaxlm kernels are [in, ...]):

    transformer.wte.weight [V, C]                 wte.embedding (also the output projection when tied)
    transformer.wpe.weight [block_size, C]        wpe.embedding
    transformer.h.{i}.ln_1.weight / .bias         blocks.layers.self_attn_norm.scale / .bias   [layer i]
    transformer.h.{i}.attn.c_attn.weight [3C, C]  blocks.layers.self_attn.qkv_kernel [C, 3, H, D]
    transformer.h.{i}.attn.c_attn.bias [3C]       blocks.layers.self_attn.qkv_bias [3, H, D]
    transformer.h.{i}.attn.c_proj.weight [C, C]   blocks.layers.self_attn.out_kernel [H, D, C]  (+ .bias)
    transformer.h.{i}.ln_2.weight / .bias         blocks.layers.ffn_norm.scale / .bias
    transformer.h.{i}.mlp.c_fc.weight [4C, C]     blocks.layers.ffn.up.kernel [C, 4C]  (+ .bias)
    transformer.h.{i}.mlp.c_proj.weight [C, 4C]   blocks.layers.ffn.down.kernel [4C, C]  (+ .bias)
    transformer.ln_f.weight / .bias               blocks.final_norm.scale / .bias
    lm_head.weight [V, C]                         tied to wte; a different matrix loads into lm_head.kernel

Keys may carry torch.compile's '_orig_mod.' prefix. nanoGPT's causal-mask buffers `transformer.h.{i}.attn.bias`
(written when flash attention is unavailable) are not weights and are skipped. torch is imported only by
`load_nanogpt`; `gpt_from_nanogpt_state_dict` takes torch tensors or numpy arrays.
"""

import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.models.gpt import GPT, GPTConfig

_PREFIX = "_orig_mod."
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias")
_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def load_nanogpt(path: str | os.PathLike) -> tuple[GPT, GPTConfig]:
    """Read a nanoGPT `ckpt.pt` (torch.load with weights_only=True) -> (GPT with its weights, GPTConfig)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"nanoGPT checkpoint not found: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install torch)") from e
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict with 'model' and 'model_args', got {type(checkpoint).__name__}")
    for key in ("model", "model_args"):
        if key not in checkpoint:
            raise ValueError(f"{path}: checkpoint has no '{key}' entry (keys: {sorted(checkpoint)})")
    return gpt_from_nanogpt_state_dict(checkpoint["model"], checkpoint["model_args"])


def gpt_from_nanogpt_state_dict(state_dict: Mapping, model_args: Mapping) -> tuple[GPT, GPTConfig]:
    """nanoGPT state_dict (torch tensors or arrays) and model_args -> (GPT, GPTConfig).

    Raises ValueError naming the key for missing model_args, unknown or missing state_dict keys and shape
    mismatches.
    """
    weights = {_strip_prefix(k): _to_numpy(v) for k, v in state_dict.items()}
    cfg = _config(model_args, weights)
    _check_keys_and_shapes(weights, _expected_shapes(cfg))
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    _assign(model, weights, cfg)
    return model, cfg


def _strip_prefix(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 included) or array -> float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _config(model_args: Mapping, weights: dict[str, np.ndarray]) -> GPTConfig:
    missing = [k for k in _MODEL_ARGS if k not in model_args]
    if missing:
        raise ValueError(f"model_args is missing {missing} (got keys {sorted(model_args)})")
    lm_head = weights.get("lm_head.weight")
    wte = weights.get("transformer.wte.weight")
    tied = lm_head is None or (wte is not None and lm_head.shape == wte.shape and np.array_equal(lm_head, wte))
    return GPTConfig(
        vocab_size=int(model_args["vocab_size"]),
        block_size=int(model_args["block_size"]),
        n_layer=int(model_args["n_layer"]),
        n_head=int(model_args["n_head"]),
        n_embd=int(model_args["n_embd"]),
        dropout=float(model_args.get("dropout", 0.0)),
        bias=bool(model_args["bias"]),
        tie_embeddings=tied,
    )


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    c, v = cfg.n_embd, cfg.vocab_size
    shapes = {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (cfg.block_size, c)}
    linears = {"attn.c_attn": (3 * c, c), "attn.c_proj": (c, c), "mlp.c_fc": (4 * c, c), "mlp.c_proj": (c, 4 * c)}
    norms = [f"transformer.h.{i}.{n}" for i in range(cfg.n_layer) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]
    for name in norms:
        shapes[f"{name}.weight"] = (c,)
        if cfg.bias:
            shapes[f"{name}.bias"] = (c,)
    for i in range(cfg.n_layer):
        for name, shape in linears.items():
            shapes[f"transformer.h.{i}.{name}.weight"] = shape
            if cfg.bias:
                shapes[f"transformer.h.{i}.{name}.bias"] = shape[:1]
    shapes["lm_head.weight"] = (v, c)
    return shapes


def _check_keys_and_shapes(weights: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    unknown = sorted(k for k in weights if k not in expected and not _MASK_BUFFER.fullmatch(k))
    if unknown:
        raise ValueError(f"unknown nanoGPT state_dict key {unknown[0]!r} ({len(unknown)} unknown: {unknown[:5]})")
    missing = sorted(k for k in expected if k not in weights and k != "lm_head.weight")
    if missing:
        raise ValueError(f"missing nanoGPT state_dict key {missing[0]!r} ({len(missing)} missing: {missing[:5]})")
    for key, shape in expected.items():
        if key in weights and weights[key].shape != shape:
            raise ValueError(f"state_dict key {key!r} has shape {weights[key].shape}, expected {shape}")


def _assign(model: GPT, weights: dict[str, np.ndarray], cfg: GPTConfig) -> None:
    """Set every parameter of `model` (built with nnx.eval_shape) from the checked nanoGPT weights."""
    c, h = cfg.n_embd, cfg.n_head
    d = c // h

    def layers(name: str, transform=lambda w: w) -> np.ndarray:
        return np.stack([transform(weights[f"transformer.h.{i}.{name}"]) for i in range(cfg.n_layer)])

    def put(param: nnx.Param, value: np.ndarray) -> None:
        param.set_value(jnp.array(value, dtype=cfg.param_dtype))

    put(model.wte.embedding, weights["transformer.wte.weight"])
    put(model.wpe.embedding, weights["transformer.wpe.weight"])
    blocks = model.blocks.layers
    attn = blocks.self_attn
    put(attn.qkv_kernel, layers("attn.c_attn.weight", lambda w: w.T.reshape(c, 3, h, d)))
    put(attn.out_kernel, layers("attn.c_proj.weight", lambda w: w.T.reshape(h, d, c)))
    put(blocks.ffn.up.kernel, layers("mlp.c_fc.weight", lambda w: w.T))
    put(blocks.ffn.down.kernel, layers("mlp.c_proj.weight", lambda w: w.T))
    norms = ((blocks.self_attn_norm, "ln_1"), (blocks.ffn_norm, "ln_2"))
    for norm, name in norms:
        put(norm.scale, layers(f"{name}.weight"))
    put(model.blocks.final_norm.scale, weights["transformer.ln_f.weight"])
    if cfg.bias:
        put(attn.qkv_bias, layers("attn.c_attn.bias", lambda b: b.reshape(3, h, d)))
        put(attn.out_bias, layers("attn.c_proj.bias"))
        put(blocks.ffn.up.bias, layers("mlp.c_fc.bias"))
        put(blocks.ffn.down.bias, layers("mlp.c_proj.bias"))
        for norm, name in norms:
            put(norm.bias, layers(f"{name}.bias"))
        put(model.blocks.final_norm.bias, weights["transformer.ln_f.bias"])
    if model.lm_head is not None:
        put(model.lm_head.kernel, weights["lm_head.weight"].T)
    unset = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if unset:
        raise AssertionError(f"nanoGPT loader left parameters unset: {unset}")
