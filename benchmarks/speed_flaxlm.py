"""flaxlm side of benchmarks/speed.py: each case as the trainer's jitted train step on a fixed batch.

The step is built as `flaxlm.trainer.build_run` builds it: `make_train_step(loss_fn, mesh=make_mesh())` on a
`TrainState` of the model and `make_optimizer(OptimizerConfig(...))`, placed with `shard_state`, the batch with
`shard_batch`; float32, state donated, non-finite policy 'skip'. Losses are the tasks' own (LMTask.loss_fn,
ClassifyTask.loss_fn) or, for seq2seq, TranslateTask's without label smoothing.
"""

import jax
from flax import nnx

from flaxlm.models.classifier import ClassifierConfig, TextClassifier
from flaxlm.models.gpt import GPT, GPTConfig
from flaxlm.models.seq2seq import Seq2Seq, Seq2SeqConfig
from flaxlm.ops.losses import sequence_cross_entropy
from flaxlm.tasks.classify import ClassifyTask
from flaxlm.tasks.lm import LMTask
from flaxlm.train.optimizers import OptimizerConfig, make_optimizer
from flaxlm.train.sharding import MeshConfig, make_mesh, shard_batch, shard_state
from flaxlm.train.state import TrainState
from flaxlm.train.step import make_train_step
from speed_cases import OPTIMIZER, BiLSTMSize, GPTSize, numpy_batch


def seq2seq_loss(model, batch, dropout_key):
    """TranslateTask.loss_fn for teacher forcing ratio 1 and no label smoothing: summed target cross-entropy."""
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"], dropout_key=dropout_key)
    mask = batch["tgt_mask"]
    loss_sum, count = sequence_cross_entropy(logits, batch["tgt_out"], mask)
    correct = ((logits.argmax(-1) == batch["tgt_out"]) * mask).sum()
    return loss_sum, {"weight": count, "correct": correct}


def make_model(size, seed: int = 0) -> nnx.Module:
    """The flaxlm model of a case size (dropout 0, float32)."""
    rngs = nnx.Rngs(seed)
    if isinstance(size, GPTSize):
        return GPT(GPTConfig(vocab_size=size.vocab, block_size=size.block_size, n_layer=size.n_layer,
                             n_head=size.n_head, n_embd=size.n_embd, dropout=0.0, bias=False, tie_embeddings=True,
                             remat=size.remat),
                   rngs=rngs)
    if isinstance(size, BiLSTMSize):
        return TextClassifier(ClassifierConfig(vocab_size=size.vocab, num_classes=size.classes, backbone="bilstm",
                                               pooling=size.pooling, embed_dim=size.embed, hidden_size=size.hidden,
                                               num_layers=size.layers), rngs=rngs)
    return Seq2Seq(Seq2SeqConfig(src_vocab_size=size.src_vocab, tgt_vocab_size=size.tgt_vocab,
                                 src_embed_dim=size.embed, tgt_embed_dim=size.embed, hidden_size=size.hidden,
                                 num_layers=size.layers, attention="luong"), rngs=rngs)


def loss_fn(size):
    """The task loss `loss_fn(model, batch, dropout_key) -> (loss_sum, aux)` of a case size."""
    if isinstance(size, GPTSize):
        return LMTask.loss_fn
    if isinstance(size, BiLSTMSize):
        return ClassifyTask.loss_fn
    return seq2seq_loss


def num_params(model: nnx.Module) -> int:
    """Number of trained scalars (every nnx.Param)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def optimizer_config() -> OptimizerConfig:
    """speed_cases.OPTIMIZER as flaxlm's config: AdamW, nanoGPT's decay mask, clipping, constant rate."""
    return OptimizerConfig(name="adamw", decay_mask="matrices", **OPTIMIZER)


class Bench:
    """One case's train step, ready to time: `step()` runs one synchronised step; `last_loss()` its loss.

    `model` replaces the freshly initialised model (the parity test passes one holding torch's weights).
    `dot_backend` is make_train_step's (the library of XLA:CPU's matmuls).
    `lower()` gives the step lowered for this state and batch (jax.stages.Lowered), for compile-time studies.
    """

    def __init__(self, size, seed: int = 0, model: nnx.Module | None = None, dot_backend: str = "xla"):
        model = make_model(size, seed) if model is None else model
        mesh = make_mesh(MeshConfig())
        self.num_params = num_params(model)
        self.state = shard_state(TrainState.create(model, make_optimizer(optimizer_config()), seed + 1), mesh)
        self.batch = shard_batch(numpy_batch(size), mesh)
        self.train_step = make_train_step(loss_fn(size), mesh=mesh, dot_backend=dot_backend)
        self.metrics = None

    def step(self) -> None:
        self.state, self.metrics = self.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))

    def last_loss(self) -> float:
        """Mean loss of the last step's batch, before that step's update."""
        return float(self.metrics["loss"])

    def lower(self):
        return self.train_step.lower(self.state, self.batch)
