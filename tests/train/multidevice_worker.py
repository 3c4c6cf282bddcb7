"""Run 10 train steps of a tiny GPT on several meshes of 8 forced CPU devices; save losses and params.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python multidevice_worker.py WORKDIR
(writes WORKDIR/runs.npz).
Runs (a 2-layer GPT, AdamW with decay and clipping, padded batches):
- `mesh_*`: jit with in/out shardings on meshes (8,1,1), (2,4,1), (1,4,2), (1,1,1), dropout 0.1,
  state created sharded by `create_sharded`;
- `jit_8_1_1` (no dropout) and `shard_map_8_1_1`: the same body under jax.shard_map with axis_name='data'
  (replicated state placed by `shard_state` with no rules);
Each run saves `<run>/losses` [10] and `<run>/<param path>` arrays (gathered to the host).
"""

import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from tiny_lm import VOCAB, lm_loss, make_batch  # noqa: E402

from flaxlm.models.gpt import GPT, GPTConfig  # noqa: E402

from flaxlm.ops.losses import path_names  # noqa: E402
from flaxlm.train import (  # noqa: E402
    DEFAULT_RULES,
    OptimizerConfig,
    TrainState,
    create_sharded,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
    shard_state,
)

STEPS = 10
LENGTH = 8


def make_model(seed, *, dropout_rate=0.0):
    """A 2-layer GPT small enough for CPU, with every dimension divisible by the mesh axes it is split on.

    bias=False (nanoGPT's option): the key bias has an exactly zero gradient (softmax ignores it), and Adam
    would turn its rounding noise into +-lr updates that differ between meshes.
    """
    config = GPTConfig(
        vocab_size=VOCAB, block_size=LENGTH, n_layer=2, n_head=2, n_embd=16, dropout=dropout_rate, bias=False
    )
    return GPT(config, rngs=nnx.Rngs(seed))
CONFIG = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1, clip_norm=1.0)


def run(mesh_shape, *, axis_name=None, dropout_rate=0.0):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(mesh_shape, devices=devices)
    tx = make_optimizer(CONFIG)
    if axis_name is None:
        rules = DEFAULT_RULES
        state = create_sharded(lambda: TrainState.create(make_model(0, dropout_rate=dropout_rate), tx, 1), mesh)
    else:
        rules = ()
        state = shard_state(TrainState.create(make_model(0, dropout_rate=dropout_rate), tx, 1), mesh, rules)
    step = make_train_step(lm_loss, mesh=mesh, rules=rules, axis_name=axis_name)
    losses = []
    for i in range(STEPS):
        batch = shard_batch(make_batch(100 + i, length=LENGTH, pad_rows=(1, 4, 6)), mesh, rules)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = {"/".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    return losses, params


def main(workdir: str):
    assert jax.device_count() == 8, jax.devices()
    runs = {
        "mesh_8_1_1": run((8, 1, 1), dropout_rate=0.1),
        "mesh_2_4_1": run((2, 4, 1), dropout_rate=0.1),
        "mesh_1_4_2": run((1, 4, 2), dropout_rate=0.1),
        "mesh_1_1_1": run((1, 1, 1), dropout_rate=0.1),
        "jit_8_1_1": run((8, 1, 1)),
        "shard_map_8_1_1": run((8, 1, 1), axis_name="data"),
    }
    arrays = {}
    for name, (losses, params) in runs.items():
        arrays[f"{name}/losses"] = np.asarray(losses)
        arrays.update({f"{name}/{path}": value for path, value in params.items()})
    np.savez(pathlib.Path(workdir) / "runs.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
