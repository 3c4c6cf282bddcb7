"""XLA:CPU's matmul back ends (YNNPACK, XLA's default; Eigen; oneDNN) against PyTorch, alternating in one process.

    python benchmarks/dot_backends.py --products --steps-of gpt_cpu gpt_large bilstm seq2seq \\
        --out benchmarks/results/dot_backends.json --md benchmarks/results/dot_backends.md

Products: each dense product of the speed cases ([M, K] x [K, N], its input gradient [M, N] x [K, N]^T and
its weight gradient [M, K]^T x [M, N]) jitted alone and compiled once per back end (XLA's default, and the
`compiler_options` of `flaxlm.train.dot_backend` for 'eigen' and 'onednn'), timed in turn with the same
product in PyTorch (oneDNN, one thread per CPU this process may run on, as in speed.py); a ratio is the
median over repetitions of the ratio within one repetition (< 1: XLA faster), so the host's drift hits both
sides alike. Steps: a case's whole flaxlm train step compiled once per back end and run in turn on the same
state; ratios to the YNNPACK step.
"""

import argparse
import os
import pathlib
import statistics
import sys

import numpy as np

from flaxlm.train.dot_backend import CPU_OPTIONS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size  # noqa: E402
from timing import alternating_seconds, paired_ratio  # noqa: E402

BACKENDS = {"ynn": {}, **CPU_OPTIONS}
NAMES = {"ynn": "YNNPACK", "eigen": "Eigen", "onednn": "oneDNN"}
# (M, K, N): gpt_cpu's qkv, MLP in and out; gpt_large's qkv, attention output and MLP; the LSTM input
# projections; seq2seq's output layer.
PRODUCTS = ((768, 128, 384), (768, 128, 512), (768, 512, 128), (4096, 384, 1152), (4096, 384, 384),
            (4096, 384, 1536), (4096, 256, 1024), (4096, 512, 1024), (1536, 512, 8000))


def products(reps: int) -> list[dict]:
    """Per product and pass: PyTorch ms and each XLA back end's paired ratio to it."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in PRODUCTS:
        x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
        jx, jw, jdy = map(jnp.asarray, (x, w, dy))
        tx, tdy, tw_t = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(w.T.copy())
        passes = {"forward": (lambda a, b: a @ b, (jx, jw), lambda: torch.nn.functional.linear(tx, tw_t)),
                  "input grad": (lambda a, b: a @ b.T, (jdy, jw), lambda: tdy @ tw_t),
                  "weight grad": (lambda a, b: a.T @ b, (jx, jdy), lambda: tdy.t() @ tx)}
        for name, (fn, args, torch_run) in passes.items():
            lowered = jax.jit(fn).lower(*args)
            runs = {b: (lambda c=lowered.compile(o): jax.block_until_ready(c(*args))) for b, o in BACKENDS.items()}
            runs["torch"] = torch_run
            times = alternating_seconds(runs, reps)
            row = {"product": f"[{m}, {k}] x [{k}, {n}]", "pass": name,
                   "torch_ms": statistics.median(times["torch"]) * 1e3}
            row.update({f"{b}_ratio": paired_ratio(times[b], times["torch"]) for b in BACKENDS})
            rows.append(row)
            print(row, flush=True)
    return rows


def steps(case: str, reps: int) -> dict:
    """A case's train step compiled with each back end, run in turn on one state: ms and ratio to YNNPACK."""
    import jax
    from speed_flaxlm import Bench

    bench = Bench(case_size(case))
    bench.step()
    lowered = bench.lower()
    compiled = {b: lowered.compile(o) for b, o in BACKENDS.items()}
    leaves = [jax.tree.leaves(bench.state)]

    def run(step):
        leaves[0], metrics = step(leaves[0], bench.batch)
        jax.block_until_ready((leaves[0], metrics))

    times = alternating_seconds({b: (lambda c=c: run(c)) for b, c in compiled.items()}, reps)
    row = {f"{b}_ms": statistics.median(t) * 1e3 for b, t in times.items()}
    row.update({f"{b}_ratio": paired_ratio(times[b], times["ynn"]) for b in BACKENDS if b != "ynn"})
    print(case, row, flush=True)
    return row


def markdown(results: dict) -> str:
    lines = []
    if results.get("products"):
        lines += ["| product | pass | PyTorch ms | " + " | ".join(f"{NAMES[b]} / PyTorch" for b in BACKENDS) + " |",
                  "|---|---|---|" + "---|" * len(BACKENDS)]
        lines += [f"| {r['product']} | {r['pass']} | {r['torch_ms']:.2f} | "
                  + " | ".join(f"{r[b + '_ratio']:.2f}" for b in BACKENDS) + " |" for r in results["products"]]
        lines.append("")
    if results.get("steps"):
        others = [b for b in BACKENDS if b != "ynn"]
        lines += ["| case | train step, YNNPACK ms | " + " | ".join(f"{NAMES[b]} ms" for b in others) + " | "
                  + " | ".join(f"{NAMES[b]} / YNNPACK" for b in others) + " |",
                  "|---|---|" + "---|" * 2 * len(others)]
        lines += [f"| {c} | {r['ynn_ms']:.1f} | " + " | ".join(f"{r[b + '_ms']:.1f}" for b in others) + " | "
                  + " | ".join(f"{r[b + '_ratio']:.3f}" for b in others) + " |" for c, r in results["steps"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", action="store_true", help="time the dense products")
    parser.add_argument("--steps-of", nargs="*", choices=CASES, default=[], help="time these cases' train steps")
    parser.add_argument("--reps", type=int, default=9, help="repetitions per product")
    parser.add_argument("--step-reps", type=int, default=8, help="repetitions per train step")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown tables here")
    args = parser.parse_args(argv)
    if not args.products and not args.steps_of:
        parser.error("nothing to time: pass --products and/or --steps-of CASE ...")
    results = {"products": products(args.reps) if args.products else [],
               "steps": {case: steps(case, args.step_reps) for case in args.steps_of}}
    publish(results, markdown(results), args.out, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
