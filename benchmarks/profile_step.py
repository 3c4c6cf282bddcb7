"""Where a flaxlm train step's time goes, per speed case, from a `jax.profiler` trace of the jitted step.

    python benchmarks/profile_step.py --out benchmarks/results/profile_2cores.json \\
        --md benchmarks/results/profile_2cores.md
    python benchmarks/profile_step.py --cases gpt_cpu --steps 20

Each case (benchmarks/speed_cases.py) builds the same train step as benchmarks/speed.py, runs 3 untimed steps,
then traces `--steps` synchronised steps (`create_perfetto_trace=True`). XLA:CPU runs a compiled step as a
sequence of thunks (one per fusion, matmul, copy, loop) on the threads of its pool; the trace holds one event per
thunk and thread. Each thunk is attributed through the `op_name` metadata of the compiled HLO (every op the thunk
fuses): first by the named scopes flaxlm puts in its code ('optimizer' in flaxlm.train.step, 'attention' in
flaxlm.ops.attention, 'recurrence' in flaxlm.ops.recurrent), else by kind:

    matmul    YNNPACK / Eigen dot thunks (ynn_fusion, dot): the dense layers and their gradients
    layout    copies, transposes, concatenates, pads, dynamic-(update-)slices, broadcasts (zero fills)
    other     elementwise and reduction fusions: norms, activations, losses, masks
    loop      loop bookkeeping of while loops (counters, conditions)

and the attention / recurrence scopes are split into their matmul and non-matmul parts. Times are thread
time summed over the pool's threads (two threads can each spend 10 ms in the same 10 ms of wall time), per step.
`wall_categories_ms` (JSON only) splits the step's execution wall time instead: each moment goes in equal parts
to the thunks running then (two side by side get half each) and moments with none go to `idle`, so the parts add
up to the execution time; benchmarks/profile_torch.py sets them beside PyTorch's op times.
`both busy` is the share of the step's execution in which two or more threads ran thunks, `idle` the share in
which none did (waiting, synchronisation); `dispatch` is the step's wall time outside XLA's execution (Python,
argument handling, the host-device sync). A thunk's own worker tasks inside a library call (YNNPACK splitting
one matmul over both cores) are not separate events, so 'both busy' understates how parallel the matmuls are.
`big matmuls GFLOP/s` is the FLOP rate of the matmul thunks that take 5 ms or more (FLOPs from the HLO dot's
shapes): compare it with the same product under `jax.jit` alone on the same machine (benchmarks/speed.py's
peak). Two such thunks running side by side each show about half that rate; benchmarks/thread_samples.py tells
a lone matmul on one core from two matmuls sharing the cores.
"""

import argparse
import collections
import glob
import gzip
import json
import math
import pathlib
import re
import statistics
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size, model_flops_per_step  # noqa: E402
from timing import seconds  # noqa: E402

SCOPES = ("optimizer", "attention", "recurrence")
NOT_THUNKS = ("ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "ThreadpoolListener", "end:", "$",
              "CommonPjRt", "ParseArguments", "while", "call", "conditional")
MATMUL = re.compile(r"^(ynn_fusion|dot|dot_general|onednn|xnn_fusion)")
LAYOUT = re.compile(r"copy|transpose|concatenate|pad|dynamic-update-slice|dynamic-slice|wrapped_broadcast|"
                    r"^broadcast(\.\d+)?$|^slice")
LOOP = re.compile(r"^wrapped_(add|compare)")


def _instructions(hlo_text: str):
    """Yield (name, line, called computation's text or '') for every instruction of an HLO module's text."""
    computations = {m.group(1): m.group(0) for m in re.finditer(r"^%([\w.\-]+) .*?^}", hlo_text, re.S | re.M)}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*$", hlo_text, re.M):
        called = re.search(r"calls=%([\w.\-]+)", m.group(0))
        yield m.group(1), m.group(0), computations.get(called.group(1), "") if called else ""


