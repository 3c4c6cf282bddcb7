"""Numerical faults in `flaxlm train`: a NaN loss/gradient is reported with its step number; `train.nonfinite: skip`
leaves the state unchanged and counts the skip, `stop` saves that last good state and exits non-zero; a loss spike
is warned about and counted in metrics.jsonl.

Faults are injected by wrapping the trainer's train step: the batch of a chosen step carries a factor that
multiplies the loss (NaN for a non-finite step, 10 for a spike), so the loss and every gradient of that step are
hit exactly as a poisoned batch would hit them.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from flaxlm import cli, trainer
from flaxlm.checkpoint import Checkpointer
from flaxlm.errors import ConfigError
from flaxlm.experiment import load_experiment
from flaxlm.metrics_log import read_metrics

CONFIG = """\
task: lm
model: {n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.0}
data: {train: default, tokenizer: char, batch_size: 4, block_size: 16, eval_batch_size: 16}
optim: {name: adamw, learning_rate: 1.0e-3}
train: {steps: 14, log_every: 1, eval_every: 100, eval_batches: 1, checkpoint_every: 2, keep_checkpoints: 3,
        progress: false}
"""


@pytest.fixture
def config(tmp_path) -> pathlib.Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def inject(monkeypatch, factors: dict[int, float]) -> None:
    """Multiply the loss of step n (1-based) by factors[n] in every train step the trainer builds."""
    make_train_step = trainer.make_train_step

    def make(loss_fn, **options):
        def scaled_loss(model, batch, dropout_key):
            batch = dict(batch)
            factor = batch.pop("loss_factor")[0]
            loss_sum, aux = loss_fn(model, batch, dropout_key)
            return loss_sum * factor, aux

        step = make_train_step(scaled_loss, **options)

        def train_step(state, batch):
            factor = factors.get(int(state.step) + 1, 1.0)
            rows = batch["inputs"].shape[0]
            return step(state, {**batch, "loss_factor": np.full((rows,), factor, np.float32)})

        return train_step

    monkeypatch.setattr(trainer, "make_train_step", make)


def restore(config: pathlib.Path, workdir: pathlib.Path, step: int):
    run = trainer.build_run(load_experiment(config))
    with Checkpointer(workdir, read_only=True) as checkpointer:
        state, _, _ = checkpointer.restore(run.state, step=step)
    return state


def test_skip_counts_nonfinite_steps_and_spikes_are_logged(config, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {12: 10.0, 13: np.nan})
    workdir = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(workdir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("flaxlm: warning: step 12: loss spike: ") and "x the median" in err[0]
    assert err[1] == ("flaxlm: warning: step 13: non-finite loss or gradient; the update was skipped "
                      "(train.nonfinite='skip'; 1 skipped so far)")
    rows = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}
    assert [rows[s]["train/spikes"] for s in range(1, 15)] == [0.0] * 11 + [1.0, 0.0, 0.0]
    assert rows[12]["train/loss"] > 3 * np.median([rows[s]["train/loss"] for s in range(2, 12)])
    assert rows[13]["train/loss"] is None and rows[13]["train/skipped"] == 1.0
    assert rows[12]["train/skipped"] == 0.0 and rows[14]["train/skipped"] == 1.0
    state = restore(config, workdir, 14)
    assert int(state.step) == 14 and int(state.skipped) == 1


def test_stop_saves_the_last_good_state_and_exits_nonzero(config, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {3: np.inf})
    workdir = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(workdir), "train.nonfinite=stop"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("flaxlm: error: step 3: non-finite loss or gradient (loss=inf")
    assert f"this last good state is saved as checkpoint 3 in {workdir / 'checkpoints'}" in err
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [1, 2, 3]
    good, stopped = restore(config, workdir, 2), restore(config, workdir, 3)
    # The bad step changed nothing but the counters: same parameters and optimizer state as after step 2.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((stopped.params, stopped.opt_state)),
                 jax.device_get((good.params, good.opt_state)))
    assert (int(stopped.step), int(stopped.skipped)) == (3, 1)
    # Rerunning goes on after the bad batch.
    monkeypatch.undo()
    assert cli.main(["train", str(config), "--workdir", str(workdir), "train.nonfinite=stop", "train.steps=5"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["eval/loss"] > 0
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("override, needle", [
    ("train.nonfinite=raise", "train.nonfinite: expected one of 'skip', 'stop', 'ignore', got str 'raise'"),
    ("train.on_write_error=retry", "train.on_write_error: expected one of 'stop', 'continue', got str 'retry'"),
    ("train.spike_factor=0.5", "train.spike_factor: must be > 1 or null"),
])
def test_fault_policies_are_validated(config, override, needle):
    with pytest.raises(ConfigError) as info:
        load_experiment(config, [override])
    assert needle in str(info.value)


def test_spike_detection_needs_history_and_ignores_nonfinite_losses():
    from collections import deque

    recent = deque(maxlen=trainer.SPIKE_WINDOW)
    losses = [(s, 1.0) for s in range(1, 10)] + [(10, 50.0), (11, float("nan"))] + [(s, 1.0) for s in range(12, 14)]
    assert trainer._spikes(losses, recent, 3.0) == []  # 9 losses before step 10: too few to judge
    assert trainer._spikes([(14, 3.5), (15, 2.9)], recent, 3.0) == [(14, 3.5, 1.0)]
    assert trainer._spikes([(16, 100.0)], recent, None) == []
