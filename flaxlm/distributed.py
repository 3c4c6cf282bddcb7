"""Multi-process (multi-host) start-up: a thin wrapper over `jax.distributed.initialize`.

Call `flaxlm.distributed.initialize()` once per process, before any other JAX call. Each setting comes
from the argument, else the environment:

    coordinator_address  FLAXLM_COORDINATOR,    else JAX_COORDINATOR_ADDRESS   ("host:port" of process 0)
    num_processes        FLAXLM_NUM_PROCESSES,  else JAX_NUM_PROCESSES
    process_id           FLAXLM_PROCESS_ID,     else JAX_PROCESS_ID

With one process (nothing set, or num_processes == 1) it does nothing, so the same script runs on a
laptop. With `auto=True` and nothing set, JAX's own cluster detection (SLURM, Open MPI, Cloud TPU,
Kubernetes) fills everything in. On CPU, cross-process collectives use gloo (JAX's default).
After initialisation `jax.devices()` lists every process's devices; see
`flaxlm.train.sharding.local_batch_slice` for which rows of a global batch each process loads.
"""

import os

import jax

_ENV = {
    "coordinator_address": ("FLAXLM_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FLAXLM_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FLAXLM_PROCESS_ID", "JAX_PROCESS_ID"),
}


def _from_env(field: str) -> tuple[str | None, str | None]:
    """(value, variable name) of the first set environment variable for `field`."""
    for name in _ENV[field]:
        if os.environ.get(name):
            return os.environ[name], name
    return None, None


def _as_int(field: str, value, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} from {source} must be an integer, got {value!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Join the process group; returns True when running multi-process, False for a single process.

    Raises ValueError naming the missing setting (and its environment variable) when a multi-process
    run is requested but incomplete. Calling it again after a successful initialisation is a no-op.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    settings = {}
    for field, value in (
        ("coordinator_address", coordinator_address),
        ("num_processes", num_processes),
        ("process_id", process_id),
    ):
        source = "argument"
        if value is None:
            value, source = _from_env(field)
        if value is not None and field != "coordinator_address":
            value = _as_int(field, value, source)
        settings[field] = value
    if all(value is None for value in settings.values()):
        if auto:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
            return jax.process_count() > 1
        return False
    if settings["num_processes"] == 1:
        return False
    for field, value in settings.items():
        if value is None:
            raise ValueError(f"multi-process run needs {field} (argument or environment variable {_ENV[field][0]})")
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(
            f"process_id {settings['process_id']} must be in [0, num_processes={settings['num_processes']})"
        )
    jax.distributed.initialize(**settings, initialization_timeout=initialization_timeout)
    return True
