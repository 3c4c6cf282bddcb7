"""The training loop behind `flaxlm train`: progress bar, evaluation, checkpoints, resume, pre-emption.

    result = train(load_experiment("configs/char_gpt_cpu.yaml"), "runs/char")

A workdir holds everything about a run: `config.yaml` (resolved), `tokenizer.json`, `checkpoints/`,
`metrics.jsonl`, `tensorboard/` and `loss.png`. Running the same command again resumes from the last
complete checkpoint: same batches (the data iterator state is checkpointed) and same dropout keys (the
RNG is part of the state), so the losses continue exactly as an uninterrupted run. SIGTERM (pre-emption)
and SIGINT (Ctrl-C) finish the current step, save a checkpoint and return.
"""

import contextlib
import dataclasses
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from flaxlm.checkpoint import Checkpointer
from flaxlm.config import load_config, save_config, to_dict
from flaxlm.data.tokenizers import load_tokenizer
from flaxlm.errors import ConfigError, FlaxlmError
from flaxlm.experiment import ExperimentConfig
from flaxlm.metrics_log import MetricsLog, plot_loss_curve, read_metrics
from flaxlm.tasks import build_task
from flaxlm.train.optimizers import make_optimizer
from flaxlm.train.sharding import make_mesh, shard_batch, shard_state
from flaxlm.train.state import TrainState
from flaxlm.train.step import make_eval_step, make_train_step

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Run:
    """Everything built from a config: the task, the mesh, the state and the compiled steps."""

    cfg: ExperimentConfig
    task: object
    mesh: jax.sharding.Mesh
    state: TrainState
    train_step: object
    eval_step: object


def build_run(cfg: ExperimentConfig, tokenizer=None) -> Run:
    """Task, mesh, a fresh sharded TrainState and the jitted steps for `cfg` (no files touched)."""
    task = build_task(cfg, tokenizer)
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(str(e), key="mesh") from None
    model = task.make_model(nnx.Rngs(cfg.train.seed))
    if cfg.train.init_from is not None:
        if not hasattr(task, "load_pretrained"):
            raise ConfigError(f"task {cfg.task!r} cannot start from another run's parameters", key="train.init_from")
        model = task.load_pretrained(model, cfg.train.init_from)
    state = shard_state(TrainState.create(model, make_optimizer(cfg.optim), cfg.train.seed + 1), mesh)
    dtype = COMPUTE_DTYPES[cfg.train.compute_dtype]
    train_step = make_train_step(task.loss_fn, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps,
                                 compute_dtype=dtype, nonfinite=cfg.train.nonfinite)
    eval_step = make_eval_step(task.loss_fn, mesh=mesh, compute_dtype=dtype)
    return Run(cfg, task, mesh, state, train_step, eval_step)


def evaluate(run: Run, model, split: str, max_batches: int | None = None) -> dict[str, float]:
    """Loss (and accuracy where defined) over a whole split: sums of losses and counts, divided once."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(run.task.eval_iterator(split)):
        if max_batches is not None and i >= max_batches:
            break
        metrics = run.eval_step(model, shard_batch(batch, run.mesh))
        for key in ("loss_sum", "tokens", "correct"):
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + float(metrics[key])
    if not totals.get("tokens"):
        raise FlaxlmError(f"the {split!r} split has no examples to evaluate")
    out = {"loss": totals["loss_sum"] / totals["tokens"]}
    if "correct" in totals:
        out["accuracy"] = totals["correct"] / totals["tokens"]
    if hasattr(run.task, "extra_metrics"):
        out.update(run.task.extra_metrics(model, split))
    return out


def _check_resumable(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
    """Refuse a workdir that is not a directory, or whose saved run has another task, model or data."""
    if workdir.exists() and not workdir.is_dir():
        raise FlaxlmError(f"{workdir}: the workdir is not a directory")
    saved_path = workdir / "config.yaml"
    if saved_path.exists():
        saved, new = to_dict(load_config(saved_path, ExperimentConfig)), to_dict(cfg)
        for section in ("task", "model", "data"):
            if saved[section] != new[section]:
                raise ConfigError(f"{_differences(saved[section], new[section])} differs from the run in this "
                                  f"workdir ({saved_path}); use a new --workdir", key=section)


def _differences(saved, new) -> str:
    """What differs between two config sections, e.g. "n_embd=64 (saved: 32)"."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return f"{new!r} (saved: {saved!r})"
    missing = "<unset>"
    keys = [k for k in {**saved, **new} if saved.get(k, missing) != new.get(k, missing)]
    return ", ".join(f"{k}={new.get(k, missing)!r} (saved: {saved.get(k, missing)!r})" for k in keys)


