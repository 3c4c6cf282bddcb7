"""Where PyTorch's eager train step spends its time, per speed case, beside flaxlm's profile of the same step.

    python benchmarks/profile_torch.py --steps 10 --out benchmarks/results/profile_torch.json \\
        --md benchmarks/results/profile_torch.md
    python benchmarks/profile_torch.py --flaxlm benchmarks/results/profile_2cores.json --md compare.md

Each case (benchmarks/speed_cases.py) builds benchmarks/speed_torch.py's eager step (both cores:
`torch.set_num_threads` = the CPUs this process may run on), runs 3 untimed steps, times `--steps` steps
unprofiled, then runs `--steps` more under `torch.profiler` (CPU). Every op's self time (its own time, without
the ops it called) goes to one category, the same kinds as benchmarks/profile_step.py's:

    matmul      aten::mm / addmm / bmm and the like: the dense layers, their gradients, seq2seq's attention
    attention   the scaled-dot-product (flash) attention kernels and their backward
    recurrence  the oneDNN LSTM layer kernels (input projections included) and their autograd nodes
    optimizer   everything under the step's `optimizer` record_function (gradient clipping and AdamW)
    layout      copies, concatenates, fills, pads and slice gradients
    framework   view ops, tensor allocation, autograd bookkeeping (nodes, gradient accumulation)
    other       elementwise and reduction ops: norms, activations, softmax, the loss, embedding gathers

`unattributed` is the profiled step's wall time minus the sum of the self times (Python between ops).
Op times are wall time on the thread that ran the op; torch splits an op over both cores inside the op.
Profiling adds a few microseconds per op, so `profiled ms` exceeds the unprofiled `wall ms`, most for the
small-op-heavy gpt_cpu.

`--flaxlm PATH` reads a JSON written by benchmarks/profile_step.py in the same sitting and prints, per case and
category, flaxlm's share of execution wall time (`wall_categories_ms`: thunks running side by side split the
time) beside PyTorch's op time; flaxlm's `overhead` is its dispatch, loop bookkeeping and idle time, PyTorch's
its framework ops and unattributed time. Run the two scripts one after the other: the host drifts.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size  # noqa: E402
from timing import seconds  # noqa: E402

CATEGORIES = ("matmul", "attention", "recurrence", "optimizer", "layout", "other", "framework")
MATMUL = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|mv|addmv|dot|linear|matmul|einsum)$")
ATTENTION = re.compile(r"scaled_dot_product|flash_attention", re.I)
RECURRENCE = re.compile(r"rnn|lstm|gru", re.I)
LAYOUT = re.compile(r"^aten::(copy_|cat|stack|clone|contiguous|_to_copy|fill_|zero_|zeros|zeros_like|"
                    r"constant_pad_nd|pad|slice_backward|select_backward|index_put_|new_zeros)$")
FRAMEWORK = re.compile(r"^aten::(view|t|transpose|as_strided|reshape|_unsafe_view|_reshape_alias|expand|permute|"
                       r"unsqueeze|squeeze|slice|select|split|split_with_sizes|chunk|unbind|alias|detach|detach_|"
                       r"empty|empty_strided|empty_like|to|result_type|resize_|lift_fresh|item|"
                       r"_local_scalar_dense|is_nonzero|expand_as|view_as)$|^autograd::|Backward\d*$|"
                       r"^torch::autograd::|^Optimizer\.zero_grad")
# flaxlm's categories (benchmarks/profile_step.py) folded into this script's comparison columns.
FLAXLM_COLUMNS = {"matmul": ("matmul",), "attention": ("attention: matmul", "attention: other"),
                  "recurrence": ("recurrence: matmul", "recurrence: other"), "optimizer": ("optimizer",),
                  "layout": ("layout",), "other": ("other",), "overhead": ("loop", "idle", "dispatch")}


def category(name: str, in_optimizer: bool) -> str:
    """The category of one profiled op by its name, and whether it ran under the `optimizer` record_function."""
    if in_optimizer or name.startswith("Optimizer.step"):
        return "optimizer"
    for label, pattern in (("matmul", MATMUL), ("attention", ATTENTION), ("recurrence", RECURRENCE),
                           ("layout", LAYOUT), ("framework", FRAMEWORK)):
        if pattern.search(name):
            return label
    return "other"


def _under_optimizer(event) -> bool:
    """Whether `event` is the `optimizer` record_function or runs inside it."""
    while event is not None:
        if event.name == "optimizer":
            return True
        event = event.cpu_parent
    return False


def attribute(events, steps: int) -> dict[str, float]:
    """{category: self time in ms per step} over torch.profiler's FunctionEvents of `steps` steps."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        totals[category(event.name, _under_optimizer(event))] += event.self_cpu_time_total
    return {k: v / steps / 1e3 for k, v in totals.items()}


