"""Replay nanoGPT's train.py for ANCHORS' CPU run, and score the same model on the whole val split.

    python benchmarks/nanogpt_anchor.py [--seed 1337] [--out benchmarks/results/nanogpt_anchor.json]

ANCHORS.md quotes nanoGPT's CPU Shakespeare run (val loss 2.053 / 1.922 / 1.886 at steps 1000 / 1500 /
2000) from nanoGPT's `estimate_loss`: the mean loss of 20 random val batches of 12 x 64. This script
consumes torch's global RNG in train.py's exact order (model init, the first batch, `estimate_loss` at every
250th iteration with 20 train and 20 val batches, one new batch after each forward), so with the same seed
it replays the same batches, and it prints nanoGPT's estimate beside the loss over every target of the val
split (consecutive 64-token windows, as benchmarks/char_gpt.py and flaxlm's evaluation score it). Scoring
the whole split draws nothing from the RNG, so it does not disturb the replay.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from char_gpt import _lr, _torch_eval, shakespeare_splits  # noqa: E402
from nanogpt_reference import ReferenceArgs, ReferenceGPT  # noqa: E402

BLOCK, BATCH, EVAL_ITERS, EVAL_INTERVAL, MAX_ITERS = 64, 12, 20, 250, 2000


def _batch(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: 12 windows at uniform random starts, drawn from torch's global RNG."""
    ix = torch.randint(len(data) - BLOCK, (BATCH,))
    return (torch.stack([data[i:i + BLOCK] for i in ix]), torch.stack([data[i + 1:i + 1 + BLOCK] for i in ix]))


@torch.no_grad()
def _estimate(model, splits: dict) -> dict:
    """nanoGPT's estimate_loss: mean loss of EVAL_ITERS random batches per split, train first."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = []
        for _ in range(EVAL_ITERS):
            x, y = _batch(data)
            logits = model(x)
            losses.append(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1)).item())
        out[name] = float(np.mean(losses))
    model.train()
    return out


def replay(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int, seed: int) -> dict:
    """Train as nanoGPT's train.py does; return {step: {estimate_train, estimate_val, whole_val}}."""
    torch.manual_seed(seed)
    model = ReferenceGPT(ReferenceArgs(block_size=BLOCK, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128,
                                       dropout=0.0, bias=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))
    splits = {"train": torch.from_numpy(train_ids.astype(np.int64)),
              "val": torch.from_numpy(val_ids.astype(np.int64))}
    x, y = _batch(splits["train"])
    results = {}
    for it in range(MAX_ITERS + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr(it, MAX_ITERS)
        if it % EVAL_INTERVAL == 0:
            estimate = _estimate(model, splits)
            results[it] = {"estimate_train": estimate["train"], "estimate_val": estimate["val"],
                           "whole_val": _torch_eval(model, splits["val"], BLOCK)}
            print(f"step {it}: estimate train {estimate['train']:.4f} val {estimate['val']:.4f}, "
                  f"whole val {results[it]['whole_val']:.4f}", flush=True)
        if it == MAX_ITERS:
            break
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        x, y = _batch(splits["train"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[1337])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    train_ids, val_ids, vocab = shakespeare_splits()
    runs = {str(seed): replay(train_ids, val_ids, vocab, seed) for seed in args.seed}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"torch_version": torch.__version__, "runs": runs}, indent=2)
                                          + "\n")


if __name__ == "__main__":
    main()
