"""The fused CPU attention kernel (flaxlm.ops.cpu_attention): torch SDPA parity of values and gradients, the
automatic choice of it, its refusals, vmap, and the fallback when it cannot be compiled."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops import cpu_attention
from flaxlm.ops.attention import CPU_KERNEL_SWITCH, dot_product_attention, dot_product_self_attention
from flaxlm.ops.masks import causal_mask

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernel is for XLA:CPU")

# (batch, query length, key length, heads, head_dim, causal): rows and keys that are not multiples of the
# kernel's 8-row blocks and 8-wide vectors, more than one block, keys longer and shorter than queries.
SHAPES = [
    (2, 5, 6, 4, 8, False),
    (2, 13, 13, 3, 16, True),
    (1, 70, 70, 2, 64, True),
    (2, 5, 9, 2, 8, True),
    (2, 9, 4, 2, 8, True),
    (3, 17, 33, 1, 24, False),
]


def _operands(b, t, s, h, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))
    cot = rng.standard_normal((b, t, h, d), dtype=np.float32)
    return q, k, v, cot


def _torch_reference(q, k, v, cot, causal):
    """torch SDPA (top-left causal mask, as dot_product_attention's is_causal) -> out and the q, k, v grads."""
    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    tq, tk, tv = (a.transpose(1, 2) for a in leaves)
    mask = torch.tensor(np.asarray(causal_mask(q.shape[1], k.shape[1]))) if causal else None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask).transpose(1, 2)
    (out * torch.tensor(cot)).sum().backward()
    return out.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("_causal" if s[5] else ""))
def test_kernel_matches_torch_sdpa(shape):
    *dims, causal = shape
    q, k, v, cot = _operands(*dims)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, is_causal=causal, implementation="cpu")
        return jnp.sum(out * cot), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref_out, ref_grads = _torch_reference(q, k, v, cot, causal)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_packed_kernel_equals_the_split_xla_path(causal):
    """Self-attention on one packed qkv [B, T, 3, H, D]: the kernel reads it in place and returns one gradient."""
    qkv = np.random.default_rng(4).standard_normal((2, 21, 3, 2, 16), dtype=np.float32)
    cot = np.random.default_rng(5).standard_normal((2, 21, 2, 16), dtype=np.float32)

    def loss(qkv, implementation):
        out = dot_product_self_attention(qkv, is_causal=causal, implementation=implementation)
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g, out), (ref_g, ref_out) = grad(qkv, "cpu"), grad(qkv, "xla")
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    np.testing.assert_allclose(g, ref_g, atol=2e-5, rtol=0)
    program = str(jax.make_jaxpr(lambda x: jax.grad(lambda x: loss(x, None)[0])(x))(qkv))
    assert cpu_attention.PACKED_FORWARD_TARGET in program and cpu_attention.PACKED_BACKWARD_TARGET in program
    masked = str(jax.make_jaxpr(lambda x: dot_product_self_attention(x, mask=np.ones((21, 21), bool)))(qkv))
    assert "flaxlm_cpu_attention" not in masked
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, D\]"):
        dot_product_self_attention(qkv[:, :, :2])


def _uses_kernel(fn, *args) -> bool:
    return cpu_attention.FORWARD_TARGET in str(jax.make_jaxpr(fn)(*args))


def test_default_takes_the_kernel_only_where_it_applies(monkeypatch):
    q, k, v, _ = _operands(2, 8, 8, 2, 8)
    assert _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v), q, k, v)
    mask = np.ones((2, 1, 1, 8), bool)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, mask=mask), q, k, v)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, bias=np.zeros((8, 8), np.float32)), q, k, v)
    key = jax.random.key(0)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, dropout_rate=0.1, dropout_key=key), q, k, v)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, return_weights=True), q, k, v)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"), q, k, v)
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v), *(x[..., :4] for x in (q, k, v)))
    monkeypatch.setenv(CPU_KERNEL_SWITCH, "0")
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, implementation="cpu"), q, k, v)


def test_other_backends_never_take_the_kernel(monkeypatch):
    """With another default backend (a GPU, faked here) the default path skips the kernel and 'cpu' says why."""
    q, k, v, _ = _operands(2, 8, 8, 2, 8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _uses_kernel(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True), q, k, v)
    with pytest.raises(ValueError, match="implementation='cpu' cannot run this call: .*XLA:CPU.*'gpu'"):
        dot_product_attention(q, k, v, implementation="cpu")


