"""`flaxlm bench`: compile time, median step time, tokens/s and MFU of a config's train step.

MFU = model FLOPs per step / median step time / peak, where the peak is a large float32 matmul measured
through `jax.jit` in the same process (so a noisy shared machine is measured at the same moment).
"""

import statistics
import time

import jax
import jax.numpy as jnp

from flaxlm.experiment import ExperimentConfig
from flaxlm.train.sharding import shard_batch


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul under jax.jit (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench(cfg: ExperimentConfig, steps: int = 20) -> dict[str, float]:
    """Time `steps` train steps after compilation (each synchronised) and report the figures as a dict."""
    from flaxlm.trainer import build_run

    run = build_run(cfg)
    data = run.task.train_iterator()
    batches = [shard_batch(next(data), run.mesh) for _ in range(steps + 1)]
    state = run.state
    start = time.perf_counter()
    state, metrics = run.train_step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_time = time.perf_counter() - start
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = run.task.model_flops_per_step()
    peak = matmul_peak_flops()
    return {
        "compile_time_s": compile_time,
        "median_step_time_s": median,
        "tokens_per_s": run.task.tokens_per_batch / median,
        "model_flops_per_step": flops,
        "peak_flops": peak,
        "mfu": flops / median / peak,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "dot_backend": cfg.train.dot_backend,
    }
