"""What XLA:CPU's pool threads are doing during a train step, from gdb stack snapshots of a running case.

    python benchmarks/thread_samples.py --cases bilstm seq2seq --samples 40 \\
        --out benchmarks/results/thread_samples_2cores.json --md benchmarks/results/thread_samples_2cores.md

A worker process (this script with --worker CASE) builds the case's train step (benchmarks/speed_flaxlm.py,
with the huge-page malloc tunable that speed.py also sets), runs 3 untimed steps, prints 'ready', then runs steps
until it is killed. The parent attaches `gdb -batch -ex 'thread apply all bt'` --samples times at random
intervals and classifies each of XLA's pool threads ('tf_XLAEigen', one per core) by its stack:

    matmul          inside a YNNPACK kernel of a matmul (ynn::dot / pack / transpose), whether as the thunk that
                    called it or as a helper task of its parallel loop (SlinkyThreadPool::Impl::WorkOnTask)
    matmul wait     blocked in SlinkyThreadPool's Await: this thread's share of a parallel matmul is done and it
                    waits for the helper still working on another share
    other thunk     running another fusion, copy or reduction
    asleep          parked in the Eigen pool with nothing queued for it
    scheduling      in the pool's task queue code (stealing, waking, dispatching)
    unknown         no symbols (generated code without frame information)

A snapshot stops the process for a few milliseconds, so it sees the threads at a random moment of the step;
the shares are counts over snapshots, not times. `matmul alone` counts snapshots in which one thread works in a
matmul while the other is asleep or waits for it: there the matmul runs on one core.
"""

import argparse
import collections
import os
import pathlib
import random
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size  # noqa: E402

STATES = ("matmul", "matmul wait", "other thunk", "asleep", "scheduling", "unknown")
POOL_THREAD = "tf_XLAEigen"


PATTERNS = (  # (state, pattern), tried on each frame from the innermost out: the first frame that matches decides
    ("matmul wait", re.compile(r"SlinkyThreadPool::Impl::Await")),
    ("matmul", re.compile(r"ynn::(dot|packer|transpose|\w*pack)")),
    ("asleep", re.compile(r"WaitForWork|CommitWait")),
    ("other thunk", re.compile(r"Kernel::Launch|CopyThunk|_fusion|ynn::")),
    ("scheduling", re.compile(r"Steal|MaybeGetTask|EventCount::Notify|ScheduleWithHint|WorkerLoop")),
)


def classify(stack: str) -> str:
    """The state of one pool thread from its gdb backtrace text (frames innermost first).

    The innermost recognised frame decides, so a thread computing matmul items inside
    SlinkyThreadPool::wait_for counts as 'matmul', and only one blocked in Await as 'matmul wait'.
    """
    for frame in stack.splitlines():
        for state, pattern in PATTERNS:
            if pattern.search(frame):
                return state
    return "unknown"


def pool_thread_states(gdb_text: str) -> list[str]:
    """The state of every XLA pool thread in one `thread apply all bt` output."""
    blocks = re.split(r"\n(?=Thread \d+ )", gdb_text)
    return [classify(block) for block in blocks if f'"{POOL_THREAD}"' in block.split("\n", 1)[0]]


def summarise(snapshots: list[list[str]]) -> dict:
    """Shares of thread states over all pool threads and snapshots, and of snapshots with a lone matmul."""
    counts = collections.Counter(state for states in snapshots for state in states)
    total = sum(counts.values()) or 1
    alone = sum(1 for s in snapshots if s.count("matmul") == 1
                and all(state in ("matmul", "asleep", "matmul wait") for state in s))
    both = sum(1 for s in snapshots if s.count("matmul") >= 2)
    return {"snapshots": len(snapshots), "threads": total,
            "shares": {state: counts[state] / total for state in STATES},
            "matmul_alone": alone / max(1, len(snapshots)), "matmul_both": both / max(1, len(snapshots))}


def worker(name: str) -> None:
    from speed_flaxlm import Bench

    bench = Bench(case_size(name))
    for _ in range(3):
        bench.step()
    print("ready", flush=True)
    while True:
        bench.step()


def sample_case(name: str, samples: int, seed: int) -> dict:
    from flaxlm.hugepage_malloc import hugepage_environment

    env = hugepage_environment(dict(os.environ)) or dict(os.environ)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", name], stdout=subprocess.PIPE, text=True, env=env)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the worker exited before its first steps (exit status {proc.wait()})")
        rng = random.Random(seed)
        snapshots = []
        for _ in range(samples):
            time.sleep(rng.uniform(0.05, 0.5))
            out = subprocess.run(["gdb", "-p", str(proc.pid), "-batch", "-ex", "thread apply all bt 16"],
                                 capture_output=True, text=True, timeout=60).stdout
            snapshots.append(pool_thread_states(out))
    finally:
        proc.kill()
        proc.wait()
    return summarise(snapshots)


def markdown(results: dict) -> str:
    lines = ["| case | snapshots | " + " | ".join(STATES) + " | matmul alone | matmul on both |",
             "|---|---|" + "---|" * (len(STATES) + 2)]
    for name, r in results.items():
        shares = " | ".join(f"{100 * r['shares'][s]:.0f}%" for s in STATES)
        lines.append(f"| {name} | {r['snapshots']} | {shares} | {100 * r['matmul_alone']:.0f}% | "
                     f"{100 * r['matmul_both']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=CASES, default=["bilstm", "seq2seq"])
    parser.add_argument("--samples", type=int, default=40, help="gdb snapshots per case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random intervals between snapshots")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    results = {name: sample_case(name, args.samples, args.seed) for name in args.cases}
    table = markdown(results)
    publish(results, table, args.out, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
