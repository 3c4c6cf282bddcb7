"""Train-step speed of flaxlm against PyTorch (eager and torch.compile), float32, on this machine.

    python benchmarks/speed.py --out benchmarks/results/speed.json --md benchmarks/results/speed.md
    python benchmarks/speed.py --cases gpt_cpu bilstm --steps 50 --warmup 5 --pooling max
    python benchmarks/speed.py --cases --compile-depth --loop-overhead      # only the two studies
    python benchmarks/speed.py --tiny --steps 2 --warmup 1 --cases gpt_cpu bilstm seq2seq \\
        --compile-depth --loop-overhead --loop-steps 12 --loop-log-every 4   # smoke test, a few minutes

Cases (benchmarks/speed_cases.py; `--tiny` shrinks each for a smoke test):
    gpt_cpu    nanoGPT's CPU config: 4 layers, 4 heads, width 128, context 64, batch 12, vocab 65
    gpt_large  6 layers, 6 heads, width 384, context 256, batch 16, vocab 65
    bilstm     TextClassifier: embedding 256, 2-layer BiLSTM 256, 'last' pooling (--pooling), batch 64 x 64
               tokens, vocab 16384, 2 classes
    seq2seq    Seq2Seq: embeddings 256, 2-layer LSTMs 512, Luong attention, batch 64, source and target length
               24, vocabularies 8000
flaxlm runs the trainer's jitted train step (benchmarks/speed_flaxlm.py); PyTorch the same model and batch with
torch.optim.AdamW, eagerly and under torch.compile (benchmarks/speed_torch.py); the optimizer settings are in
speed_cases.py. Every (case, framework) runs in its own subprocess of this script, one after the other, so
that its peak memory is its own: `peak RSS` is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of that process
(the whole process: interpreter, framework libraries, compiler, data). torch runs with
`torch.set_num_threads(cores)` (cores = the CPUs this process may run on, so `taskset -c 1` means one); XLA:CPU
uses its default pool (one thread per core).

Per (case, framework): the first step's time (`compile_s`: for flaxlm tracing + XLA compilation + one step,
for torch.compile Dynamo + Inductor compilation + one step, for eager just the first step), then `--warmup`
untimed steps, then `--steps` timed steps, each synchronised: median step time, tokens/s (tokens per step in
speed_cases.tokens_per_step), model FLOPs per step (analytic, speed_cases.model_flops_per_step) and MFU =
FLOPs / median step time / peak, where the peak is the larger of two measurements of a 2048^2 float32 matmul
under jax.jit (flaxlm.bench.matmul_peak_flops), one before the cases and one after. Ratios are flaxlm / PyTorch
(< 1: flaxlm is faster). A torch.compile failure is recorded with its one-line reason, not raised.
`--rounds N` runs each case's frameworks N times in alternation (flaxlm, torch, torch.compile, flaxlm, ...): the
reported run of a framework is its median round, and a ratio is the median over rounds of the ratio of the two
runs of the same round, which cancels most of a host's drift between minutes.
`--dot-backend gpt_large=eigen ...` builds those cases' flaxlm steps with that `dot_backend` (the library of
XLA:CPU's matmuls, `flaxlm.train.dot_backend`); the others keep XLA's default.

--compile-depth: compile time (jit lowering, then XLA compilation, each timed) of the GPT train step at width
128, context 64, 4 heads, batch 12, with 2 and with 12 layers, each in a fresh process; the layers run under
`jax.lax.scan`, so the ratio should stay near 1 (the goal is <= 1.5).

--loop-overhead: `flaxlm.trainer.train` on configs/char_gpt_cpu.yaml for --loop-steps steps in a temporary
workdir (evaluation and checkpoint only at the end, progress bar off), against the bare train step of the same
config in the same process (timed like the cases, compiled once). The trainer's figure is its own
`perf/step_time_s`: the wall time of each log window divided by its steps (steps are not synchronised one by
one there; the window ends with a device_get), median over the windows after the first (which includes
compilation). The bare step is timed before the first trainer run and after each of --loop-rounds runs; a
round's overhead = trainer median / mean of the bare medians just before and after it - 1, and the reported
overhead is the median over rounds (the host's speed drifts by tens of percent between minutes). Because the
trainer does not synchronise every step, the bare step is also timed that way (as many windows of
--loop-log-every steps dispatched back to back, then synchronised, as the trainer's median is taken over), and
the overhead against that is reported too. Runs
shorter than the config's 100 warm-up steps warm up over half the run (the schedule changes the rate, not
the cost).

Every worker process (both frameworks, and the studies) starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
as the `flaxlm` command does (flaxlm/hugepage_malloc.py): glibc then backs large malloc'd buffers with
transparent huge pages, which spares XLA:CPU about 100,000-200,000 page faults per LSTM or gpt_large step and
PyTorch a few thousand to 90,000. `--no-hugepage-malloc` leaves the environment as it is. The setting is
recorded in the JSON (`machine.glibc_tunables`).

Machine load is noisy on shared machines: load averages before and after are recorded; compare ratios taken in
one sitting.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from report import publish  # noqa: E402
from speed_cases import CASES, case_size, model_flops_per_step, size_from_dict, tokens_per_step  # noqa: E402

from flaxlm.hugepage_malloc import hugepage_environment  # noqa: E402
from flaxlm.train.dot_backend import DOT_BACKENDS  # noqa: E402

RESULT_PREFIX = "SPEED_RESULT "
FRAMEWORKS = ("flaxlm", "torch", "torch_compile")
LOOP_CONFIG = ROOT / "configs" / "char_gpt_cpu.yaml"
DEPTHS = (2, 12)


# ----------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process (`speed.py --worker JOB`) and prints one RESULT line.


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(error: BaseException) -> str:
    """`Type: first non-empty line of the message`, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _time_steps(bench, steps: int, warmup: int) -> dict:
    """First step (compilation), `warmup` untimed steps, then `steps` timed ones, each synchronised."""
    start = time.perf_counter()
    bench.step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        bench.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        bench.step()
        times.append(time.perf_counter() - start)
    return {"compile_s": first, "median_step_s": statistics.median(times), "min_step_s": min(times),
            "max_step_s": max(times), "step_times_s": times, "last_loss": bench.last_loss()}


