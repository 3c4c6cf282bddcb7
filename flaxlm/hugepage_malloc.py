"""Back XLA:CPU's per-step scratch memory with transparent huge pages (Linux, glibc >= 2.35).

XLA:CPU allocates each execution's temporary buffers (hundreds of MB for a training step: 620 MB for the
gpt_large speed case) with one `malloc`, which glibc serves with a fresh `mmap` and returns on `free`. Every
step therefore first-touches that memory in 4 KiB pages: about 195,000 minor page faults and 0.4 s of
kernel time per gpt_large step, 93,000 faults and 0.2 s per BiLSTM step. The glibc tunable
`glibc.malloc.hugetlb=1` makes malloc `madvise(MADV_HUGEPAGE)` its mappings, so on a kernel whose
transparent huge pages are in `madvise` (or `always`) mode the same memory takes a few hundred 2 MiB faults.
Measured on the 2-core host (`python benchmarks/page_faults.py`, benchmarks/results/page_faults_2cores.md):
BiLSTM step 640 -> 557 ms, seq2seq 1038 -> 886 ms, gpt_large 2686 -> 2481 ms, nanoGPT CPU config unchanged
(PyTorch's steps gain too, less on seq2seq and gpt_large).

glibc reads tunables only when a process starts, so the `flaxlm` command re-executes itself once with the
tunable added to `GLIBC_TUNABLES`. Scripts that call `train_step` themselves get the same effect by starting
Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment. `FLAXLM_HUGEPAGE_MALLOC=0` turns
the re-execution off.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FLAXLM_HUGEPAGE_MALLOC"


def _glibc_supports_hugetlb() -> bool:
    """True on Linux with glibc 2.35 or newer (the first release with `glibc.malloc.hugetlb`)."""
    if sys.platform != "linux":
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)


def hugepage_environment(environ: dict) -> dict | None:
    """`environ` with `glibc.malloc.hugetlb=1` appended to GLIBC_TUNABLES, or None when nothing is to change.

    Nothing changes when the tunable is already set (to any value: the user's choice wins), when
    FLAXLM_HUGEPAGE_MALLOC is '0', or when the C library is not glibc >= 2.35.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or TUNABLE in tunables or not _glibc_supports_hugetlb():
        return None
    setting = f"{TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by `python -m flaxlm <same arguments>` started with the tunable, if it lacks it.

    Call only from the `flaxlm` command's entry point, before any work: the process is replaced.
    """
    environ = hugepage_environment(dict(os.environ))
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "flaxlm", *sys.argv[1:]], environ)
