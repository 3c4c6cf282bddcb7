"""The benchmark cases of benchmarks/speed.py, framework-free: sizes, batches, tokens and model FLOPs per step.

The flaxlm and PyTorch builders (speed_flaxlm.py, speed_torch.py) both read these, so the two frameworks train
the same model on the same batch. No JAX or torch import here: each benchmark subprocess imports only its own
framework, so its peak RSS is that framework's alone.

Every case trains with the same optimizer (`OPTIMIZER`): AdamW lr 1e-3, betas (0.9, 0.99), eps 1e-8, weight
decay 0.1 on every parameter of rank >= 2 (nanoGPT's rule: flaxlm's decay_mask='matrices', torch's parameter
groups by p.dim() >= 2), global-norm clipping at 1.0, a constant learning rate, dropout 0, float32.
Batches are full length (no padding), so torch runs its LSTMs unpacked while flaxlm's length-aware scans see
lengths == T: the same arithmetic on both sides.
"""

import dataclasses

import numpy as np

OPTIMIZER = {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0}


@dataclasses.dataclass(frozen=True)
class GPTSize:
    """nanoGPT-style GPT (no bias, tied embeddings) on [batch, block_size] token windows."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch: int
    vocab: int = 65
    remat: str = "dots"  # flaxlm's GPTConfig.remat (PyTorch keeps every activation)


@dataclasses.dataclass(frozen=True)
class BiLSTMSize:
    """TextClassifier: embedding -> `layers`-layer BiLSTM -> pooling ('last' or 'max') -> linear."""

    layers: int
    embed: int
    hidden: int
    batch: int
    length: int
    vocab: int
    classes: int = 2
    pooling: str = "last"


@dataclasses.dataclass(frozen=True)
class Seq2SeqSize:
    """LSTM encoder-decoder with Luong ('general') attention and teacher forcing."""

    layers: int
    embed: int
    hidden: int
    batch: int
    src_length: int
    tgt_length: int
    src_vocab: int
    tgt_vocab: int


SIZES = {
    "gpt_cpu": GPTSize(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
    "gpt_large": GPTSize(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=16, remat="dots_all"),
    "bilstm": BiLSTMSize(layers=2, embed=256, hidden=256, batch=64, length=64, vocab=16384),
    "seq2seq": Seq2SeqSize(layers=2, embed=256, hidden=512, batch=64, src_length=24, tgt_length=24,
                           src_vocab=8000, tgt_vocab=8000),
}

TINY_SIZES = {
    "gpt_cpu": GPTSize(n_layer=2, n_head=2, n_embd=32, block_size=16, batch=4),
    "gpt_large": GPTSize(n_layer=2, n_head=3, n_embd=48, block_size=32, batch=4),
    "bilstm": BiLSTMSize(layers=2, embed=16, hidden=16, batch=4, length=8, vocab=100),
    "seq2seq": Seq2SeqSize(layers=2, embed=16, hidden=32, batch=4, src_length=6, tgt_length=5, src_vocab=50,
                           tgt_vocab=60),
}

CASES = tuple(SIZES)


def case_size(name: str, *, tiny: bool = False, pooling: str | None = None):
    """The size of case `name` (full or tiny); `pooling` overrides the BiLSTM pooling."""
    if name not in SIZES:
        raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    size = (TINY_SIZES if tiny else SIZES)[name]
    if pooling is not None and isinstance(size, BiLSTMSize):
        if pooling not in ("last", "max"):
            raise ValueError(f"pooling must be 'last' or 'max', got {pooling!r}")
        size = dataclasses.replace(size, pooling=pooling)
    return size


def size_from_dict(name: str, fields: dict):
    """Inverse of dataclasses.asdict for the size of case `name` (sizes travel to subprocesses as JSON)."""
    return type(SIZES[name])(**fields)


def tokens_per_step(size) -> int:
    """Tokens of one batch: B * T for GPT and BiLSTM, B * T_tgt (target tokens) for seq2seq."""
    if isinstance(size, GPTSize):
        return size.batch * size.block_size
    if isinstance(size, BiLSTMSize):
        return size.batch * size.length
    return size.batch * size.tgt_length


def _lstm_macs_per_token(in_features: int, hidden: int, layers: int, directions: int) -> int:
    """Gate matmul multiply-adds of a stacked LSTM per input token: 4H (F_l + H) per layer and direction."""
    total = 0
    for layer in range(layers):
        layer_in = in_features if layer == 0 else directions * hidden
        total += directions * 4 * hidden * (layer_in + hidden)
    return total


def model_flops_per_step(size) -> float:
    """Analytic model FLOPs of one training step (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

    GPT (as flaxlm.tasks.lm.LMTask.model_flops_per_step, PaLM appendix B), with L layers, width C, vocab V,
    context T and N = 12 L C^2 + C V (non-embedding matmul parameters plus the tied output head):
        (6 N + 12 L C T) * B T
    BiLSTM classifier, with E the embedding width, H the hidden width per direction, F_0 = E, F_l = 2H:
        6 * [B T * sum_l 2 * 4H (F_l + H)  +  B * 2H * classes]
    Seq2seq with Luong attention (encoder over S source tokens, decoder over T target tokens, F_0 = E, F_l = H):
        6 * B * [S * (sum_l 4H (F_l + H) + H^2)                     encoder LSTM, keys W h_j
                 + T * (sum_l 4H (F_l + H) + 2 S H + 2 H^2 + H V)]  decoder LSTM, scores and context,
                                                                     tanh(W_c [c; s]), output layer
    Embedding lookups, biases, norms, gate nonlinearities, softmax and the loss are left out.
    """
    if isinstance(size, GPTSize):
        n = 12 * size.n_layer * size.n_embd**2 + size.n_embd * size.vocab
        attention = 12 * size.n_layer * size.n_embd * size.block_size
        return float((6 * n + attention) * tokens_per_step(size))
    if isinstance(size, BiLSTMSize):
        lstm = _lstm_macs_per_token(size.embed, size.hidden, size.layers, 2)
        return float(6 * (size.batch * size.length * lstm + size.batch * 2 * size.hidden * size.classes))
    h, s, t = size.hidden, size.src_length, size.tgt_length
    lstm = _lstm_macs_per_token(size.embed, h, size.layers, 1)
    encoder = s * (lstm + h * h)
    decoder = t * (lstm + 2 * s * h + 2 * h * h + h * size.tgt_vocab)
    return float(6 * size.batch * (encoder + decoder))


def numpy_batch(size, seed: int = 0) -> dict[str, np.ndarray]:
    """One random full-length batch (int32 ids, float32 masks), the same for both frameworks.

    GPT: inputs, targets [B, T], mask [B, T] (ones). BiLSTM: tokens [B, T] (ids >= 1, 0 is padding), lengths
    [B] (= T), labels [B], weights [B] (ones). Seq2seq: src [B, S], src_lengths [B] (= S), tgt_in, tgt_out
    [B, T], tgt_mask [B, T] (ones).
    """
    rng = np.random.default_rng(seed)
    if isinstance(size, GPTSize):
        data = rng.integers(0, size.vocab, (size.batch, size.block_size + 1), dtype=np.int32)
        return {"inputs": data[:, :-1].copy(), "targets": data[:, 1:].copy(),
                "mask": np.ones((size.batch, size.block_size), np.float32)}
    if isinstance(size, BiLSTMSize):
        return {"tokens": rng.integers(1, size.vocab, (size.batch, size.length), dtype=np.int32),
                "lengths": np.full((size.batch,), size.length, np.int32),
                "labels": rng.integers(0, size.classes, (size.batch,), dtype=np.int32),
                "weights": np.ones((size.batch,), np.float32)}
    target = rng.integers(1, size.tgt_vocab, (size.batch, size.tgt_length + 1), dtype=np.int32)
    return {"src": rng.integers(1, size.src_vocab, (size.batch, size.src_length), dtype=np.int32),
            "src_lengths": np.full((size.batch,), size.src_length, np.int32),
            "tgt_in": target[:, :-1].copy(), "tgt_out": target[:, 1:].copy(),
            "tgt_mask": np.ones((size.batch, size.tgt_length), np.float32)}