def profile_case(name: str, steps: int) -> dict:
    import torch
    from speed_torch import Bench

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    bench = Bench(case_size(name))
    for _ in range(3):
        bench.step()
    walls = [seconds(bench.step) for _ in range(steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_ms = seconds(lambda: [bench.step() for _ in range(steps)]) / steps * 1e3
    categories = attribute(prof.events(), steps)
    return {"wall_ms": statistics.median(walls) * 1e3, "profiled_ms": profiled_ms, "categories_ms": categories,
            "unattributed_ms": max(profiled_ms - sum(categories.values()), 0.0),
            "threads": torch.get_num_threads()}


def markdown(results: dict) -> str:
    head = ["case", "wall ms", "profiled ms"] + list(CATEGORIES) + ["unattributed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in results.items():
        cells = [f"{r['categories_ms'][c]:.1f}" for c in CATEGORIES] + [f"{r['unattributed_ms']:.1f}"]
        lines.append(f"| {case} | {r['wall_ms']:.1f} | {r['profiled_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flaxlm_columns(profile: dict) -> dict[str, float]:
    """One flaxlm case of profile_step.py's JSON as {comparison column: wall ms per step}."""
    wall = dict(profile["wall_categories_ms"], dispatch=profile["dispatch_ms"])
    return {column: sum(wall.get(k, 0.0) for k in keys) for column, keys in FLAXLM_COLUMNS.items()}


def torch_columns(result: dict) -> dict[str, float]:
    """One PyTorch case of this script as {comparison column: ms per step} (framework + unattributed = overhead)."""
    cats = result["categories_ms"]
    columns = {column: cats.get(column, 0.0) for column in FLAXLM_COLUMNS if column != "overhead"}
    columns["overhead"] = cats["framework"] + result["unattributed_ms"]
    return columns


def comparison(flaxlm: dict, torch_results: dict) -> str:
    """Markdown: per case, flaxlm's wall ms / PyTorch's ms per column (cases profiled by both only)."""
    head = ["case", "step ms (flaxlm / PyTorch)"] + list(FLAXLM_COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in torch_results.items():
        if case not in flaxlm:
            continue
        ours, theirs = flaxlm_columns(flaxlm[case]), torch_columns(r)
        cells = [f"{ours[c]:.1f} / {theirs[c]:.1f}" for c in FLAXLM_COLUMNS]
        lines.append(f"| {case} | {flaxlm[case]['wall_ms']:.1f} / {r['profiled_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=5, help="timed and profiled steps per case")
    parser.add_argument("--flaxlm", default=None, help="benchmarks/profile_step.py JSON to compare with")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    flaxlm = None
    if args.flaxlm:
        try:
            flaxlm = json.loads(pathlib.Path(args.flaxlm).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--flaxlm {args.flaxlm}: {e}")
        missing = [case for case in args.cases if case in flaxlm and "wall_categories_ms" not in flaxlm[case]]
        if missing:
            parser.error(f"--flaxlm {args.flaxlm}: no wall_categories_ms for {missing} (rerun profile_step.py)")
    results = {}
    for name in args.cases:
        results[name] = profile_case(name, args.steps if name != "gpt_large" else max(1, args.steps // 2))
        print(f"{name}: wall {results[name]['wall_ms']:.1f} ms, profiled {results[name]['profiled_ms']:.1f} ms",
              flush=True)
    table = markdown(results)
    if flaxlm is not None:
        table += "\nflaxlm / PyTorch, ms per step:\n\n" + comparison(flaxlm, results)
    publish({"torch": results, "flaxlm": flaxlm}, table, args.out, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
