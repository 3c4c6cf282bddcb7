"""Meshes from config, logical-axis rules -> PartitionSpecs, state and batch shardings (one device)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from flaxlm.ops.losses import path_names
from flaxlm.train import (
    DEFAULT_RULES,
    MeshConfig,
    OptimizerConfig,
    TrainState,
    local_batch_slice,
    logical_to_spec,
    make_mesh,
    make_optimizer,
    shard_batch,
    state_shardings,
)
from tiny_lm import make_batch, make_model

MESH_2_4_2 = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))


def test_make_mesh_fills_and_names_axes():
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_make_mesh_errors_name_the_sizes():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"data=2 x fsdp=4 x tensor=1 needs 8 devices, but 1 are given"):
        make_mesh((2, 4, 1), devices=devices)
    with pytest.raises(ValueError, match=r"data=-1 x fsdp=1 x tensor=2: 1 devices are not divisible by 2"):
        make_mesh((-1, 1, 2), devices=devices)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        MeshConfig(tensor=0)


@pytest.mark.parametrize(
    "names,shape,expected",
    [
        (("embed", "mlp"), (16, 32), P("fsdp", "tensor")),
        (("vocab", "embed"), (32, 16), P("tensor", "fsdp")),
        (("mlp", "vocab"), (32, 32), P("tensor", None)),  # 'tensor' already taken by 'mlp'
        (("embed", "heads", "kv"), (16, 4, 8), P("fsdp", "tensor", None)),
        (("embed", "mlp"), (6, 16, 32), P(None, "fsdp", "tensor")),  # stacked layers: leading axis unnamed
        (("mlp",), (6, 32), P(None, "tensor")),
        (None, (3, 5), P(None, None)),
        (("classes", "unknown"), (4, 4), P(None, None)),
    ],
)
def test_logical_names_to_partition_spec(names, shape, expected):
    assert logical_to_spec(names, shape, DEFAULT_RULES, MESH_2_4_2) == expected


def test_rules_may_shard_over_several_axes_and_are_validated():
    rules = {"batch": ("data", "fsdp"), "embed": ("fsdp", "tensor")}
    assert logical_to_spec(("embed",), (16,), rules, MESH_2_4_2) == P(("fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"'embed' -> 'model'"):
        logical_to_spec(("embed",), (16,), {"embed": "model"}, MESH_2_4_2)


def test_spec_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"layer/kernel: dimension 15 .* not divisible by mesh axes \('tensor',\)"):
        logical_to_spec(("embed", "mlp"), (16, 15), DEFAULT_RULES, MESH_2_4_2, "layer/kernel")
    with pytest.raises(ValueError, match="3 logical names"):
        logical_to_spec(("embed", "mlp", "kv"), (16, 30), DEFAULT_RULES, MESH_2_4_2)


def test_state_shardings_cover_params_and_optimizer_moments():
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = TrainState.create(make_model(0), make_optimizer(OptimizerConfig(name="adamw")), 0)
    shardings = state_shardings(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    leaves = jax.tree_util.tree_leaves_with_path(shardings)
    assert all(isinstance(s, NamedSharding) for _, s in leaves)
    specs = {"/".join(path_names(p)): s.spec for p, s in leaves}
    assert specs["model/hidden/kernel/value"] == P("fsdp", "tensor")
    moments = [name for name in specs if name.endswith("hidden/kernel/value") and name.startswith("opt_state")]
    assert len(moments) == 2 and all(specs[name] == P("fsdp", "tensor") for name in moments)  # Adam mu, nu
    assert specs["step"] == P() and specs["rng"] == P()


def test_single_process_batch_is_the_global_batch():
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert local_batch_slice(mesh, 8) == slice(0, 8)
    batch = make_batch(0)
    sharded = shard_batch(batch, mesh)
    assert sharded["inputs"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(sharded["targets"], batch["targets"])
    with pytest.raises(ValueError, match="'inputs'"):
        shard_batch({"inputs": np.int32(3)}, mesh)


def test_params_of_stacked_layers_get_leading_none():
    def layer(key):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        return nnx.Linear(16, 32, kernel_init=init, use_bias=False, rngs=nnx.Rngs(key))

    stacked = jax.eval_shape(lambda: jax.vmap(layer)(jax.random.split(jax.random.key(0), 6)))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = jax.tree.leaves(state_shardings(stacked, mesh))[0].spec
    assert spec == P(None, "fsdp", "tensor")