def _flaxlm_threads() -> dict:
    return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _case_worker(job: dict) -> dict:
    size = size_from_dict(job["case"], job["size"])
    # Each framework is imported only in its own worker, so that the peak RSS measured is that framework's.
    if job["framework"] == "flaxlm":
        import speed_flaxlm

        bench = speed_flaxlm.Bench(size, dot_backend=job["dot_backend"])
        threads = _flaxlm_threads()
    else:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        import speed_torch

        bench = speed_torch.Bench(size, compile_model=job["framework"] == "torch_compile")
        threads = {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    result = {"num_params": bench.num_params, "threads": threads}
    try:
        result.update(_time_steps(bench, job["steps"], job["warmup"]))
    except Exception as e:  # noqa: BLE001  torch.compile's failures are results; others go to the parent too
        if job["framework"] != "torch_compile":
            raise
        result["error"] = _one_line(e)
    if job["framework"] == "torch_compile":  # Dynamo's own tally (a private API): where the graph was split
        from torch._dynamo.utils import counters

        result["graph_breaks"] = dict(counters["graph_break"])
    return result


def _peak_worker(job: dict) -> dict:
    from flaxlm.bench import matmul_peak_flops

    return {"peak_flops": matmul_peak_flops(job["n"]), "n": job["n"]}


def _depth_worker(job: dict) -> dict:
    import speed_flaxlm

    size = size_from_dict("gpt_cpu", job["size"])
    bench = speed_flaxlm.Bench(size)
    start = time.perf_counter()
    lowered = bench.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"n_layer": size.n_layer, "lower_s": lowered_at - start, "compile_s": done - lowered_at,
            "total_s": done - start, "num_params": bench.num_params}


