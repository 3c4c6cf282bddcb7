"""One process of a 2-process data-parallel run on localhost (acceptance 3).

Started twice by test_distributed.py with FLAXLM_COORDINATOR, FLAXLM_NUM_PROCESSES, FLAXLM_PROCESS_ID
set. Each process has one CPU device; the mesh (data=2) spans both. Each process loads only its rows of
every global batch (`local_batch_slice`); process i writes its losses, a parameter checksum and its rows
as JSON to WORKDIR/result_<i>.json (WORKDIR = argv[1]).
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import flaxlm.distributed  # noqa: E402
from flaxlm.train import (  # noqa: E402
    TrainState,
    local_batch_slice,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
    shard_state,
)
from tiny_lm import lm_loss, make_batch, make_model  # noqa: E402

from distributed_reference import CONFIG, GLOBAL_BATCH, batch_seeds, param_checksum  # noqa: E402


def main(workdir: str):
    assert flaxlm.distributed.initialize(), "expected a multi-process run"
    assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(), jax.devices())
    mesh = make_mesh((-1, 1, 1))
    state = shard_state(TrainState.create(make_model(0), make_optimizer(CONFIG), 1), mesh)
    step = make_train_step(lm_loss, mesh=mesh)
    rows = local_batch_slice(mesh, GLOBAL_BATCH)
    losses = []
    for seed in batch_seeds():
        local = {name: value[rows] for name, value in make_batch(seed, GLOBAL_BATCH, pad_rows=(1, 6)).items()}
        state, metrics = step(state, shard_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    result = {"losses": losses, "checksum": param_checksum(state), "rows": [rows.start, rows.stop]}
    (pathlib.Path(workdir) / f"result_{jax.process_index()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