def hlo_op_names(hlo_text: str) -> dict[str, list[str]]:
    """{instruction name: op_name metadata of the instruction and of every op in the computation it calls}."""
    return {name: re.findall(r'op_name="([^"]*)"', line) + re.findall(r'op_name="([^"]*)"', body)
            for name, line, body in _instructions(hlo_text)}


def dot_flops(hlo_text: str) -> dict[str, int]:
    """{thunk name: FLOPs of the one dot it runs} for fusions and dots whose computation holds a single dot."""
    shapes = dict(re.findall(r"%([\w.\-]+) = f32\[([\d,]*)\]", hlo_text))
    dot = re.compile(r"= f32\[([\d,]*)\]\{[^}]*\} dot\(%([\w.\-]+), %[\w.\-]+\), "
                     r"(?:lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{(\d+)\}")
    flops = {}
    for name, line, body in _instructions(hlo_text):
        dots = dot.findall(body or line)
        if len(dots) != 1:
            continue
        out, lhs, axis = dots[0]
        lhs_dims = [int(d) for d in shapes.get(lhs, "").split(",") if d]
        if lhs_dims:
            flops[name] = 2 * math.prod(int(d) for d in out.split(",") if d) * lhs_dims[int(axis)]
    return flops


def category(thunk: str, op_names: list[str]) -> str:
    """'scope: matmul' / 'scope: other' for a named scope, else matmul / layout / loop / other."""
    is_matmul = bool(MATMUL.match(thunk))
    for scope in SCOPES:
        if any(f"/{scope}" in name or f"({scope})" in name or f"({scope}" in name for name in op_names):
            if scope == "optimizer":
                return scope
            return f"{scope}: {'matmul' if is_matmul else 'other'}"
    if is_matmul:
        return "matmul"
    if LOOP.match(thunk):
        return "loop"
    return "layout" if LAYOUT.search(thunk) else "other"


def _busy_shares(intervals_by_thread: dict, start: float, stop: float) -> tuple[float, float]:
    """(share of [start, stop] with >= 2 threads running thunks, share with none), on a 5 us grid."""
    grid = np.arange(start, stop, 5.0)
    counts = np.zeros(len(grid), np.int32)
    for intervals in intervals_by_thread.values():
        busy = np.zeros(len(grid), bool)
        for s, e in intervals:
            busy[np.searchsorted(grid, s):np.searchsorted(grid, e)] = True
        counts += busy
    return float((counts >= 2).mean()), float((counts == 0).mean())


def _wall_attribution(timed: list[tuple[str, float, float]], start: float, stop: float) -> collections.Counter:
    """Wall time (us) of [start, stop] per category: each 5 us grid cell (the last one cut at `stop`) is split
    evenly between the thunks running in it, so two thunks side by side get half each, and cells with none go
    to 'idle'; the parts add up to stop - start. timed holds (category, start, end) of the window's thunks."""
    grid = np.arange(start, stop, 5.0)
    widths = np.diff(np.append(grid, stop))
    spans = [(c, np.searchsorted(grid, s), np.searchsorted(grid, e)) for c, s, e in timed]
    counts = np.zeros(len(grid), np.int32)
    for _, a, b in spans:
        counts[a:b] += 1
    shares = widths * np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    wall = collections.Counter()
    for c, a, b in spans:
        wall[c] += float(shares[a:b].sum())
    wall["idle"] += float(widths[counts == 0].sum())
    return wall


