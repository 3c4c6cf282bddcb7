"""Copy a finished run's small text results into benchmarks/results/NAME: resolved config, metrics, summary.

    python benchmarks/record_run.py runs/multi30k_transformer --command "flaxlm train ..." [--wall-s 1234]

Writes `config.yaml` and `metrics.jsonl` (copies) and `summary.json`: the command, date, steps, the last
evaluation's metrics, the best value of the run's `train.best_metric` with its step, and the wall time (given,
or the sum of the logged step times). Checkpoints and TensorBoard files are never copied.
"""

import argparse
import datetime
import json
import pathlib
import shutil

from flaxlm.experiment import load_experiment
from flaxlm.metrics_log import read_metrics

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def summarize(workdir: pathlib.Path, command: str, wall_s: float | None) -> dict:
    """The summary.json object of a finished run in `workdir`."""
    rows = read_metrics(workdir / "metrics.jsonl")
    evals = [r for r in rows if "eval/loss" in r]
    if not evals:
        raise SystemExit(f"{workdir / 'metrics.jsonl'}: no evaluation rows; is the run finished?")
    train = load_experiment(workdir / "config.yaml").train
    best_metric = train.best_metric
    pick = max if train.best_mode == "max" else min
    best = pick((r for r in evals if best_metric in r), key=lambda r: r[best_metric], default=evals[-1])
    logged_s = 0.0
    previous = 0
    for row in rows:
        if "perf/step_time_s" in row:
            logged_s += row["perf/step_time_s"] * (row["step"] - previous)
            previous = row["step"]
    return {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "steps": rows[-1]["step"],
        "final": {k: v for k, v in evals[-1].items() if k.startswith("eval/")},
        "best": {"metric": best_metric, "value": best.get(best_metric), "step": best["step"]},
        "wall_time_s": wall_s if wall_s is not None else round(logged_s, 1),
        "sum_of_step_times_s": round(logged_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--name", default=None, help="results folder name (default: the workdir's name)")
    parser.add_argument("--wall-s", type=float, default=None, help="measured wall time of the whole run")
    args = parser.parse_args()
    out = RESULTS / (args.name or args.workdir.name)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(args.workdir, args.command, args.wall_s)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(args.workdir / name, out / name)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
