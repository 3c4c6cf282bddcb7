"""The training loop behind `flaxlm train`: progress bar, evaluation, checkpoints, resume, pre-emption.

    result = train(load_experiment("configs/char_gpt_cpu.yaml"), "runs/char")

A workdir holds everything about a run: `config.yaml` (resolved), `tokenizer.json`, `checkpoints/`,
`metrics.jsonl`, `tensorboard/` and `loss.png`. Running the same command again resumes from the last
complete checkpoint: same batches (the data iterator state is checkpointed) and same dropout keys (the
RNG is part of the state), so the losses continue exactly as an uninterrupted run. SIGTERM (pre-emption)
and SIGINT (Ctrl-C) finish the current step, save a checkpoint and return.

Faults during training follow the config (`TrainConfig`):

- A NaN/Inf loss or gradient is reported with its step number. `train.nonfinite: skip` leaves the
  parameters and optimizer state unchanged and counts the step in `train/skipped`; `stop` does the same,
  saves a checkpoint of that last good state (at the step number of the bad batch, so a resumed run goes
  on after it) and raises FloatingPointError naming the step; `ignore` applies the update.
- A loss above `train.spike_factor` times the median of the previous 100 step losses is a spike: one
  warning line per log row names the steps, and the row's `train/spikes` counts them.
- A checkpoint, metrics.jsonl, TensorBoard or loss.png write that fails (full disk, read-only directory)
  raises one CheckpointError/MetricsError naming the path under `train.on_write_error: stop`, once the
  checkpoints already written are complete. Under `continue` it is one warning per kind of file and the
  next scheduled write tries again; a run whose final checkpoint could not be written still ends with an
  error. A workdir that cannot be written when training starts is always an error.
"""

import collections
import contextlib
import dataclasses
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from flaxlm.checkpoint import CheckpointError, Checkpointer
from flaxlm.config import load_config, save_config, to_dict
from flaxlm.data.tokenizers import load_tokenizer
from flaxlm.errors import ConfigError, FlaxlmError
from flaxlm.evaluation import perplexity
from flaxlm.experiment import ExperimentConfig
from flaxlm.metrics_log import MetricsError, MetricsLog, plot_loss_curve, read_metrics
from flaxlm.tasks import build_task
from flaxlm.train.optimizers import make_optimizer
from flaxlm.train.sharding import make_mesh, shard_batch, shard_state
from flaxlm.train.state import TrainState
from flaxlm.train.step import make_eval_step, make_train_step

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
SPIKE_WINDOW = 100  # steps whose median loss a new step's loss is compared with
SPIKE_MIN_STEPS = 10  # no spike detection before this many finite losses


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
                                 compute_dtype=dtype, dot_backend=cfg.train.dot_backend,
                                 nonfinite="skip" if cfg.train.nonfinite == "stop" else cfg.train.nonfinite)
    eval_step = make_eval_step(task.loss_fn, mesh=mesh, compute_dtype=dtype, dot_backend=cfg.train.dot_backend)
    return Run(cfg, task, mesh, state, train_step, eval_step)


def evaluate(run: Run, model, split: str, max_batches: int | None = None) -> dict[str, float]:
    """Loss (and accuracy where defined) over a whole split: sums of losses and counts, divided once."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(run.task.eval_iterator(split)):
        if max_batches is not None and i >= max_batches:
            break
        metrics = run.eval_step(model, shard_batch(batch, run.mesh))
        for key in ("loss_sum", "tokens", "correct", "nll"):
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + float(metrics[key])
    if not totals.get("tokens"):
        raise FlaxlmError(f"the {split!r} split has no examples to evaluate")
    out = {"loss": totals["loss_sum"] / totals["tokens"]}
    if "correct" in totals:
        out["accuracy"] = totals["correct"] / totals["tokens"]
    if "nll" in totals:
        out["perplexity"] = perplexity(totals["nll"] / totals["tokens"])
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
    writes = _WriteFaults(tc.on_write_error)
    with Checkpointer(workdir, config=to_dict(cfg), tokenizer=run.task.tokenizer.to_json(),
                      max_to_keep=tc.keep_checkpoints, best_metric=tc.best_metric,
                      best_mode=tc.best_mode) as checkpointer:
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
            last_eval, last_step = _train_loop(run, state, data, checkpointer, log, writes,
                                               tc.progress if progress is None else progress)
        _finish_checkpoints(checkpointer, writes, last_step)
    writes.attempt("plot", plot_loss_curve, log.path, workdir / "loss.png")
    return last_eval


class _WriteFaults:
    """Applies `train.on_write_error` to the run's writes: 'stop' raises the error, 'continue' warns once per kind."""

    def __init__(self, policy: str):
        self.policy = policy
        self.failures: collections.Counter[str] = collections.Counter()

    def attempt(self, kind: str, write, *args, **kwargs) -> bool:
        """Call `write(*args, **kwargs)`; returns whether it succeeded (under 'continue')."""
        try:
            write(*args, **kwargs)
            return True
        except (CheckpointError, MetricsError) as e:
            if self.policy == "stop":
                raise
            if not self.failures[kind]:
                _warn(f"{e} (train.on_write_error=continue: training goes on and the next scheduled {kind} write "
                      f"tries again; further {kind} failures are not reported)")
            self.failures[kind] += 1
            return False