class _BareStep:
    """The bare train step of `build_run(cfg)` on pre-fetched batches of its data, compiled once."""

    def __init__(self, cfg):
        from flaxlm.train.sharding import shard_batch
        from flaxlm.trainer import build_run

        self.run = build_run(cfg)
        data = self.run.task.train_iterator()
        self.batches = [shard_batch(next(data), self.run.mesh) for _ in range(8)]
        self.state = self.run.state

    def times(self, steps: int, warmup: int, every: int, windows: int) -> tuple[float, float]:
        """(median synchronised step time, median per-step time of `windows` windows of `every` steps dispatched
        back to back and synchronised at the end)."""
        import jax

        synced = []
        for i in range(1 + warmup + steps):
            start = time.perf_counter()
            self.state, metrics = self.run.train_step(self.state, self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, metrics))
            if i > warmup:
                synced.append(time.perf_counter() - start)
        windowed = []
        for _ in range(windows):
            start = time.perf_counter()
            for i in range(every):
                self.state, metrics = self.run.train_step(self.state, self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, metrics))
            windowed.append((time.perf_counter() - start) / every)
        return statistics.median(synced), statistics.median(windowed)


def _loop_worker(job: dict) -> dict:
    from flaxlm.experiment import load_experiment
    from flaxlm.metrics_log import read_metrics
    from flaxlm.trainer import train

    n, every = job["loop_steps"], job["log_every"]
    overrides = [f"train.steps={n}", f"optim.schedule.total_steps={n}", f"train.eval_every={n}",
                 f"train.checkpoint_every={n}", f"train.log_every={every}", "train.progress=false"]
    if load_experiment(LOOP_CONFIG).optim.schedule.warmup_steps >= n:  # a short run: warm up over half of it
        overrides.append(f"optim.schedule.warmup_steps={n // 2}")
    cfg = load_experiment(LOOP_CONFIG, overrides)
    bare = _BareStep(cfg)
    n_windows = n // every - 1  # as many as the trainer's median is taken over
    bares = [bare.times(job["steps"], job["warmup"], every, n_windows)]
    rounds = []
    for _ in range(job.get("rounds", 1)):
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            train(cfg, workdir, progress=False)
            total = time.perf_counter() - start
            rows = read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
        windows = [r["perf/step_time_s"] for r in rows if r["step"] > every and r.get("perf/step_time_s") is not None]
        if not windows:
            raise ValueError(f"no log window after the first: loop_steps={n} must exceed loop_log_every={every}")
        bares.append(bare.times(job["steps"], job["warmup"], every, n_windows))
        (synced_before, windowed_before), (synced_after, windowed_after) = bares[-2:]
        trainer = statistics.median(windows)
        synced, windowed = (synced_before + synced_after) / 2, (windowed_before + windowed_after) / 2
        rounds.append({"trainer_median_step_s": trainer, "trainer_windows_s": windows, "trainer_total_s": total,
                       "bare_median_step_s": synced, "bare_windowed_step_s": windowed,
                       "overhead_percent": (trainer / synced - 1) * 100,
                       "overhead_vs_windowed_percent": (trainer / windowed - 1) * 100})

    def median(key):
        return statistics.median(r[key] for r in rounds)

    return {"loop_steps": n, "log_every": every, "rounds": rounds,
            "bare_step_s_between_rounds": [{"synced": a, "windowed": b} for a, b in bares],
            **{key: median(key) for key in ("trainer_median_step_s", "bare_median_step_s", "bare_windowed_step_s",
                                            "overhead_percent", "overhead_vs_windowed_percent")},
            "threads": _flaxlm_threads()}


WORKERS = {"case": _case_worker, "peak": _peak_worker, "compile_depth": _depth_worker, "loop_overhead": _loop_worker}


def worker_main(job: dict) -> None:
    result = WORKERS[job["kind"]](job)
    result["peak_rss_mib"] = _peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The parent: runs the workers one after the other and collects their results.


