"""Forward + backward time of flaxlm's LSTM and Transformer layers against the same PyTorch layers.

    python benchmarks/layers.py [--repeats 20] [--out benchmarks/results/layers.json]

Each row times one jitted (JAX) or eager (PyTorch) forward pass plus the gradient of the summed output
with respect to the input and all parameters, in float32 on this machine's CPU, in one process, the two
frameworks' calls alternating (one of each per repetition, so the host's drift hits both alike), and prints
each one's median per call and the median over repetitions of the ratio flaxlm / PyTorch within a repetition
(< 1 means flaxlm is faster).
"""

import argparse
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import alternating_seconds, paired_ratio  # noqa: E402

from flaxlm.nn.recurrent import RNN  # noqa: E402
from flaxlm.nn.transformer import TransformerEncoderLayer  # noqa: E402
from flaxlm.ops.attention import dot_product_attention  # noqa: E402


def _jax_fwd_bwd(module, x, **kwargs):
    grad = jax.jit(jax.grad(lambda m, x: m(x, **kwargs).sum(), argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(module, x))


def _torch_fwd_bwd(module, x, output=lambda y: y):
    x = x.clone().requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        output(module(x)).sum().backward()

    return run


def cases():
    """(name, flaxlm callable, torch callable) for each benchmarked layer."""
    rng = np.random.default_rng(0)
    b, t, f, h = 64, 64, 256, 256
    x = rng.standard_normal((b, t, f)).astype(np.float32)
    lstm = RNN(f, h, cell="lstm", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    torch_lstm = torch.nn.LSTM(f, h, num_layers=2, bidirectional=True, batch_first=True)
    yield ("BiLSTM 2x256, B=64 T=64", _jax_fwd_bwd(lstm, jnp.asarray(x)),
           _torch_fwd_bwd(torch_lstm, torch.from_numpy(x), output=lambda y: y[0]))

    b, t, d = 16, 128, 384
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    for norm_first in (False, True):
        layer = TransformerEncoderLayer(d, 6, 4 * d, dropout_rate=0.0, activation="gelu", norm_first=norm_first,
                                        rngs=nnx.Rngs(0))
        torch_layer = torch.nn.TransformerEncoderLayer(d, 6, 4 * d, dropout=0.0, activation="gelu",
                                                       norm_first=norm_first, batch_first=True)
        name = f"TransformerEncoderLayer d=384 h=6 {'pre' if norm_first else 'post'}-norm, B=16 T=128"
        yield (name, _jax_fwd_bwd(layer, jnp.asarray(x), is_causal=True),
               _torch_fwd_bwd(_CausalTorch(torch_layer, t), torch.from_numpy(x)))

    b, t, heads, d = 16, 256, 6, 64
    qkv = rng.standard_normal((3, b, t, heads, d)).astype(np.float32)
    yield ("Causal attention [B, T, H, D] = [16, 256, 6, 64] (gpt_large's)", _jax_attention(jnp.asarray(qkv)),
           _torch_attention(torch.from_numpy(qkv)))


def _jax_attention(qkv):
    """A call returns the gradient of sum(causal attention) with respect to qkv [3, B, T, H, D]."""
    grad = jax.jit(jax.grad(lambda qkv: dot_product_attention(*qkv, is_causal=True).sum()))
    return lambda: jax.block_until_ready(grad(qkv))


def _torch_attention(qkv):
    """The same with torch's SDPA, the tensors transposed to its [B, H, T, D] as nanoGPT does."""
    qkv = qkv.clone().requires_grad_(True)

    def run():
        qkv.grad = None
        q, k, v = (x.transpose(1, 2) for x in qkv)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return qkv.grad

    return run


class _CausalTorch(torch.nn.Module):
    """Runs a torch encoder layer with a causal mask (the same work as flaxlm's is_causal=True)."""

    def __init__(self, layer, length):
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x):
        return self.layer(x, src_mask=self.mask, is_causal=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print(f"| layer (forward+backward, float32, {jax.default_backend()}) | flaxlm ms | PyTorch ms | ratio |")
    print("|---|---|---|---|")
    for name, jax_fn, torch_fn in cases():
        times = alternating_seconds({"flaxlm": jax_fn, "torch": torch_fn}, args.repeats)
        jax_s, torch_s = statistics.median(times["flaxlm"]), statistics.median(times["torch"])
        ratio = paired_ratio(times["flaxlm"], times["torch"])
        rows.append({"layer": name, "flaxlm_s": jax_s, "torch_s": torch_s, "ratio": ratio})
        print(f"| {name} | {jax_s * 1e3:.1f} | {torch_s * 1e3:.1f} | {ratio:.2f} |", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