def _make_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlaxlmError(f"{workdir}: cannot create the workdir: {e.strerror or e}") from None


def _last_eval(metrics_path: pathlib.Path) -> dict[str, float]:
    """The eval metrics of the last row of metrics.jsonl that has them ({} when there is none)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    evals = [{k: v for k, v in row.items() if k.startswith("eval/")} for row in rows]
    return next((e for e in reversed(evals) if e), {})


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGTERM/SIGINT into a flag checked between steps (the step in flight completes)."""
    requested = []
    handlers = {}

    def request(signum, frame):
        requested.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, request)
    try:
        yield requested
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train(cfg: ExperimentConfig, workdir, *, progress: bool | None = None) -> dict[str, float]:
    """Train (or resume) the run of `cfg` in `workdir`; returns the last evaluation's metrics.

    Nothing in the workdir is written before the run has been built (data read, mesh made) and its latest
    checkpoint restored, so a bad config, data file or checkpoint leaves the workdir as it was.
    """
    workdir = pathlib.Path(workdir)
    _check_resumable(cfg, workdir)
    tokenizer_path = workdir / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.exists() else None
    run = build_run(cfg, tokenizer)
    _make_workdir(workdir)
    tc = cfg.train
    with Checkpointer(workdir, config=to_dict(cfg), tokenizer=run.task.tokenizer.to_json(),
                      max_to_keep=tc.keep_checkpoints, best_metric=tc.best_metric,
                      best_mode="max" if "accuracy" in tc.best_metric else "min") as checkpointer:
        state, data = run.state, run.task.train_iterator()
        if checkpointer.latest_step() is not None:
            state, data_state, _ = checkpointer.restore(state)
            data.set_state(data_state)
        save_config(cfg, workdir / "config.yaml")
        if tokenizer is None:
            run.task.tokenizer.save(tokenizer_path)
        if int(state.step) >= tc.steps:
            tqdm.write(f"{workdir}: already trained to step {int(state.step)} (train.steps={tc.steps})")
            return _last_eval(workdir / "metrics.jsonl")
        with MetricsLog(workdir) as log:
            last_eval = _train_loop(run, state, data, checkpointer, log,
                                    tc.progress if progress is None else progress)
    plot_loss_curve(log.path, workdir / "loss.png")
    return last_eval


def _train_loop(run: Run, state: TrainState, data, checkpointer: Checkpointer, log: MetricsLog,
                progress: bool) -> dict[str, float]:
    """Steps from state.step to train.steps (or a stop signal): log, evaluate and checkpoint on schedule."""
    tc = run.cfg.train
    start = int(state.step)
    last_eval: dict[str, float] = {}
    eval_at = None
    pending = []
    window_start, window_steps = time.perf_counter(), 0
    with tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step") as bar, \
            _stop_requests() as stop:
        for step in range(start + 1, tc.steps + 1):
            state, metrics = run.train_step(state, shard_batch(next(data), run.mesh))
            pending.append(metrics)
            window_steps += 1
            stopping = bool(stop)
            final = step == tc.steps or stopping
            if step % tc.log_every == 0 or final:
                fetched = jax.device_get(pending)
                step_time = (time.perf_counter() - window_start) / window_steps
                row = {
                    "train/loss": float(np.mean([m["loss"] for m in fetched])),
                    "lr": float(fetched[-1]["lr"]),
                    "train/grad_norm": float(fetched[-1]["grad_norm"]),
                    "train/skipped": float(fetched[-1]["skipped"]),
                    "perf/step_time_s": step_time,
                    "perf/tokens_per_s": run.task.tokens_per_batch / step_time,
                }
                if "accuracy" in fetched[-1]:
                    row["train/accuracy"] = float(np.mean([m["accuracy"] for m in fetched]))
                if any(m["nonfinite"] for m in fetched):
                    tqdm.write(f"step {step}: non-finite loss or gradient (policy {tc.nonfinite!r})")
                if step % tc.eval_every == 0 or final:
                    last_eval = {f"eval/{k}": v for k, v in
                                 evaluate(run, state.model, "valid", tc.eval_batches).items()}
                    eval_at = step
                    row.update(last_eval)
                log.log(step, row)
                bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")
                pending, window_start, window_steps = [], time.perf_counter(), 0
            bar.update(1)
            if step % tc.checkpoint_every == 0 or final:
                best = {tc.best_metric: last_eval[tc.best_metric]} if (
                    eval_at == step and tc.best_metric in last_eval) else None
                checkpointer.save(step, state, data_state=data.get_state(), metrics=best)
            if stopping:
                tqdm.write(f"{stop[0]} received: saved a checkpoint at step {step}; rerun to resume")
                break
    return last_eval