def run_worker(job: dict, timeout: float, env: dict | None = None) -> dict:
    """Run one job in a fresh `python speed.py --worker` process; its result, or {'error': one line}."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"error": f"worker exited with status {proc.returncode}: {lines[-1].strip() if lines else 'no output'}"}


def _case_job(name: str, size, framework: str, args) -> dict:
    return {"kind": "case", "case": name, "size": dataclasses.asdict(size), "framework": framework,
            "steps": args.steps, "warmup": args.warmup, "dot_backend": args.dot_backend.get(name, "xla")}


def _dot_backends(parser, pairs: list[str]) -> dict[str, str]:
    """`--dot-backend CASE=NAME ...` as {case: name}; a usage error names the bad pair."""
    chosen = {}
    for pair in pairs:
        case, _, name = pair.partition("=")
        if case not in CASES or name not in DOT_BACKENDS:
            parser.error(f"--dot-backend {pair!r}: expected CASE=NAME with CASE one of {CASES} and NAME one of "
                         f"{DOT_BACKENDS}")
        chosen[case] = name
    return chosen


def run_case(name: str, size, args) -> dict:
    """All frameworks of one case, `args.rounds` times in alternation, with derived figures and ratios."""
    tokens = tokens_per_step(size)
    frameworks = [f for f in FRAMEWORKS if f != "torch_compile" or args.torch_compile]
    rounds = []
    for index in range(args.rounds):
        runs = {}
        for framework in frameworks:
            env = None
            with tempfile.TemporaryDirectory() as cache:
                if framework == "torch_compile":  # a fresh Inductor cache: the first call compiles from scratch
                    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
                result = run_worker(_case_job(name, size, framework, args), args.timeout, env)
            if "median_step_s" in result:
                result["tokens_per_s"] = tokens / result["median_step_s"]
            runs[framework] = result
            label = f" (round {index + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"{name} {framework}{label}: {_describe(result)}", flush=True)
        rounds.append(runs)
    out = {"size": dataclasses.asdict(size), "tokens_per_step": tokens,
           "model_flops_per_step": model_flops_per_step(size), **combine_rounds(rounds)}
    counts = {f: out[f]["num_params"] for f in frameworks if "num_params" in out[f]}
    out["num_params"] = counts
    if len(set(counts.values())) > 1:
        print(f"warning: {name}: parameter counts differ: {counts}", file=sys.stderr)
    return out


def combine_rounds(rounds: list[dict[str, dict]]) -> dict:
    """Per framework the run with the median step time over rounds (with every round's median in `rounds_s`), and
    each ratio flaxlm / other as the median over rounds of the two frameworks' times measured in the same round."""
    out = {}
    for framework in rounds[0]:
        runs = [r[framework] for r in rounds]
        ok = sorted((r for r in runs if _ok(r)), key=lambda r: r["median_step_s"])
        out[framework] = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
        if len(rounds) > 1:
            out[framework]["rounds_s"] = [r.get("median_step_s") for r in runs]
    for other in ("torch", "torch_compile"):
        paired = [r["flaxlm"]["median_step_s"] / r[other]["median_step_s"] for r in rounds
                  if _ok(r.get("flaxlm")) and _ok(r.get(other))]
        if paired:
            out[f"ratio_flaxlm_{other}"] = statistics.median(paired)
            out[f"ratios_flaxlm_{other}"] = paired
    return out


def _ok(result: dict | None) -> bool:
    return bool(result) and "median_step_s" in result


def _describe(result: dict) -> str:
    if not _ok(result):
        return f"FAILED ({result.get('error')})"
    return (f"median {result['median_step_s'] * 1e3:.1f} ms, first step {result['compile_s']:.2f} s, "
            f"{result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
            f"{result['num_params']} params, last loss {result['last_loss']:.4f}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "numpy")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "loadavg_before": os.getloadavg(),
    }


def compile_depth(args) -> dict:
    base = case_size("gpt_cpu", tiny=args.tiny)
    runs = {}
    for depth in DEPTHS:
        size = dataclasses.replace(base, n_layer=depth)
        runs[depth] = run_worker({"kind": "compile_depth", "size": dataclasses.asdict(size)}, args.timeout)
        print(f"compile depth {depth} layers: {runs[depth]}", flush=True)
    out = {"width": base.n_embd, "context": base.block_size, "heads": base.n_head, "batch": base.batch,
           "layers": {str(d): r for d, r in runs.items()}}
    if all("total_s" in r for r in runs.values()):
        out["ratio"] = runs[DEPTHS[-1]]["total_s"] / runs[DEPTHS[0]]["total_s"]
    return out


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _rounds_note(rounds: int) -> str:
    if rounds == 1:
        return ""
    return (f", {rounds} rounds alternating the frameworks (times: the median round; ratio: median over rounds of "
            f"the ratio within a round)")


def _tunables_note(machine: dict) -> str:
    tunables = machine.get("glibc_tunables")
    return f", both frameworks with GLIBC_TUNABLES={tunables}" if tunables else ""


def markdown(results: dict) -> str:
    """The README table plus notes (machine, settings, failures, the two studies)."""
    m, s = results["machine"], results["settings"]
    rows = ["| case | flaxlm ms | PyTorch eager ms | ratio | torch.compile ms | ratio | flaxlm MFU | flaxlm compile s "
            "| peak RSS MiB (flaxlm / torch) |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, case in results["cases"].items():
        flax, eager, compiled = case.get("flaxlm", {}), case.get("torch", {}), case.get("torch_compile")

        def ms(r):
            return _cell(r["median_step_s"] * 1e3, ".1f") if _ok(r) else "failed"

        compiled_cell = "not run" if compiled is None else ms(compiled)
        if compiled is not None and not _ok(compiled):
            notes.append(f"torch.compile failed on {name}: {compiled.get('error')}")
        rss = " / ".join(_cell(r.get("peak_rss_mib"), ".0f") for r in (flax, eager))
        rows.append(" | ".join([
            f"| {name}", ms(flax), ms(eager), _cell(case.get("ratio_flaxlm_torch"), ".2f"), compiled_cell,
            _cell(case.get("ratio_flaxlm_torch_compile"), ".2f"),
            _cell(flax.get("mfu") * 100 if "mfu" in flax else None, ".1f") + ("%" if "mfu" in flax else ""),
            _cell(flax.get("compile_s"), ".1f"), rss]) + " |")
    peak = results.get("peak_flops")
    lines = ["\n".join(rows)] if results["cases"] else []
    lines.append(f"float32, {m['cpu_model']} ({m['cpu_count']} cores), jax {m['versions']['jax']}, torch "
                 f"{m['versions']['torch']} ({s['torch_threads']} threads), {m['date']}; median of {s['steps']} "
                 f"steps after {s['warmup']} warm-up steps{' (tiny sizes)' if s['tiny'] else ''}; each case and "
                 f"framework in its own process{_rounds_note(s.get('rounds', 1))}{_tunables_note(m)}; ratio = "
                 f"flaxlm / PyTorch (< 1: flaxlm faster); load average "
                 f"{m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after.")
    if peak:
        lines.append(f"MFU = analytic model FLOPs per step / median step time / {peak / 1e9:.0f} GFLOP/s (2048^2 "
                     f"float32 matmul under jax.jit, this sitting). Compile s = first step (trace + compile + "
                     f"one step). Peak RSS = ru_maxrss of the benchmark process.")
    if s.get("dot_backend"):
        lines.append("flaxlm's matmul library (`dot_backend`; XLA's default elsewhere): "
                     + ", ".join(f"{case} {name}" for case, name in s["dot_backend"].items()) + ".")
    lines.extend(notes)
    depth = results.get("compile_depth")
    if depth:
        parts = [f"{d} layers {_cell(r.get('total_s'), '.1f')} s" for d, r in depth["layers"].items()]
        lines.append(f"GPT train-step compile time (width {depth['width']}, context {depth['context']}, "
                     f"lowering + XLA compile): {', '.join(parts)}, ratio {_cell(depth.get('ratio'), '.2f')} "
                     f"(goal <= 1.5).")
    loop = results.get("loop_overhead")
    if loop:
        if "overhead_percent" in loop:
            lines.append(f"Training-loop overhead (flaxlm.trainer.train, configs/char_gpt_cpu.yaml, "
                         f"{loop['loop_steps']} steps, log every {loop['log_every']}, median of "
                         f"{len(loop['rounds'])} rounds): "
                         f"{loop['trainer_median_step_s'] * 1e3:.1f} ms/step vs the bare step "
                         f"{loop['bare_median_step_s'] * 1e3:.1f} ms: {loop['overhead_percent']:+.1f}% "
                         f"(vs the bare step in unsynchronised windows of {loop['log_every']} steps, "
                         f"{loop['bare_windowed_step_s'] * 1e3:.1f} ms: {loop['overhead_vs_windowed_percent']:+.1f}%).")
        else:
            lines.append(f"Training-loop overhead: failed ({loop.get('error')}).")
    return "\n\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES),
                        help="cases to run (none: only the studies asked for)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case and framework")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every framework of a case this many times, alternating (ratios: median over rounds)")
    parser.add_argument("--pooling", choices=("last", "max"), default="last", help="BiLSTM pooling")
    parser.add_argument("--tiny", action="store_true", help="shrink every case (smoke test; numbers meaningless)")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    parser.add_argument("--dot-backend", nargs="*", default=[], metavar="CASE=NAME",
                        help=f"flaxlm's dot_backend for these cases, NAME one of {DOT_BACKENDS} (default xla)")
    parser.add_argument("--compile-depth", action="store_true", help="GPT compile time, 2 vs 12 layers")
    parser.add_argument("--loop-overhead", action="store_true", help="trainer loop vs bare step")
    parser.add_argument("--loop-steps", type=int, default=200)
    parser.add_argument("--loop-log-every", type=int, default=20)
    parser.add_argument("--loop-rounds", type=int, default=3, help="trainer runs, each between two bare timings")
    parser.add_argument("--no-hugepage-malloc", dest="hugepage_malloc", action="store_false",
                        help="do not add glibc.malloc.hugetlb=1 to the workers' GLIBC_TUNABLES")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each subprocess")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return 0
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be >= 1 and --warmup >= 0, got {args.steps}, {args.rounds} and "
                     f"{args.warmup}")
    if args.loop_overhead and args.loop_steps <= args.loop_log_every:
        parser.error(f"--loop-steps ({args.loop_steps}) must exceed --loop-log-every ({args.loop_log_every}): "
                     "the first log window (compilation) is excluded")

    args.dot_backend = _dot_backends(parser, args.dot_backend)
    if args.hugepage_malloc:
        os.environ.update(hugepage_environment(dict(os.environ)) or {})
    results = {"machine": machine_info(),
               "settings": {"steps": args.steps, "warmup": args.warmup, "tiny": args.tiny, "pooling": args.pooling,
                            "cases": args.cases, "torch_compile": args.torch_compile, "rounds": args.rounds,
                            "torch_threads": len(os.sched_getaffinity(0)), "dot_backend": args.dot_backend},
               "cases": {}}
    if args.cases:
        peaks = [run_worker({"kind": "peak", "n": 2048}, args.timeout)]
        for name in args.cases:
            results["cases"][name] = run_case(name, case_size(name, tiny=args.tiny, pooling=args.pooling), args)
        peaks.append(run_worker({"kind": "peak", "n": 2048}, args.timeout))
        results["peak_flops_measurements"] = peaks
        values = [p["peak_flops"] for p in peaks if "peak_flops" in p]
        results["peak_flops"] = max(values) if values else None
        for case in results["cases"].values():
            for framework in FRAMEWORKS:
                if _ok(case.get(framework)) and results["peak_flops"]:
                    r = case[framework]
                    r["mfu"] = case["model_flops_per_step"] / r["median_step_s"] / results["peak_flops"]
    if args.compile_depth:
        results["compile_depth"] = compile_depth(args)
    if args.loop_overhead:
        job = {"kind": "loop_overhead", "loop_steps": args.loop_steps, "log_every": args.loop_log_every,
               "rounds": args.loop_rounds, "steps": args.steps, "warmup": args.warmup}
        results["loop_overhead"] = run_worker(job, args.timeout)
        print(f"loop overhead: {results['loop_overhead']}", flush=True)
    results["machine"]["loadavg_after"] = os.getloadavg()

    table = markdown(results)
    print()
    publish(results, table, args.out, args.md, indent=2)
    failed = [f"{name}/{f}" for name, case in results["cases"].items() for f in ("flaxlm", "torch")
              if not _ok(case.get(f))]
    failed += [k for k in ("compile_depth", "loop_overhead") if k in results and (
        "error" in results[k] or any("error" in r for r in results[k].get("layers", {}).values()))]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
