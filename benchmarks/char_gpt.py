"""Char-level GPT on tinyshakespeare: flaxlm vs a PyTorch nanoGPT reference, side by side in one sitting.

    python benchmarks/char_gpt.py [--steps 2000] [--seeds 1337 1 2] [--out benchmarks/results/char_gpt_cpu.json]

Both train nanoGPT's CPU setting (configs/char_gpt_cpu.yaml: 4 layers, 4 heads, width 128, context 64,
batch 12, no bias, tied embeddings, AdamW 1e-3 (0.9, 0.99), weight decay 0.1 on matrices, 100 warmup
steps, cosine to 1e-4, clip 1.0) and are evaluated on EVERY target of the validation split (the last 10%
of the text). PyTorch runs eager float32 with nanoGPT's train.py loop (our own reimplementation of its
model: tests/interop/nanogpt_reference.py); its step time is measured around each iteration. flaxlm runs
`flaxlm.trainer.train`; its step time is the trainer's own perf/step_time_s (median over log windows).
With several `--seeds` each framework trains once per seed (init, batches) and the mean and spread of the
final val loss are reported: the seed-to-seed spread is the yardstick for any difference between the two.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from nanogpt_reference import ReferenceArgs, ReferenceGPT  # noqa: E402

from flaxlm.experiment import load_experiment  # noqa: E402
from flaxlm.metrics_log import read_metrics  # noqa: E402
from flaxlm.trainer import train  # noqa: E402

CONFIG = ROOT / "configs" / "char_gpt_cpu.yaml"
EVAL_STEPS = (500, 1000, 1500, 2000)


def shakespeare_splits() -> tuple[np.ndarray, np.ndarray, int]:
    """nanoGPT's shakespeare_char prepare.py: ids over the sorted characters of the whole text; first 90% train,
    last 10% val. Returns (train ids [N_train] int32, val ids [N_val] int32, vocabulary size)."""
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], np.int32)
    cut = int(len(text) * 0.9)
    return ids[:cut], ids[cut:], len(chars)


def _lr(it: int, steps: int) -> float:
    """nanoGPT's get_lr: linear warmup over 100 iterations, cosine from 1e-3 to 1e-4 at `steps`."""
    if it < 100:
        return 1e-3 * (it + 1) / (100 + 1)
    ratio = (it - 100) / (steps - 100)
    return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)


@torch.no_grad()
def _torch_eval(model, val: torch.Tensor, block: int = 64) -> float:
    """Mean loss over every next-token target of `val`, in consecutive windows (as flaxlm's lm_sequential)."""
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(val) - 1, block))
    for start in starts:
        row = val[start:start + block + 1]
        x, y = row[:-1][None], row[1:][None]
        logits = model(x)
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def run_torch(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    args = ReferenceArgs(block_size=64, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
    model = ReferenceGPT(args)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    data, val = torch.from_numpy(train_ids.astype(np.int64)), torch.from_numpy(val_ids.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    times, evals = [], {}
    for it in range(steps):
        start = time.perf_counter()
        ix = torch.randint(len(data) - 64, (12,), generator=gen)
        x = torch.stack([data[i:i + 64] for i in ix])
        y = torch.stack([data[i + 1:i + 65] for i in ix])
        for group in optimizer.param_groups:
            group["lr"] = _lr(it, steps)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
        if it + 1 in EVAL_STEPS or it + 1 == steps:
            evals[it + 1] = _torch_eval(model, val)
            print(f"torch seed {seed} step {it + 1}: val loss {evals[it + 1]:.4f}", flush=True)
    return {"median_step_time_s": statistics.median(times), "total_time_s": sum(times), "val_loss": evals}


def run_flaxlm(steps: int, seed: int) -> dict:
    cfg = load_experiment(CONFIG, [f"train.steps={steps}", f"optim.schedule.total_steps={steps}", f"train.seed={seed}",
                                   "train.eval_every=500", "train.log_every=50", "train.checkpoint_every=1000"])
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        train(cfg, workdir, progress=False)
        total = time.perf_counter() - start
        rows = read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
    step_times = [r["perf/step_time_s"] for r in rows if r["step"] > 50]
    evals = {r["step"]: r["eval/loss"] for r in rows if r.get("eval/loss") is not None}
    for step, loss in evals.items():
        print(f"flaxlm seed {seed} step {step}: val loss {loss:.4f}", flush=True)
    return {"median_step_time_s": statistics.median(step_times), "total_time_s": total, "val_loss": evals}


def _summary(runs: list[dict], seeds: list[int], steps: int) -> dict:
    """Per-seed runs -> median step time over all of them, final val loss mean/min/max and each run."""
    finals = [run["val_loss"][steps] for run in runs]
    return {
        "median_step_time_s": statistics.median(run["median_step_time_s"] for run in runs),
        "final_val_loss_mean": statistics.fmean(finals),
        "final_val_loss_min": min(finals),
        "final_val_loss_max": max(finals),
        "runs": dict(zip(map(str, seeds), runs)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=("torch", "flaxlm"), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args = parser.parse_args()
    train_ids, val_ids, vocab = shakespeare_splits()
    results = {"steps": args.steps, "seeds": args.seeds, "torch_version": torch.__version__,
               "torch_threads": torch.get_num_threads()}
    runners = {"flaxlm": lambda seed: run_flaxlm(args.steps, seed),
               "pytorch": lambda seed: run_torch(train_ids, val_ids, vocab, args.steps, seed)}
    for name, runner in runners.items():
        if args.only is None or {"torch": "pytorch"}.get(args.only, args.only) == name:
            results[name] = _summary([runner(seed) for seed in args.seeds], args.seeds, args.steps)
    if "flaxlm" in results and "pytorch" in results:
        results["step_time_ratio"] = results["flaxlm"]["median_step_time_s"] / results["pytorch"]["median_step_time_s"]
        print(f"median step: flaxlm {results['flaxlm']['median_step_time_s'] * 1e3:.1f} ms, PyTorch "
              f"{results['pytorch']['median_step_time_s'] * 1e3:.1f} ms, ratio {results['step_time_ratio']:.2f}")
    for name in runners:
        if name in results:
            print(f"{name}: final val loss mean {results[name]['final_val_loss_mean']:.4f} "
                  f"(min {results[name]['final_val_loss_min']:.4f}, max {results[name]['final_val_loss_max']:.4f})")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
