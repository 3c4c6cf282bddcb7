"""Which library runs the matrix products of a step compiled for XLA:CPU, chosen per compiled step.

XLA:CPU hands each dot to one of several kernel libraries; the choice is an XLA debug option, here passed
as `compiler_options` of one `jax.jit`, so it applies to that step only and not to the whole process:

    'xla'     XLA's default (YNNPACK for the row-major products, Eigen for the rest)
    'eigen'   Eigen for every product
    'onednn'  oneDNN for every product it supports (XLA's experimental oneDNN fusion), Eigen for the rest

Which is fastest depends on the host and the model (`benchmarks/dot_backends.py` measures it): on an AVX2
EPYC the larger GPT's train step ran 10-14% faster with Eigen and 9-10% with oneDNN, the nanoGPT-CPU one
the same within the host's noise, and the LSTM steps 7-19% slower with either.
On other platforms (GPU, TPU) the option does nothing. JAX cannot store 'onednn' programs in its
persistent compilation cache (it warns when one is configured), so they compile anew in every process.
JAX takes compile options only at the top-level jit: code that calls a step inside its own `jax.jit` gives
`compiler_options(name)` to that jit (as `make_ablation_step` does) and builds the step with 'xla'.
"""

from collections.abc import Sequence

import jax

CPU_OPTIONS = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
DOT_BACKENDS = ("xla", *CPU_OPTIONS)


def check_dot_backend(name: str) -> None:
    """A ValueError listing DOT_BACKENDS unless `name` is one of them."""
    if name not in DOT_BACKENDS:
        raise ValueError(f"dot_backend must be one of {DOT_BACKENDS}, got {name!r}")


def compiler_options(name: str, devices: Sequence[jax.Device] | None = None) -> dict | None:
    """The `jax.jit(compiler_options=...)` that select `name` for a step running on `devices`.

    `devices` default to `jax.devices()`. None (no options) for 'xla' and on platforms other than CPU.
    """
    check_dot_backend(name)
    platforms = {d.platform for d in (jax.devices() if devices is None else devices)}
    if name == "xla" or platforms != {"cpu"}:
        return None
    return dict(CPU_OPTIONS[name])
