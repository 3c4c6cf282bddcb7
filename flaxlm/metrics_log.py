"""Where a run's metrics go: `metrics.jsonl` (one JSON object per log/eval step), TensorBoard events, a PNG.

Appending never rewrites what is already in the workdir: a resumed run adds lines after the old ones.
"""

import json
import math
import pathlib

from flaxlm.errors import FlaxlmError


class MetricsLog:
    """Append-only metrics of one workdir: `log(step, {name: float})` writes a JSONL line and TB scalars.

    A context manager (closing the file and the TensorBoard writer). A resumed run's rows for steps after
    its checkpoint repeat earlier steps: the last row of a step is the one that counts.
    """

    def __init__(self, workdir: pathlib.Path, tensorboard: bool = True):
        self.path = workdir / "metrics.jsonl"
        try:
            cut_short = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if cut_short:
                self._file.write("\n")
        except OSError as e:
            raise FlaxlmError(f"{self.path}: cannot write metrics: {e.strerror or e}") from None
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(workdir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:
            raise FlaxlmError(f"{self.path}: cannot write metrics: {e.strerror or e}") from None
        if self._writer is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
    """The rows of a metrics.jsonl file (unparseable trailing lines from a killed run are skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(metrics_path: pathlib.Path, png_path: pathlib.Path) -> None:
    """Write train/eval loss against step as a PNG."""
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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
