"""A/B of flaxlm source trees on one speed case: fresh processes alternating tree by tree, round by round.

    python benchmarks/ab_trees.py gpt_large --steps 4 --rounds 3 /path/to/old/checkout /path/to/new/checkout

Each run imports flaxlm and benchmarks/ from its tree (PYTHONPATH and working directory), times `steps`
synchronised train steps after the compiling one and two warm-up steps, and prints its median wall time, its
median process CPU time and its last loss; at the end, each tree's median over rounds. Alternating is what
makes a difference of a few percent visible on a host whose speed drifts by tens of percent within minutes.
"""

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, "benchmarks")
from speed_cases import case_size
from speed_flaxlm import Bench
bench = Bench(case_size(sys.argv[1]))
start = time.perf_counter(); bench.step(); first = time.perf_counter() - start
for _ in range(2):
    bench.step()
wall, cpu = [], []
for _ in range(int(sys.argv[2])):
    start, start_cpu = time.perf_counter(), time.process_time()
    bench.step()
    wall.append(time.perf_counter() - start); cpu.append(time.process_time() - start_cpu)
print("RESULT", statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3, first, bench.last_loss())
"""


def run_once(tree: str, case: str, steps: int) -> tuple[float, float, float, float]:
    """(median wall ms, median CPU ms, first step s, last loss) of one fresh process on `tree`."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(steps)], env=env, cwd=tree, capture_output=True,
                         text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if out.returncode or not lines:
        raise RuntimeError(f"{tree}: benchmark process failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    wall, cpu, first, loss = map(float, lines[0].split()[1:])
    return wall, cpu, first, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", help="speed case (benchmarks/speed_cases.py)")
    parser.add_argument("trees", nargs="+", help="checkouts of flaxlm to compare")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating")
    args = parser.parse_args()
    walls = {tree: [] for tree in args.trees}
    for round_index in range(args.rounds):
        for tree in args.trees:
            wall, cpu, first, loss = run_once(tree, args.case, args.steps)
            walls[tree].append(wall)
            print(f"round {round_index} {tree}: {wall:.1f} ms (CPU {cpu:.1f} ms, first step {first:.1f} s, "
                  f"loss {loss:.6f})", flush=True)
    for tree, times in walls.items():
        print(f"{statistics.median(times):10.1f} ms  {tree}  rounds: {' / '.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
