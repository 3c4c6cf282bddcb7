"""benchmarks/dot_backends.py: its back ends are flaxlm's dot_backend options; tables and bad usage.

That each option really changes the matmul library is tested in tests/train/test_dot_backend.py.
"""

import pathlib
import sys

import pytest

from flaxlm.train.dot_backend import CPU_OPTIONS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import dot_backends  # noqa: E402


def test_markdown_has_one_row_per_product_and_step():
    results = {"products": [{"product": "[8, 4] x [4, 2]", "pass": "forward", "torch_ms": 1.5, "ynn_ratio": 1.25,
                             "eigen_ratio": 0.9, "onednn_ratio": 0.8}],
               "steps": {"bilstm": {"ynn_ms": 500.0, "eigen_ms": 530.0, "onednn_ms": 560.0, "eigen_ratio": 1.06,
                                    "onednn_ratio": 1.12}}}
    table = dot_backends.markdown(results)
    assert "| product | pass | PyTorch ms | YNNPACK / PyTorch | Eigen / PyTorch | oneDNN / PyTorch |" in table
    assert "| [8, 4] x [4, 2] | forward | 1.50 | 1.25 | 0.90 | 0.80 |" in table
    assert "| case | train step, YNNPACK ms | Eigen ms | oneDNN ms | Eigen / YNNPACK | oneDNN / YNNPACK |" in table
    assert "| bilstm | 500.0 | 530.0 | 560.0 | 1.060 | 1.120 |" in table


def test_the_back_ends_are_flaxlms_options():
    assert dot_backends.BACKENDS == {"ynn": {}, **CPU_OPTIONS}


def test_nothing_to_time_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        dot_backends.main([])
    assert "nothing to time" in capsys.readouterr().err
