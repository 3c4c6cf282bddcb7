"""benchmarks/dot_backends.py: the Eigen compile option really replaces YNNPACK's dots; tables and bad usage."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import dot_backends  # noqa: E402


def test_eigen_option_compiles_plain_dots_without_ynn_fusions():
    x = jnp.ones((256, 256), jnp.float32)
    lowered = jax.jit(lambda a, b: a @ b).lower(x, x)
    compiled = lowered.compile(dot_backends.BACKENDS["eigen"])
    eigen = compiled.as_text()
    assert "__ynn_fusion" not in eigen
    assert " dot(" in eigen
    assert (compiled(x, x) == 256.0).all()


def test_markdown_has_one_row_per_product_and_step():
    results = {"products": [{"product": "[8, 4] x [4, 2]", "pass": "forward", "torch_ms": 1.5, "ynn_ratio": 1.25,
                             "eigen_ratio": 0.9}],
               "steps": {"bilstm": {"ynn_ms": 500.0, "eigen_ms": 530.0, "eigen_ratio": 1.06}}}
    table = dot_backends.markdown(results)
    assert "| [8, 4] x [4, 2] | forward | 1.50 | 1.25 | 0.90 |" in table
    assert "| bilstm | 500.0 | 530.0 | 1.060 |" in table


def test_nothing_to_time_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        dot_backends.main([])
    assert "nothing to time" in capsys.readouterr().err
