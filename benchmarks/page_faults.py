"""Page faults and kernel time per train step, with and without glibc's huge-page malloc (flaxlm/hugepage_malloc.py).

    python benchmarks/page_faults.py --cases bilstm seq2seq gpt_large --steps 4 --rounds 2 \\
        --out benchmarks/results/page_faults_2cores.json --md benchmarks/results/page_faults_2cores.md

For every case and framework (flaxlm, PyTorch eager), `--rounds` times, a fresh process without and then one
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` runs 2 untimed steps and `--steps` timed ones and reports, per
step: wall time, minor page faults, user and system CPU time (`getrusage(RUSAGE_SELF)` differences). The
table gives the median over rounds of each figure.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size  # noqa: E402

from flaxlm.hugepage_malloc import hugepage_environment  # noqa: E402

FRAMEWORKS = ("flaxlm", "torch")
FIGURES = ("step_ms", "minflt", "user_ms", "sys_ms")


def worker(case: str, framework: str, steps: int) -> dict:
    """Per-step wall time, minor faults, user and system CPU of `steps` steps after 2 untimed ones."""
    if framework == "flaxlm":
        from speed_flaxlm import Bench
    else:
        from speed_torch import Bench
    bench = Bench(case_size(case))
    for _ in range(2):
        bench.step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        bench.step()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"step_ms": wall / steps * 1e3, "minflt": (after.ru_minflt - before.ru_minflt) / steps,
            "user_ms": (after.ru_utime - before.ru_utime) / steps * 1e3,
            "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3}


def run(case: str, framework: str, steps: int, env: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps([case, framework, steps])]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    settings = {"plain": plain, "hugetlb": hugepage_environment(plain)}
    results = {}
    for case in args.cases:
        for framework in FRAMEWORKS:
            rounds = {name: [] for name in settings}
            for _ in range(args.rounds):
                for name, env in settings.items():
                    rounds[name].append(run(case, framework, args.steps, env))
                    print(case, framework, name, rounds[name][-1], flush=True)
            results[f"{case}/{framework}"] = {
                name: {f: statistics.median(r[f] for r in runs) for f in FIGURES} for name, runs in rounds.items()}
    rows = ["| case | framework | step ms (plain / hugetlb) | minor faults per step | system CPU ms per step |",
            "|---|---|---|---|---|"]
    for key, r in results.items():
        case, framework = key.split("/")
        cells = [" / ".join(f"{r[name][f]:.0f}" for name in settings) for f in ("step_ms", "minflt", "sys_ms")]
        rows.append(f"| {case} | {framework} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) + (f"\n\nMedian of {args.rounds} alternating rounds of {args.steps} steps each; plain = "
                               "GLIBC_TUNABLES unset, hugetlb = GLIBC_TUNABLES=glibc.malloc.hugetlb=1.\n")
    publish(results, table, args.out, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