def analyse(trace_dir: str, hlo_text: str, steps: int, walls: list[float]) -> dict:
    """Per-step thread time by category, top thunks, parallelism and dispatch, from one trace directory."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    waits = sorted((e for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"),
                   key=lambda e: e["ts"])[-steps:]
    thunks = [e for e in events if not e["name"].startswith(NOT_THUNKS)]
    names = hlo_op_names(hlo_text)
    kinds = {name: category(name, names.get(name, [])) for name in {e["name"] for e in thunks}}
    by_category, by_thunk = collections.Counter(), collections.Counter()
    for e in thunks:
        by_category[kinds[e["name"]]] += e["dur"]
        by_thunk[e["name"]] += e["dur"]
    shares, wall_by_category = [], collections.Counter()
    for wait in waits:
        start, stop = wait["ts"], wait["ts"] + wait["dur"]
        intervals, timed = collections.defaultdict(list), []
        for e in thunks:
            if start <= e["ts"] <= stop:
                intervals[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
                timed.append((kinds[e["name"]], e["ts"], e["ts"] + e["dur"]))
        shares.append(_busy_shares(intervals, start, stop))
        wall_by_category.update(_wall_attribution(timed, start, stop))
    flops = dot_flops(hlo_text)
    big = [(flops[e["name"]], e["dur"]) for e in thunks if e["name"] in flops and e["dur"] >= 5000]
    execute_ms = statistics.median(w["dur"] for w in waits) / 1e3
    wall_ms = statistics.median(walls) * 1e3
    total = sum(by_category.values())
    return {
        "wall_ms": wall_ms,
        "execute_ms": execute_ms,
        "dispatch_ms": max(wall_ms - execute_ms, 0.0),
        "thread_ms": total / steps / 1e3,
        "categories_ms": {k: v / steps / 1e3 for k, v in by_category.most_common()},
        "wall_categories_ms": {k: v / len(waits) / 1e3 for k, v in wall_by_category.most_common()},
        "both_busy": statistics.median(s[0] for s in shares),
        "idle": statistics.median(s[1] for s in shares),
        "top_thunks_ms": {k: v / steps / 1e3 for k, v in by_thunk.most_common(12)},
        # Matmul thunks of 5 ms or more: their FLOP rate inside the step, to hold against the same product alone.
        "big_matmuls": len(big),
        "big_matmul_gflops_median": statistics.median(f / d / 1e3 for f, d in big) if big else None,
        "big_matmul_gflops_total": sum(f for f, _ in big) / sum(d for _, d in big) / 1e3 if big else None,
    }


def profile_case(name: str, steps: int) -> dict:
    import jax
    from speed_flaxlm import Bench

    size = case_size(name)
    bench = Bench(size)
    for _ in range(3):
        bench.step()
    hlo_text = bench.lower().compile().as_text()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            walls = [seconds(bench.step) for _ in range(steps)]
        result = analyse(trace_dir, hlo_text, steps, walls)
    result["model_gflop"] = model_flops_per_step(size) / 1e9
    return result


COLUMNS = ("matmul", "attention: matmul", "attention: other", "recurrence: matmul", "recurrence: other",
           "other", "layout", "optimizer", "loop")


def markdown(results: dict) -> str:
    head = ["case", "wall ms", "dispatch ms", "thread ms"] + list(COLUMNS) + ["both busy", "idle",
                                                                            "big matmuls GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in results.items():
        cats = r["categories_ms"]
        cells = [f"{cats.get(c, 0.0):.1f} ({100 * cats.get(c, 0.0) / r['thread_ms']:.0f}%)" for c in COLUMNS]
        lines.append(f"| {case} | {r['wall_ms']:.1f} | {r['dispatch_ms']:.1f} | {r['thread_ms']:.1f} | "
                     + " | ".join(cells) + f" | {100 * r['both_busy']:.0f}% | {100 * r['idle']:.0f}% | "
                     + (f"{r['big_matmul_gflops_total']:.0f} ({r['big_matmuls']} calls)" if r["big_matmuls"] else "-")
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=5, help="traced steps per case")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    results = {}
    for name in args.cases:
        results[name] = profile_case(name, args.steps if name != "gpt_large" else max(1, args.steps // 2))
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(results[name]["top_thunks_ms"].items())[:5])
        print(f"{name}: wall {results[name]['wall_ms']:.1f} ms; top thunks (ms/step): {top}", flush=True)
    table = markdown(results)
    publish(results, table, args.out, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
