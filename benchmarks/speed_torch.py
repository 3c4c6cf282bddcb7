"""PyTorch side of benchmarks/speed.py: the same models as flaxlm's, trained eagerly or with torch.compile.

Models, each with exactly flaxlm's parameters (tests/test_speed_harness.py checks counts and loads these weights
into flaxlm for equal losses):
- GPT: tests/interop/nanogpt_reference.py (nanoGPT's architecture: no bias, tied embeddings, fused c_attn).
- TorchTextClassifier: nn.Embedding -> bidirectional batch-first nn.LSTM -> pooling -> nn.Linear, as flaxlm's
  TextClassifier(backbone='bilstm'): 'last' joins the top layer's final forward and backward states (h_n[-2],
  h_n[-1]), 'max' takes the maximum over time of the top layer's outputs.
- TorchSeq2Seq: flaxlm's Seq2Seq with attention='luong' (its docstring has the equations).
The step is the usual loop body: loss, zero_grad, backward, clip_grad_norm_, AdamW step (torch's default
implementation), with speed_cases.OPTIMIZER. torch.compile (default mode) compiles the model; the loss,
backward (through AOTAutograd's compiled graph), clipping and optimizer stay eager, as nanoGPT's --compile.
"""

import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "interop"))
from nanogpt_reference import ReferenceArgs, ReferenceGPT  # noqa: E402
from speed_cases import OPTIMIZER, BiLSTMSize, GPTSize, numpy_batch  # noqa: E402


class TorchTextClassifier(nn.Module):
    """tokens [B, T] int64 (no padding) -> logits [B, classes]."""

    def __init__(self, size: BiLSTMSize):
        super().__init__()
        self.pooling = size.pooling
        self.embed = nn.Embedding(size.vocab, size.embed)
        self.lstm = nn.LSTM(size.embed, size.hidden, size.layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * size.hidden, size.classes)

    def forward(self, tokens):
        outputs, (h, _) = self.lstm(self.embed(tokens))
        features = torch.cat([h[-2], h[-1]], dim=-1) if self.pooling == "last" else outputs.amax(dim=1)
        return self.head(features)


class TorchSeq2Seq(nn.Module):
    """src [B, S], src_lengths [B], tgt_in [B, T] -> logits [B, T, V_tgt]; flaxlm's parameter names."""

    def __init__(self, size):
        super().__init__()
        h = size.hidden
        self.src_embed = nn.Embedding(size.src_vocab, size.embed)
        self.encoder = nn.LSTM(size.embed, h, size.layers, batch_first=True)
        self.tgt_embed = nn.Embedding(size.tgt_vocab, size.embed)
        self.decoder = nn.LSTM(size.embed, h, size.layers, batch_first=True)
        self.attn_score = nn.Linear(h, h, bias=False)
        self.attn_combine = nn.Linear(2 * h, h, bias=False)
        self.output = nn.Linear(h, size.tgt_vocab)

    def forward(self, src, src_lengths, tgt_in):
        memory, carry = self.encoder(self.src_embed(src))
        keys = self.attn_score(memory)
        top, _ = self.decoder(self.tgt_embed(tgt_in), carry)
        scores = torch.einsum("bth,bsh->bts", top, keys)
        valid = (torch.arange(src.shape[1]) < src_lengths[:, None])[:, None, :]
        weights = scores.masked_fill(~valid, torch.finfo(scores.dtype).min).softmax(dim=-1)
        context = (weights * valid) @ memory
        return self.output(torch.tanh(self.attn_combine(torch.cat([context, top], dim=-1))))


def make_model(size) -> nn.Module:
    """The PyTorch model of a case size (dropout 0, float32, torch's default initialisation)."""
    if isinstance(size, GPTSize):
        return ReferenceGPT(ReferenceArgs(block_size=size.block_size, vocab_size=size.vocab, n_layer=size.n_layer,
                                          n_head=size.n_head, n_embd=size.n_embd, dropout=0.0, bias=False))
    if isinstance(size, BiLSTMSize):
        return TorchTextClassifier(size)
    return TorchSeq2Seq(size)


def _token_loss(logits, targets, mask):
    """Mean cross-entropy over real target tokens: logits [B, T, V], targets [B, T], mask [B, T]."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum() / mask.sum()


def loss(size, forward, batch):
    """The case's mean training loss of `forward` (the model, compiled or not) on a torch batch."""
    if isinstance(size, GPTSize):
        return _token_loss(forward(batch["inputs"]), batch["targets"], batch["mask"])
    if isinstance(size, BiLSTMSize):
        losses = F.cross_entropy(forward(batch["tokens"]), batch["labels"], reduction="none")
        return (losses * batch["weights"]).sum() / batch["weights"].sum()
    return _token_loss(forward(batch["src"], batch["src_lengths"], batch["tgt_in"]), batch["tgt_out"],
                       batch["tgt_mask"])


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """speed_cases.numpy_batch as tensors: ids as int64, masks as float32."""
    return {k: torch.from_numpy(v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v)
            for k, v in batch.items()}


def num_params(model: nn.Module) -> int:
    """Number of trained scalars; a tied weight counts once (model.parameters() yields it once)."""
    return sum(p.numel() for p in model.parameters())


class Bench:
    """One case's eager (or torch.compile'd) train step: `step()` runs one step; `last_loss()` its loss."""

    def __init__(self, size, seed: int = 0, compile_model: bool = False):
        torch.manual_seed(seed)
        self.size = size
        self.model = make_model(size)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.num_params = num_params(self.model)
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": OPTIMIZER["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=OPTIMIZER["learning_rate"],
                                           betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]), eps=OPTIMIZER["eps"])
        self.batch = torch_batch(numpy_batch(size))
        self.loss = None

    def step(self) -> None:
        value = loss(self.size, self.forward, self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        with torch.profiler.record_function("optimizer"):  # benchmarks/profile_torch.py's category
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMIZER["clip_norm"])
            self.optimizer.step()
        self.loss = value.detach()

    def last_loss(self) -> float:
        """Mean loss of the last step's batch, before that step's update."""
        return float(self.loss)
