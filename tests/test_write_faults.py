"""Full disk and unwritable workdirs: every failed checkpoint, metrics.jsonl, TensorBoard or loss.png write is ONE
line naming the path, the checkpoints already written stay complete and loadable, and `train.on_write_error`
decides whether training stops (exit status 2) or goes on (one warning per kind of file, retrying at the next
scheduled write).

A full disk is simulated portably with RLIMIT_FSIZE in a `flaxlm train` subprocess: once the limit is set,
writes past it fail with EFBIG ("File too large") in Python and in Orbax's tensorstore alike, as a full disk
fails them with ENOSPC. chmod-based tests skip as root (root ignores permissions); the RLIMIT ones do not.
"""

import errno
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import pytest

from flaxlm import cli
from flaxlm.metrics_log import MetricsError, MetricsLog, plot_loss_curve, read_metrics

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE (the full-disk simulation) needs POSIX")

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
CONFIG = f"""\
task: lm
model: {{n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.1}}
data: {{train: default, tokenizer: char, batch_size: 4, block_size: 16, eval_batch_size: 16}}
optim: {{name: adamw, learning_rate: 1.0e-3}}
train: {{steps: {STEPS}, log_every: 1, eval_every: 4, eval_batches: 2, checkpoint_every: 2, keep_checkpoints: 2,
         progress: false}}
"""
# `flaxlm train` whose disk fills before the metrics row of step FULL_AT (0: before anything is written; once
# the checkpoints being written are complete, so which ones fail is deterministic) and is freed before the row
# of step FREE_AT: files may not grow past LIMIT bytes in between.
FAULTY_TRAIN = textwrap.dedent("""\
    import resource, signal, sys, time
    from flaxlm import cli, metrics_log
    full_at, free_at, limit = (int(a) for a in sys.argv[1:4])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    write_row = metrics_log.MetricsLog.write_row
    def disk(self, step, values):
        if step == full_at:
            while any(self.path.parent.glob("checkpoints/*.orbax-checkpoint-tmp*")):
                time.sleep(0.01)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        if step == free_at:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return write_row(self, step, values)
    metrics_log.MetricsLog.write_row = disk
    if full_at == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    sys.exit(cli.main(sys.argv[4:]))
""")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def faulty_train(config, workdir, env, *, full_at, limit, free_at=10**9, overrides=()):
    """Run `flaxlm train` with a disk that fills at step `full_at`; returns (exit status, stdout, stderr)."""
    argv = [str(full_at), str(free_at), str(limit), "train", str(config), "--workdir", str(workdir),
            "--no-progress", *overrides]
    result = subprocess.run([sys.executable, "-c", FAULTY_TRAIN, *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def finalized_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def tensorboard_steps(directory: pathlib.Path) -> set[int]:
    """Steps with scalars in every event file; a record cut short by the full disk ends that file's reading."""
    from tensorboardX.proto.event_pb2 import Event

    steps = set()
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            if offset + 16 + length > len(data):
                break
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.summary.value:
                steps.add(event.step)
    return steps


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxlm: error: "), stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind, limit, where", [
    ("checkpoint", 16 * 1024, "checkpoints"),  # the arrays no longer fit; metrics rows still do
    ("metrics", 100, "metrics.jsonl"),  # nothing fits
])
def test_full_disk_stops_with_one_error_and_intact_checkpoints(kind, limit, where, config, env, tmp_path):
    workdir = tmp_path / "run"
    rc, out, err = faulty_train(config, workdir, env, full_at=5, limit=limit)
    assert rc == 2, err[-3000:]
    line = one_error_line(err)
    assert str(workdir / where) in line and "File too large" in line
    assert "Traceback" not in out + err
    # Nothing was written after the failure: no checkpoint after step 4 and, for the metrics, no row after step 4
    # (a checkpoint written in the background fails a step or two before the next check notices).
    rows = [r["step"] for r in read_metrics(workdir / "metrics.jsonl")]
    assert rows == [1, 2, 3, 4] if kind == "metrics" else rows in ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8])
    assert finalized_steps(workdir) == [2, 4]
    # The same command, the disk freed, restores the latest checkpoint and trains to the end.
    rc, out, err = faulty_train(config, workdir, env, full_at=10**9, limit=0)
    assert rc == 0 and not err, err[-3000:]
    assert finalized_steps(workdir) == [STEPS - 2, STEPS]
    assert {r["step"] for r in read_metrics(workdir / "metrics.jsonl")} == set(range(1, STEPS + 1))


