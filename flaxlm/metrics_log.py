"""Where a run's metrics go: `metrics.jsonl` (one JSON object per log/eval step), TensorBoard events, a PNG.

Appending never rewrites what is already in the workdir: a resumed run adds lines after the old ones.
Every write happens in the calling thread and a failed one (full disk, read-only directory) raises a
one-line `MetricsError` naming the file; the log stays usable, so the caller decides whether to stop or to
go on (`train.on_write_error`). The next row after a failed one starts on a new line, and TensorBoard
events go to a new event file, so a half-written row or record never corrupts the ones after it.
"""

import contextlib
import itertools
import json
import math
import os
import pathlib
import time

from flaxlm.errors import FlaxlmError


class MetricsError(FlaxlmError):
    """A metrics file cannot be written; `kind` is 'metrics', 'tensorboard' or 'plot'."""

    def __init__(self, message: str, kind: str):
        self.kind = kind
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.kind)


class MetricsLog:
    """Append-only metrics of one workdir: `log(step, {name: float})` writes a JSONL line and TB scalars.

    `write_row` and `write_scalars` do the two halves separately. A context manager (closing the file and
    the TensorBoard event file).
    A resumed run's rows for steps after its checkpoint repeat earlier steps: the last row of a step is the
    one that counts.
    """

    def __init__(self, workdir: pathlib.Path, tensorboard: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.tensorboard_dir = workdir / "tensorboard" if tensorboard else None
        try:
            self._new_line = _ends_mid_line(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise MetricsError(f"{self.path}: cannot write metrics: {e.strerror or e}", "metrics") from None
        self._events = None
        self._event_files = itertools.count()
        if self.tensorboard_dir is not None:
            try:
                self._open_events()
            except MetricsError:
                os.close(self._fd)
                raise

    def log(self, step: int, values: dict[str, float]) -> None:
        """`write_row` then `write_scalars`; the first error is raised after both were tried."""
        errors = []
        for write in (self.write_row, self.write_scalars):
            try:
                write(step, values)
            except MetricsError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def write_row(self, step: int, values: dict[str, float]) -> None:
        """Append one JSON line `{"step": step, **values}` (non-finite values as null)."""
        row = {"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}}
        data = (("\n" if self._new_line else "") + json.dumps(row) + "\n").encode("utf-8")
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            if written:
                self._new_line = data[written - 1:written] != b"\n"
            raise MetricsError(f"{self.path}: cannot write metrics: {e.strerror or e}", "metrics") from None
        self._new_line = False

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write the finite values as TensorBoard scalars of `step` (one event, flushed)."""
        if self.tensorboard_dir is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        scalars = [Summary.Value(tag=name, simple_value=float(value)) for name, value in values.items()
                   if value is not None and math.isfinite(value)]
        try:
            if self._events is None:
                self._open_events()
            self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars)))
            self._events.flush()
        except OSError as e:
            self._drop_events()
            raise MetricsError(f"{self.tensorboard_dir}: cannot write TensorBoard events: {e.strerror or e}",
                               "tensorboard") from None

    def _open_events(self) -> None:
        """A new event file (a unique name: a failed file is never appended to, nor another run's replaced)."""
        from tensorboardX.event_file_writer import EventsWriter

        suffix = f".{os.getpid()}.{next(self._event_files)}"
        try:
            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(str(self.tensorboard_dir / "events"), suffix)
        except OSError as e:
            self._drop_events()
            raise MetricsError(f"{self.tensorboard_dir}: cannot write TensorBoard events: {e.strerror or e}",
                               "tensorboard") from None

    def _drop_events(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            try:
                events.close()
            except OSError:
                pass  # the error that made us drop it was already reported

    def close(self) -> None:
        """Close both files; a failed final flush of the event file raises MetricsError."""
        os.close(self._fd)
        events, self._events = self._events, None
        if events is not None:
            try:
                events.close()
            except OSError as e:
                raise MetricsError(f"{self.tensorboard_dir}: cannot write TensorBoard events: {e.strerror or e}",
                                   "tensorboard") from None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except MetricsError:
            if exc_type is None:
                raise  # otherwise the error already on its way out is the one to report


def _ends_mid_line(path: pathlib.Path) -> bool:
    """Whether `path` ends in a line cut short (a killed run): the next row must start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The rows of a metrics.jsonl file (unparseable lines, cut short by a killed run or a full disk, are skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(metrics_path: pathlib.Path, png_path: pathlib.Path) -> None:
    """Write train/eval loss against step as a PNG, atomically (MetricsError naming `png_path` on failure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
        points = sorted({r["step"]: r[key] for r in rows if r.get(key) is not None}.items())
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, png_path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MetricsError(f"{png_path}: cannot write the loss curve: {e.strerror or e}", "plot") from None
    finally:
        plt.close(fig)
