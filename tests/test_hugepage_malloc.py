"""The `flaxlm` command restarts itself with glibc's huge-page malloc tunable, and the tunable cuts page faults."""

import os
import pathlib
import subprocess
import sys

import pytest

from flaxlm import cli, hugepage_malloc
from flaxlm.hugepage_malloc import hugepage_environment

GLIBC_OK = hugepage_malloc._glibc_supports_hugetlb()
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not GLIBC_OK, reason="needs glibc >= 2.35 on Linux")
def test_environment_adds_the_tunable_and_keeps_the_others():
    assert hugepage_environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_environment_leaves_a_chosen_value_and_the_opt_out_alone():
    assert hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert hugepage_environment({"FLAXLM_HUGEPAGE_MALLOC": "0"}) is None


@pytest.mark.skipif(not GLIBC_OK, reason="needs glibc >= 2.35 on Linux")
def test_run_reexecutes_the_command_once(monkeypatch):
    calls = []
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("FLAXLM_HUGEPAGE_MALLOC", raising=False)
    monkeypatch.setattr(sys, "argv", ["flaxlm", "bench", "configs/gpt_char.yaml"])
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cli, "main", lambda: 0)
    assert cli.run() == 0
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "flaxlm", "bench", "configs/gpt_char.yaml"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
    assert cli.run() == 0
    assert len(calls) == 1


# Plain glibc malloc, as XLA uses it (NumPy would madvise huge pages for its own arrays).
TOUCH_64MB = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(64 << 20), 1, 64 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC_OK or not THP.exists() or "[never]" in THP.read_text(),
                    reason="needs glibc >= 2.35 and transparent huge pages in 'madvise' or 'always' mode")
def test_tunable_turns_thousands_of_page_faults_into_a_few():
    def faults(env):
        out = subprocess.run([sys.executable, "-c", TOUCH_64MB], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout)

    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert faults(plain) > 16000
    assert faults(hugepage_environment(plain)) < 1000