def test_full_disk_continue_warns_once_per_kind_and_retries(config, env, tmp_path):
    workdir = tmp_path / "run"
    rc, out, err = faulty_train(config, workdir, env, full_at=5, free_at=9, limit=100,
                                overrides=["train.on_write_error=continue"])
    assert rc == 0, err[-3000:]
    assert "Traceback" not in out + err
    warnings = err.strip().splitlines()
    assert len(warnings) == 3, err
    for where in ("checkpoints", "metrics.jsonl", "tensorboard"):
        [line] = [w for w in warnings if f"{workdir / where}:" in w]
        assert line.startswith("flaxlm: warning: ") and "File too large" in line and "on_write_error=continue" in line
    # Steps 5-8 had a full disk: their rows and checkpoints are missing, everything else is there and whole.
    expected = {1, 2, 3, 4, 9, 10, 11, 12}
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == sorted(expected)
    assert all(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
    assert tensorboard_steps(workdir / "tensorboard") == expected
    assert finalized_steps(workdir) == [10, 12]
    assert json.loads(out.splitlines()[-1])["eval/loss"] > 0
    assert (workdir / "loss.png").exists()


def test_final_checkpoint_that_cannot_be_written_is_an_error_even_with_continue(config, env, tmp_path):
    workdir = tmp_path / "run"
    rc, _, err = faulty_train(config, workdir, env, full_at=STEPS, limit=16 * 1024,
                              overrides=["train.on_write_error=continue"])
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("flaxlm: error: ") and str(workdir / "checkpoints") in line
    assert f"training reached step {STEPS} but its checkpoint could not be written" in line
    assert f"the latest checkpoint on disk is step {STEPS - 2}" in line
    assert finalized_steps(workdir) == [STEPS - 4, STEPS - 2]


def test_full_disk_at_start_is_one_error_and_no_training(config, env, tmp_path):
    workdir = tmp_path / "run"
    rc, out, err = faulty_train(config, workdir, env, full_at=0, limit=0)
    assert rc == 2
    line = one_error_line(err)
    assert str(workdir / "config.yaml") in line and "File too large" in line
    assert not (workdir / "metrics.jsonl").exists() and finalized_steps(workdir) == []


def test_workdir_that_cannot_be_created_names_it(config, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for workdir in (blocker, blocker / "run"):
        assert cli.main(["train", str(config), "--workdir", str(workdir), "--no-progress"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(workdir) in line


def test_read_only_workdir_names_it_and_keeps_checkpoints(config, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop writes (the RLIMIT_FSIZE tests cover this)")
    workdir = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(workdir), "--no-progress", "train.steps=2"]) == 0
    capsys.readouterr()
    workdir.chmod(0o555)
    (workdir / "checkpoints").chmod(0o555)
    try:
        assert cli.main(["train", str(config), "--workdir", str(workdir), "--no-progress", "train.steps=4"]) == 2
        assert str(workdir) in one_error_line(capsys.readouterr().err)
        assert finalized_steps(workdir) == [2]
        assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    finally:
        (workdir / "checkpoints").chmod(0o755)
        workdir.chmod(0o755)


# ------------------------------------------------------------------------------- the metrics log on its own


class FullDiskOs:
    """The `os` module, except that `write` stores `room` more bytes and then fails with ENOSPC."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, data[:self.room])
        self.room -= written
        return written


def test_metrics_row_cut_short_by_a_full_disk_does_not_corrupt_the_next(tmp_path, monkeypatch):
    import flaxlm.metrics_log as metrics_log

    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.write_row(1, {"train/loss": 2.0})
        monkeypatch.setattr(metrics_log, "os", FullDiskOs(room=10))
        with pytest.raises(MetricsError, match="metrics.jsonl: cannot write metrics: No space left") as info:
            log.write_row(2, {"train/loss": 1.5})
        assert info.value.kind == "metrics" and str(tmp_path / "metrics.jsonl") in str(info.value)
        monkeypatch.setattr(metrics_log, "os", os)
        log.write_row(3, {"train/loss": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.splitlines()[1] == '{"step": 2'  # the 10 bytes that fitted
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 2.0}, {"step": 3, "train/loss": 1.0}]


def test_tensorboard_write_failure_moves_to_a_new_event_file(tmp_path, monkeypatch):
    from tensorboardX.event_file_writer import EventsWriter

    with MetricsLog(tmp_path) as log:
        log.write_scalars(1, {"train/loss": 2.0})

        def full(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as patch:
            patch.setattr(EventsWriter, "flush", full)
            with pytest.raises(MetricsError, match="tensorboard: cannot write TensorBoard events: No space left"):
                log.write_scalars(2, {"train/loss": 1.5})
        log.write_scalars(3, {"train/loss": 1.0, "eval/loss": float("nan")})
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_steps(tmp_path / "tensorboard") >= {1, 3}


def test_unwritable_metrics_and_plot_paths_are_metrics_errors(tmp_path):
    with pytest.raises(MetricsError, match=f"{tmp_path / 'missing' / 'metrics.jsonl'}: cannot write metrics"):
        MetricsLog(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    with pytest.raises(MetricsError, match=f"{tmp_path / 'missing' / 'loss.png'}: cannot write the loss curve"):
        plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "missing" / "loss.png")
    assert not list(tmp_path.glob(".*.tmp"))
