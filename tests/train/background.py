"""A subprocess started early and awaited later, with its output in a file (no pipe to fill up)."""

import atexit
import os
import pathlib
import subprocess
import sys


class BackgroundRun:
    """`python script workdir` with extra environment variables; `wait()` returns (returncode, log)."""

    def __init__(self, script: pathlib.Path, workdir: pathlib.Path, *, env: dict[str, str], name: str = "run"):
        self._log = open(workdir / f"{name}.log", "w+")
        self._proc = subprocess.Popen(
            [sys.executable, str(script), str(workdir)],
            env=dict(os.environ, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self._stop)

    def _stop(self):
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """(returncode, log); returncode None when it was killed at the timeout."""
        try:
            returncode = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            self._stop()
        self._log.seek(0)
        return returncode, self._log.read()