@pytest.mark.parametrize("request_, message", [
    (dict(mask=np.ones((1, 1, 8, 8), bool)), "mask"),
    (dict(dropout_rate=0.1, dropout_key=jax.random.key(0)), "dropout"),
    (dict(return_weights=True), "weights"),
    (dict(dtype=jnp.bfloat16), "float32"),
    (dict(kv_heads=1), "grouped-query"),
    (dict(head_dim=12), "head_dim"),
])
def test_cpu_implementation_refuses_what_it_cannot_do(request_, message):
    request_ = dict(request_)
    dtype, kv_heads, head_dim = (request_.pop(n, d) for n, d in (("dtype", jnp.float32), ("kv_heads", 2),
                                                                  ("head_dim", 8)))
    q = jnp.ones((2, 8, 2, head_dim), dtype)
    k = v = jnp.ones((2, 8, kv_heads, head_dim), dtype)
    with pytest.raises(ValueError, match=f"implementation='cpu' cannot run this call: .*{message}"):
        dot_product_attention(q, k, v, implementation="cpu", **request_)


def test_vmap_over_a_leading_axis_equals_each_slice():
    q, k, v, cot = _operands(6, 11, 11, 2, 16, seed=3)
    stack = [x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v, cot)]

    def grads(q, k, v, cot):
        loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, is_causal=True, implementation="cpu") * cot)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def packed_grad(q, k, v, cot):
        loss = lambda x: jnp.sum(dot_product_self_attention(x, is_causal=True, implementation="cpu") * cot)
        return jax.grad(loss)(jnp.stack([q, k, v], axis=2))

    batched = jax.jit(jax.vmap(grads))(*stack)
    batched_packed = jax.jit(jax.vmap(packed_grad))(*stack)
    for i in range(3):
        for g, ref in zip(batched, grads(*(x[i] for x in stack))):
            np.testing.assert_allclose(g[i], ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(batched_packed[i], packed_grad(*(x[i] for x in stack)), atol=1e-6, rtol=0)


def _run_in_fresh_process(script: str, cache, **env) -> subprocess.CompletedProcess:
    """Runs `script` in a new Python with the kernel cache at `cache` (the kernel is loaded once per process);
    asserts that it exited 0."""
    environ = {**os.environ, "FLAXLM_KERNEL_CACHE": str(cache), **env}
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_a_failed_compile_falls_back_to_xla_with_the_reason(tmp_path):
    """With a compiler that fails, unavailable_reason() names the source and the command, one warning says so,
    and the default path is the XLA one (a fresh process: the kernel is loaded once per process)."""
    script = (
        "import numpy as np, jax\n"
        "from flaxlm.ops import cpu_attention\n"
        "from flaxlm.ops.attention import dot_product_attention\n"
        "reason = cpu_attention.unavailable_reason()\n"
        "assert 'compiling' in reason and 'cpu_attention.cc' in reason and 'false' in reason, reason\n"
        "q = np.ones((1, 4, 1, 8), np.float32)\n"
        "program = str(jax.make_jaxpr(lambda q: dot_product_attention(q, q, q, is_causal=True))(q))\n"
        "assert cpu_attention.FORWARD_TARGET not in program\n"
        "print('fell back')\n"
    )
    done = _run_in_fresh_process(script, tmp_path, CXX="false")
    assert "fell back" in done.stdout
    assert done.stderr.count("fused CPU attention kernel is unavailable") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_cache_compiles_and_registers_the_kernel(tmp_path):
    """On a machine without the cached library, the first use compiles it into $FLAXLM_KERNEL_CACHE, registers
    the targets and gives the same attention as the XLA path (a fresh process, as a first run is)."""
    script = (
        "import numpy as np, jax\n"
        "from flaxlm.ops import cpu_attention\n"
        "from flaxlm.ops.attention import dot_product_attention\n"
        "assert cpu_attention.unavailable_reason() == ''\n"
        "q = np.random.default_rng(0).standard_normal((1, 9, 2, 8), np.float32)\n"
        "out = dot_product_attention(q, q, q, is_causal=True, implementation='cpu')\n"
        "ref = dot_product_attention(q, q, q, is_causal=True, implementation='xla')\n"
        "np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)\n"
        "print('compiled')\n"
    )
    done = _run_in_fresh_process(script, tmp_path)
    assert "compiled" in done.stdout and "unavailable" not in done.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_a_broken_cached_library_is_reported_not_loaded(tmp_path):
    """A damaged file where the cached library should be: the reason names it and how to rebuild."""
    script = (
        "from flaxlm.ops import cpu_attention\n"
        "cpu_attention.library_path().write_bytes(b'not a library')\n"
        "reason = cpu_attention.unavailable_reason()\n"
        "assert 'cannot load' in reason and 'delete it to rebuild' in reason, reason\n"
        "print('reported')\n"
    )
    assert "reported" in _run_in_fresh_process(script, tmp_path).stdout
