"""The experiment schema: what a `configs/*.yaml` file holds, as typed frozen dataclasses.

    task: lm | classify | translate | mlm
    model: {...}        # fields of the task's model config (GPTConfig, ClassifierConfig, Seq2SeqConfig or
                        # TransformerConfig, BertConfig)
    data: {...}         # DataConfig
    optim: {...}        # flaxlm.train.optimizers.OptimizerConfig (with its `schedule`)
    train: {...}        # TrainConfig
    mesh: {...}         # flaxlm.train.sharding.MeshConfig

`load_experiment(path, overrides)` reads and validates it; every error is a ConfigError naming the file
and the dotted key.
"""

import dataclasses
from typing import Any, Literal

from flaxlm.config import from_dict, load_config
from flaxlm.errors import ConfigError
from flaxlm.train.optimizers import OptimizerConfig
from flaxlm.train.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is tokenized and batched.

    `train` is a file path, or "default" for the embedded corpus (LM only). For LM with no `valid` file,
    the last `valid_fraction` of the train text is the validation split (nanoGPT's 90/10 split).
    Translation: `train`/`valid`/`test` are path prefixes and the files are `PREFIX.LANG` or `PREFIX.LANG.gz`
    for `source_lang` and `target_lang` (fairseq's layout). Masked LM: `extra_text` lists more unlabeled
    text files; `mask_prob` of the tokens are chosen for prediction.
    """

    train: str = "default"
    valid: str | None = None
    test: str | None = None
    valid_fraction: float = 0.1
    tokenizer: Literal["char", "word", "bpe"] = "char"
    vocab_size: int = 8000
    min_count: int = 1
    batch_size: int = 12
    block_size: int = 64
    bucket_boundaries: tuple[int, ...] = (16, 32, 64)
    max_length: int = 64
    overlong: Literal["truncate", "reject"] = "truncate"
    label_fraction: float = 1.0
    eval_batch_size: int = 64
    source_lang: str | None = None
    target_lang: str | None = None
    extra_text: tuple[str, ...] = ()
    mask_prob: float = 0.15

    def __post_init__(self):
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"must be in (0, 1), got {self.valid_fraction}", key="valid_fraction")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"must be in (0, 1), got {self.mask_prob}", key="mask_prob")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.label_fraction}", key="label_fraction")
        for name in ("batch_size", "block_size", "max_length", "eval_batch_size", "vocab_size", "min_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if list(self.bucket_boundaries) != sorted(set(self.bucket_boundaries)) or not self.bucket_boundaries:
            raise ConfigError(f"must be strictly increasing and non-empty, got {self.bucket_boundaries}",
                              key="bucket_boundaries")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, evaluation, logging, checkpoints and fault policy.

    `init_from` is the workdir of another run (e.g. masked-LM pretraining) whose latest checkpoint gives the
    initial parameters of the parts the task knows how to transfer (params only; optimizer state is fresh).
    `dot_backend` picks the library that runs the matmuls of the steps compiled for XLA:CPU ('xla': XLA's
    default; 'eigen'; 'onednn'); see `flaxlm.train.dot_backend`. It changes speed, not results beyond
    float32 rounding.

    Faults (see `flaxlm.trainer`):
    - `nonfinite`: a NaN/Inf loss or gradient. 'skip' leaves parameters and optimizer state unchanged and
      counts the step in `train/skipped`; 'stop' does the same, saves a checkpoint of that last good state
      and exits non-zero naming the step; 'ignore' applies the update anyway.
    - `on_write_error`: a checkpoint, metrics or TensorBoard write fails (full disk, read-only directory).
      'stop' writes nothing more and exits non-zero with one error naming the path; 'continue' warns once
      per kind of file and keeps training, retrying at the next scheduled write.
    - `spike_factor`: a step whose loss exceeds this multiple of the median of the previous 100 step losses
      is a loss spike: warned about and counted in `train/spikes` of metrics.jsonl (null turns it off).
    """

    steps: int = 2000
    seed: int = 1337
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    best_metric: str = "eval/loss"
    nonfinite: Literal["skip", "stop", "ignore"] = "skip"
    on_write_error: Literal["stop", "continue"] = "stop"
    spike_factor: float | None = 3.0
    grad_accum_steps: int = 1
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    dot_backend: Literal["xla", "eigen", "onednn"] = "xla"
    progress: bool = True
    init_from: str | None = None

    @property
    def best_mode(self) -> str:
        """'max' when `best_metric` is an accuracy or BLEU, else 'min' (a loss)."""
        return "max" if any(name in self.best_metric for name in ("accuracy", "bleu")) else "min"

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"must be >= 1 or null (whole split), got {self.eval_batches}", key="eval_batches")
        if self.spike_factor is not None and not self.spike_factor > 1.0:
            raise ConfigError(f"must be > 1 or null (no spike detection), got {self.spike_factor}", key="spike_factor")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run. `model` is checked against the task's model config when the task is built."""

    task: Literal["lm", "classify", "translate", "mlm"] = "lm"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        if self.data.batch_size % self.train.grad_accum_steps:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.train.grad_accum_steps}", key="train.grad_accum_steps")


def load_experiment(path, overrides=()) -> ExperimentConfig:
    """Load, override and validate an experiment config (ConfigError names the file and key)."""
    return load_config(path, ExperimentConfig, list(overrides))


def model_config(cls, model: dict[str, Any], **fixed):
    """Build the task's model config `cls` from the `model` section; `fixed` fields come from the data."""
    for key in fixed:
        if key in model and model[key] != fixed[key]:
            raise ConfigError(f"is set by the data ({fixed[key]}), got {model[key]}", key=f"model.{key}")
    return from_dict(cls, {**model, **fixed}, path="model")