def _finish_checkpoints(checkpointer: Checkpointer, writes: _WriteFaults, last_step: int) -> None:
    """Wait for the last checkpoint; one that could not be written is an error under either write policy."""
    if writes.attempt("checkpoint", checkpointer.wait_until_finished) and checkpointer.latest_step() == last_step:
        return
    raise CheckpointError(
        f"{checkpointer.directory}: training reached step {last_step} but its checkpoint could not be written "
        f"({writes.failures['checkpoint']} checkpoint writes failed); the latest checkpoint on disk is step "
        f"{checkpointer.latest_step()}")


def _warn(message: str) -> None:
    """One line `flaxlm: warning: ...` on stderr (above the progress bar)."""
    tqdm.write(f"flaxlm: warning: {message}", file=sys.stderr)


def _step_list(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:5])
    more = f" and {len(steps) - 5} more" if len(steps) > 5 else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _spikes(losses: list[tuple[int, float]], recent: collections.deque, factor: float | None) -> list[tuple]:
    """(step, loss, running median) of each loss above `factor` x the median of the losses before it."""
    found = []
    for step, loss in losses:
        if not np.isfinite(loss):
            continue
        if factor is not None and len(recent) >= SPIKE_MIN_STEPS:
            median = float(np.median(recent))
            if loss > factor * median:
                found.append((step, loss, median))
        recent.append(loss)
    return found


def _train_loop(run: Run, state: TrainState, data, checkpointer: Checkpointer, log: MetricsLog,
                writes: _WriteFaults, progress: bool) -> tuple[dict[str, float], int]:
    """Steps from state.step to train.steps (or a stop): log, evaluate and checkpoint on schedule.

    Returns the last evaluation's metrics and the last step taken.
    """
    tc = run.cfg.train
    start = int(state.step)
    last_eval: dict[str, float] = {}
    eval_at = None
    pending = []
    recent = collections.deque(maxlen=SPIKE_WINDOW)
    window_start, window_steps = time.perf_counter(), 0
    step = start
    with tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step") as bar, \
            _stop_requests() as stop:
        for step in range(start + 1, tc.steps + 1):
            state, metrics = run.train_step(state, shard_batch(next(data), run.mesh))
            pending.append(metrics)
            window_steps += 1
            bad_step = tc.nonfinite == "stop" and bool(jax.device_get(metrics["nonfinite"]))
            stopping = bool(stop) or bad_step  # read once: a signal arriving later in this step stops the next one
            final = step == tc.steps or stopping
            if step % tc.log_every == 0 or step % tc.eval_every == 0 or final:  # an evaluation gets its row
                fetched = jax.device_get(pending)
                steps = range(step - len(fetched) + 1, step + 1)
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
                nonfinite = [s for s, m in zip(steps, fetched) if m["nonfinite"]]
                if nonfinite and not bad_step:  # under 'stop' the error below reports it
                    action = "applied anyway" if tc.nonfinite == "ignore" else "skipped"
                    _warn(f"{_step_list(nonfinite)}: non-finite loss or gradient; the update was {action} "
                          f"(train.nonfinite={tc.nonfinite!r}; {int(row['train/skipped'])} skipped so far)")
                if tc.spike_factor is not None:
                    spikes = _spikes([(s, float(m["loss"])) for s, m in zip(steps, fetched)], recent, tc.spike_factor)
                    row["train/spikes"] = float(len(spikes))
                    if spikes:
                        worst = max(spikes, key=lambda x: x[1] / x[2])
                        _warn(f"{_step_list([s[0] for s in spikes])}: loss spike: {worst[1]:.4g} at step {worst[0]} "
                              f"is {worst[1] / worst[2]:.1f}x the median {worst[2]:.4g} of the previous steps "
                              f"(train.spike_factor={tc.spike_factor})")
                if step % tc.eval_every == 0 or final:
                    last_eval = {f"eval/{k}": v for k, v in
                                 evaluate(run, state.model, "valid", tc.eval_batches).items()}
                    eval_at = step
                    row.update(last_eval)
                writes.attempt("metrics", log.write_row, step, row)
                writes.attempt("tensorboard", log.write_scalars, step, row)
                writes.attempt("checkpoint", checkpointer.check_for_errors)
                bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")
                pending, window_start, window_steps = [], time.perf_counter(), 0
            bar.update(1)
            if step % tc.checkpoint_every == 0 or final:
                best = {tc.best_metric: last_eval[tc.best_metric]} if (
                    eval_at == step and tc.best_metric in last_eval) else None
                writes.attempt("checkpoint", checkpointer.wait_until_finished)
                writes.attempt("checkpoint", checkpointer.save, step, state, data_state=data.get_state(),
                               metrics=best)
            if bad_step:
                _finish_checkpoints(checkpointer, writes, step)
                m = jax.device_get(metrics)
                raise FloatingPointError(
                    f"step {step}: non-finite loss or gradient (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); train.nonfinite='stop': the update was not applied and "
                    f"this last good state is saved as checkpoint {step} in {checkpointer.directory}")
            if stopping:
                _finish_checkpoints(checkpointer, writes, step)
                tqdm.write(f"{stop[0]} received: saved a checkpoint at step {step}; rerun to resume")
                break
    return last_eval, step
