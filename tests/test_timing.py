"""benchmarks/timing.py: how the shared timers call what they time (no timings are asserted)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402


def test_alternating_seconds_calls_each_once_untimed_then_in_turn():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = timing.alternating_seconds(runs, 3)
    assert calls == ["a", "b"] * 4
    assert sorted(times) == ["a", "b"]
    assert all(len(t) == 3 and all(s >= 0.0 for s in t) for t in times.values())


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    assert timing.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0
