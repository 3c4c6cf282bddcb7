"""Fused scaled dot-product attention for XLA:CPU: a C++ kernel called through the XLA FFI.

XLA:CPU runs attention as separate batched products, softmax fusions and transposes. The kernel in
`cpu_attention.cc` does one (batch, head) pair at a time in cache: logits of a block of query rows, their
softmax and the weighted sum of values, without writing the [T, S] weights to memory; its backward pass
recomputes the weights from the saved log-sum-exp (as FlashAttention does). It reads and writes JAX's
[B, T, H, D] layout directly, so no transposes surround it.

The kernel is compiled on first use with the C++ compiler named by $CXX (default `g++`) into
$FLAXLM_KERNEL_CACHE (default ~/.cache/flaxlm/kernels), keyed by the source, jaxlib's version and the flags,
and registered as FFI targets. When that fails (no compiler, an unwritable cache) the attention op takes the
XLA path, with one RuntimeWarning per process; `unavailable_reason()` gives the reason ('' when it can run).

Scope: float32 q, k, v of shape [..., T, H, D] / [..., S, H, D] with the same number of query and key/value
heads, D a multiple of 8 and equal for q and v (or, for self-attention, one packed qkv [..., T, 3, H, D]: no
slices of it are copied in the forward pass and its gradient is one array), optional causal masking (query t
sees keys s <= t), no other mask, bias or dropout. Reverse-mode differentiation only (jax.grad, jax.vjp);
forward mode (jax.jvp) needs the XLA path (`implementation='xla'`).
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FORWARD_TARGET = "flaxlm_cpu_attention_forward"
BACKWARD_TARGET = "flaxlm_cpu_attention_backward"
PACKED_FORWARD_TARGET = "flaxlm_cpu_attention_forward_packed"
PACKED_BACKWARD_TARGET = "flaxlm_cpu_attention_backward_packed"
_SYMBOLS = {  # FFI target -> handler symbol in the compiled library
    FORWARD_TARGET: "FlaxlmAttentionForward",
    BACKWARD_TARGET: "FlaxlmAttentionBackward",
    PACKED_FORWARD_TARGET: "FlaxlmAttentionForwardPacked",
    PACKED_BACKWARD_TARGET: "FlaxlmAttentionBackwardPacked",
}
# checkpoint_name of the forward pass's residuals: remat policies that keep them spare the backward pass a
# second forward kernel (flaxlm.nn.transformer's 'dots' and 'dots_all' do).
RESIDUAL_NAMES = ("attention_out", "attention_lse")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_command(output: Path) -> list[str]:
    """The compiler command that builds the kernel into `output` (AVX2/FMA code where the CPU has both)."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return [os.environ.get("CXX", "g++"), *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "flaxlm" / "kernels"
    return Path(os.environ.get("FLAXLM_KERNEL_CACHE", default))


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The registered kernel library, or why it is unavailable (warned about once per process)."""
    loaded = _build_and_register()
    if isinstance(loaded, str):
        warnings.warn(f"flaxlm: the fused CPU attention kernel is unavailable, attention takes XLA's path: {loaded}",
                      RuntimeWarning, stacklevel=2)
    return loaded


def library_path() -> Path:
    """Where the compiled kernel is cached: named by a hash of the source, the compile command and jaxlib's version."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(compile_command(Path("lib.so"))).encode()
                         + jax.lib.__version__.encode())
    return _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"


def _build_and_register() -> ctypes.CDLL | str:
    """Compiles (once per source, jaxlib version and flags) and registers the kernel; an error message on failure."""
    library = library_path()
    cache = library.parent
    if not library.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / library.name
                command = compile_command(built)
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    return f"compiling {SOURCE} failed ({' '.join(command)}):\n{done.stderr[-2000:]}"
                os.replace(built, library)  # atomic: processes compiling at once each install a whole file
        except OSError as e:
            return f"cannot build {library}: {e}"
    try:
        lib = ctypes.cdll.LoadLibrary(str(library))
        handlers = {target: getattr(lib, symbol) for target, symbol in _SYMBOLS.items()}
    except (OSError, AttributeError) as e:
        return f"cannot load {library} (delete it to rebuild): {e}"
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return lib


def unavailable_reason() -> str:
    """'' when the kernel is built and registered, otherwise why not (the compiler's message included)."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else ""


def unsupported_reason(q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    """Why the kernel cannot take these operands ('' when it can); masks, bias and dropout are checked by the caller."""
    if not q.dtype == k.dtype == v.dtype == jnp.float32:
        return f"q/k/v must be float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.shape[-2] != q.shape[-2]:
        return f"grouped-query attention is not implemented (q {q.shape}, k {k.shape})"
    if q.shape[-1] % 8 or v.shape[-1] != q.shape[-1]:
        return f"head_dim must be a multiple of 8 and equal for q and v, got q {q.shape}, v {v.shape}"
    if 0 in q.shape or 0 in k.shape:
        return f"empty operands: q {q.shape}, k {k.shape}"
    return ""


def _forward_call(target, operands, out_shape, is_causal):
    """-> out [B, T, H, D] and the log-sum-exp of each query row's scaled logits [B, H, T]."""
    *lead, q_len, heads, head_dim = out_shape
    shapes = (jax.ShapeDtypeStruct(out_shape, jnp.float32), jax.ShapeDtypeStruct((*lead, heads, q_len), jnp.float32))
    call = jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")
    out, lse = call(*operands, causal=is_causal, scale=np.float32(1.0 / math.sqrt(head_dim)))
    return tuple(checkpoint_name(x, name) for x, name in zip((out, lse), RESIDUAL_NAMES))


def _backward_call(target, operands, grad_shapes, is_causal):
    shapes = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in grad_shapes)
    call = jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")
    return call(*operands, causal=is_causal, scale=np.float32(1.0 / math.sqrt(grad_shapes[0][-1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    """softmax(q k^T / sqrt(D), causal if asked) v for q [B, T, H, D], k/v [B, S, H, D] -> [B, T, H, D]."""
    return _forward_call(FORWARD_TARGET, (q, k, v), q.shape, is_causal)[0]


def _fused_forward(q, k, v, is_causal):
    out, lse = _forward_call(FORWARD_TARGET, (q, k, v), q.shape, is_causal)
    return out, (q, k, v, out, lse)


def _fused_backward(is_causal, residuals, d_out):
    q, k, v, out, lse = residuals
    return _backward_call(BACKWARD_TARGET, (q, k, v, out, lse, d_out), (q.shape, k.shape, v.shape), is_causal)


fused_attention.defvjp(_fused_forward, _fused_backward)


def _packed_out_shape(qkv):
    return qkv.shape[:-3] + qkv.shape[-2:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fused_self_attention(qkv: jax.Array, is_causal: bool) -> jax.Array:
    """fused_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]) for qkv [B, T, 3, H, D], read in
    place -> [B, T, H, D]; its gradient is one [B, T, 3, H, D] array."""
    return _forward_call(PACKED_FORWARD_TARGET, (qkv,), _packed_out_shape(qkv), is_causal)[0]


def _packed_forward(qkv, is_causal):
    out, lse = _forward_call(PACKED_FORWARD_TARGET, (qkv,), _packed_out_shape(qkv), is_causal)
    return out, (qkv, out, lse)


def _packed_backward(is_causal, residuals, d_out):
    qkv, out, lse = residuals
    return _backward_call(PACKED_BACKWARD_TARGET, (qkv, out, lse, d_out), (qkv.shape,), is_causal)


fused_self_attention.defvjp(_packed_forward, _packed_backward)
