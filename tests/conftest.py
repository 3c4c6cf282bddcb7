"""Shared pytest set-up.

- --runslow enables tests marked slow; SHARED_DATA locates ../shared/data.
- One JAX persistent compilation cache per test session, shared by the xdist workers and every subprocess the
  tests start (they inherit the environment): many tests compile the same tiny models, and the CLI tests
  recompile the same train step in each `flaxlm` process. The cache lives in a fresh temporary directory, so a
  run never reads programs compiled by an earlier one.
- XLA:CPU compiles the tests' programs at LLVM optimisation level 0 (`--xla_backend_optimization_level=0`,
  appended to any XLA_FLAGS already set). The tests' models are tiny, so compiling dominates their run time,
  and level 0 compiles about twice as fast; the arithmetic is the same (no fast-math either way), and the
  losses of the benchmark cases agree with the default level to 1e-6. Training runs, `flaxlm` and
  benchmarks/ keep XLA's default level; only pytest sets this.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """Controller (or a run without xdist): export the cache dir and XLA flags before any backend starts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if _CACHE_ENV not in os.environ:
        cache = tempfile.mkdtemp(prefix="flaxlm-test-jax-cache-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
        os.environ[_CACHE_ENV] = cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
