"""Kill anywhere: `flaxlm train` killed with SIGKILL at random moments (some while a checkpoint is being written)
or stopped with SIGTERM or Ctrl-C (SIGINT, sent while a checkpoint is being written), and restarted with the same
command until it finishes, logs the same per-step losses as an uninterrupted run.

Every run is a subprocess of `python -m flaxlm train` on a tiny GPT (with dropout, so the RNG must resume too)
over the embedded default corpus. The subprocesses share a persistent JAX compilation cache in the session's
temporary directory: only the first one compiles.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40
CONFIG = f"""\
task: lm
model: {{n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.1}}
data: {{train: default, tokenizer: char, batch_size: 4, block_size: 16, eval_batch_size: 16}}
optim: {{name: adamw, learning_rate: 1.0e-3}}
train: {{steps: {STEPS}, log_every: 1, eval_every: 10, eval_batches: 2, checkpoint_every: 5, keep_checkpoints: 2}}
"""
START_TIMEOUT_S = 300  # a cold start compiles; a busy 2-core machine is slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the training subprocesses: a compilation cache shared by the whole session."""
    cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


class Launch:
    """One `flaxlm train` subprocess on `workdir`, with helpers to watch its progress."""

    def __init__(self, config, workdir: pathlib.Path, env):
        self.workdir = workdir
        self.metrics = workdir / "metrics.jsonl"
        self.offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        self.resumable_from = finalized_steps(workdir)[-1:] or [0]
        self.log = workdir.parent / f"{workdir.name}.log"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flaxlm", "train", str(config), "--workdir", str(workdir), "--no-progress"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def new_rows(self) -> list[dict]:
        """Complete metrics rows this process has written."""
        if not self.metrics.exists():
            return []
        with open(self.metrics, "rb") as f:
            f.seek(self.offset)
            lines = f.read().split(b"\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, condition, what: str):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"training ended (rc {self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.002)

    def finish(self, timeout=START_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text()[-3000:]


def finalized_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def tmp_checkpoints(workdir: pathlib.Path) -> list[str]:
    directory = workdir / "checkpoints"
    return [p.name for p in directory.glob("*.orbax-checkpoint-tmp*")] if directory.is_dir() else []


def losses_by_step(workdir: pathlib.Path, key: str = "train/loss") -> dict[int, float]:
    """The LAST logged value of `key` for each step (a resumed run rewrites the steps after its checkpoint)."""
    values = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by SIGKILL
            continue
        values[row["step"]] = row.get(key)
    return values


def interrupt(config, workdir, env, action: str, rng: random.Random) -> dict:
    """Start training, interrupt it as `action` says, and describe what happened.

    'kill': SIGKILL at a random moment 1-12 steps into the run (mid-step, mid-eval or mid-checkpoint, by
    chance); 'kill-in-checkpoint': SIGKILL as soon as a temporary checkpoint directory appears (once the
    run is stepping, so the last run's leftover has been cleaned up); 'term': SIGTERM 1-12 steps in;
    'int-in-checkpoint': SIGINT (Ctrl-C) while a checkpoint is being written.
    """
    launch = Launch(config, workdir, env)
    event = {"action": action, "resumed_from": launch.resumable_from[0]}
    if action.endswith("-in-checkpoint"):
        launch.wait_for(lambda: launch.new_rows(), "the first step")
        launch.wait_for(lambda: tmp_checkpoints(workdir), "a checkpoint write")
    else:
        target = rng.randint(1, min(12, STEPS - event["resumed_from"] - 1))
        launch.wait_for(lambda: len(launch.new_rows()) >= target, f"{target} new steps")
        time.sleep(rng.uniform(0.0, 0.02))
    launch.proc.send_signal({"term": signal.SIGTERM, "int-in-checkpoint": signal.SIGINT}.get(action, signal.SIGKILL))
    event["rc"] = launch.finish()
    rows = launch.new_rows()
    event["first_step"] = rows[0]["step"] if rows else None
    event["last_step"] = rows[-1]["step"] if rows else None
    event["left_tmp"] = tmp_checkpoints(workdir)
    event["finalized"] = finalized_steps(workdir)
    event["output"] = launch.output()
    return event


def run_to_completion(config, workdir, env) -> dict:
    launch = Launch(config, workdir, env)
    rc = launch.finish()
    assert rc == 0, launch.output()
    rows = launch.new_rows()
    return {"action": "finish", "resumed_from": launch.resumable_from[0], "first_step": rows[0]["step"]}


@pytest.fixture(scope="module")
def reference(config, env, tmp_path_factory):
    """(workdir, per-step train losses, per-step eval losses) of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run_to_completion(config, workdir, env)
    return workdir, losses_by_step(workdir), losses_by_step(workdir, "eval/loss")


def check_chain(config, env, workdir, plan, reference, seed):
    """Interrupt a run once per action in `plan`, finish it, and compare its losses with the reference."""
    rng = random.Random(seed)
    events = [interrupt(config, workdir, env, action, rng) for action in plan]
    events.append(run_to_completion(config, workdir, env))
    story = "\n".join(f"{e['action']}: resumed from {e['resumed_from']}, first step {e['first_step']}, "
                      f"last step {e.get('last_step')}, rc {e.get('rc')}, left {e.get('left_tmp')}" for e in events)

    for event in events:
        # Every launch resumed from the last finalized checkpoint (never a half-written one).
        assert event["first_step"] is None or event["first_step"] == event["resumed_from"] + 1, story
    for event in events[:-1]:
        if event["action"].startswith("kill"):
            assert event["rc"] == -signal.SIGKILL, story
        else:  # SIGTERM or SIGINT: a clean exit with a complete checkpoint of the step it was on.
            assert event["rc"] == 0, event["output"]
            name = "SIGTERM" if event["action"] == "term" else "SIGINT"
            assert f"{name} received: saved a checkpoint" in event["output"], event["output"]
            assert event["finalized"][-1] == event["last_step"] and not event["left_tmp"], story
    assert any(e["left_tmp"] for e in events if e["action"] == "kill-in-checkpoint"), (
        f"no SIGKILL landed while a checkpoint was being written:\n{story}")

    _, want_train, want_eval = reference
    got_train, got_eval = losses_by_step(workdir), losses_by_step(workdir, "eval/loss")
    assert sorted(got_train) == list(range(1, STEPS + 1)), story
    for step in range(1, STEPS + 1):
        assert got_train[step] == pytest.approx(want_train[step], abs=1e-6, rel=0), f"step {step}\n{story}"
        if step % 10 == 0:
            assert got_eval[step] == pytest.approx(want_eval[step], abs=1e-6, rel=0), f"eval {step}\n{story}"
    redone = [e["last_step"] - n["resumed_from"] for e, n in zip(events, events[1:]) if e["last_step"] is not None]
    print(f"\n{len(events) - 1} interruptions ({sum(e['action'].startswith('kill') for e in events)} SIGKILL, "
          f"{sum(bool(e.get('left_tmp')) for e in events)} of them mid-checkpoint); all {STEPS} steps equal to the "
          f"uninterrupted run; steps recomputed after a restart: max {max(redone)}, total {sum(redone)}\n{story}")


def test_sigkill_anywhere_and_sigterm_resume_exactly(config, env, reference, tmp_path):
    """Three SIGKILLs (one while a checkpoint is written), a SIGTERM and a Ctrl-C (while a checkpoint is written),
    then a run to the end."""
    plan = ["kill", "kill-in-checkpoint", "kill", "term", "int-in-checkpoint"]
    check_chain(config, env, tmp_path / "run", plan, reference, seed=0)


def test_rerun_of_a_finished_run_reports_its_result(config, env, reference):
    """Training again in a finished workdir prints the final evaluation and changes nothing."""
    workdir, _, want_eval = reference
    before = (workdir / "metrics.jsonl").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "flaxlm", "train", str(config), "--workdir", str(workdir), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["eval/loss"] == want_eval[STEPS]
    assert (workdir / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_twenty_sigkills(config, env, reference, tmp_path):
    """The full harness: 20 SIGKILLs at random moments, every third while a checkpoint is being written."""
    plan = ["kill-in-checkpoint" if i % 3 == 1 else "kill" for i in range(20)]
    check_chain(config, env, tmp_path / "run", plan, reference, seed=1)
