"""flaxlm.config: typed loading, errors naming the key path, overrides, save/load round trip, hashing, fuzzing."""

import dataclasses
import pathlib
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxlm.config import apply_overrides, config_hash, from_dict, load_config, save_config, to_dict
from flaxlm.errors import ConfigError, FlaxlmError


@dataclasses.dataclass(frozen=True)
class Model:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    dropout: float = 0.0
    activation: Literal["relu", "gelu"] = "gelu"
    bias: bool = True

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ConfigError(f"{self.d_model} is not divisible by n_head={self.n_head}", key="d_model")


@dataclasses.dataclass(frozen=True)
class Data:
    path: pathlib.Path | None = None
    buckets: tuple[int, ...] = (16, 32)
    split: tuple[float, float] = (0.9, 0.1)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: Model = dataclasses.field(default_factory=Model)
    data: Data = dataclasses.field(default_factory=Data)
    lr: float = 1e-3
    tags: list[str] = dataclasses.field(default_factory=list)
    rules: dict[str, str | None] = dataclasses.field(default_factory=dict)
    seed: int = 0


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_from_dict_converts_nested_values():
    cfg = from_dict(
        Experiment,
        {
            "name": "run",
            "model": {"n_layer": 4, "dropout": 1, "activation": "relu"},
            "data": {"path": "a/b.txt", "buckets": [8, 16, 64], "split": [0.8, 0.2]},
            "lr": "3e-4",
            "tags": ["x", "y"],
            "rules": {"embed": "data", "mlp": None},
        },
    )
    assert cfg.model == Model(n_layer=4, dropout=1.0, activation="relu")
    assert isinstance(cfg.model.dropout, float)
    assert cfg.data == Data(path=pathlib.Path("a/b.txt"), buckets=(8, 16, 64), split=(0.8, 0.2))
    assert cfg.lr == 3e-4 and cfg.tags == ["x", "y"] and cfg.rules == {"embed": "data", "mlp": None}
    assert from_dict(Experiment, {"name": "d"}) == Experiment(name="d")


def test_unknown_key_names_full_path_and_close_match():
    with pytest.raises(ConfigError) as info:
        from_dict(Experiment, {"name": "x", "model": {"n_layr": 3}})
    message = str(info.value)
    assert message.startswith("model.n_layr: unknown key 'n_layr'")
    assert "did you mean 'n_layer'?" in message
    assert "valid keys: n_layer, n_head, d_model, dropout, activation, bias" in message
    assert info.value.key == "model.n_layr"


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"model": {"n_layer": "two"}}, "model.n_layer", "expected int, got str 'two'"),
        ({"model": {"n_layer": True}}, "model.n_layer", "expected int, got bool True"),
        ({"model": {"n_layer": 2.0}}, "model.n_layer", "expected int, got float 2.0"),
        ({"model": {"bias": 1}}, "model.bias", "expected bool, got int 1"),
        ({"model": {"activation": "tanh"}}, "model.activation", "expected one of 'relu', 'gelu', got str 'tanh'"),
        ({"lr": "fast"}, "lr", "expected float, got str 'fast'"),
        ({"data": {"buckets": [8, "x"]}}, "data.buckets[1]", "expected int, got str 'x'"),
        ({"data": {"split": [0.9]}}, "data.split", "expected 2 items"),
        ({"data": {"buckets": 8}}, "data.buckets", "expected a list"),
        ({"model": [1, 2]}, "model", "expected a mapping for Model, got list"),
        ({"rules": {"embed": 3}}, "rules.embed", "expected str | None, got int 3"),
        ({"tags": [None]}, "tags[0]", "expected str, got NoneType None"),
    ],
)
def test_wrong_types_name_key_expected_and_got(data, key, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(Experiment, {"name": "x", **data})
    assert info.value.key == key
    assert fragment in str(info.value)


def test_missing_required_key_and_post_init_validation():
    with pytest.raises(ConfigError, match="missing required key.*name"):
        from_dict(Experiment, {})
    with pytest.raises(ConfigError) as info:
        from_dict(Experiment, {"name": "x", "model": {"n_head": 3}})
    assert str(info.value) == "model.d_model: 64 is not divisible by n_head=3"


def test_to_dict_round_trip_and_hash():
    cfg = from_dict(Experiment, {"name": "run", "data": {"path": "p.txt"}, "rules": {"embed": "data"}})
    plain = to_dict(cfg)
    assert plain["data"] == {"path": "p.txt", "buckets": [16, 32], "split": [0.9, 0.1]}
    assert from_dict(Experiment, plain) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Experiment, yaml.safe_load(yaml.safe_dump(plain))))
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, seed=1))
    assert len(config_hash(cfg)) == 64


def test_load_config_with_overrides_and_save(tmp_path):
    path = write(tmp_path, "name: run\nmodel:\n  n_layer: 4\nlr: 1e-3\n")
    cfg = load_config(path, Experiment, ["model.n_head=4", "data.buckets=[4, 8]", "rules.embed=data", "lr=0.5"])
    assert cfg.model.n_layer == 4 and cfg.model.n_head == 4 and cfg.lr == 0.5
    assert cfg.data.buckets == (4, 8) and cfg.rules == {"embed": "data"}
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out, Experiment) == cfg
    assert list(tmp_path.glob(".resolved.yaml.*")) == []


def test_save_config_unwritable_names_path(tmp_path):
    target = tmp_path / "missing_dir" / "config.yaml"
    with pytest.raises(ConfigError, match="missing_dir/config.yaml: cannot write config"):
        save_config(Experiment(name="x"), target)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"name: [unclosed\n", "invalid YAML"),
        (b"name: x\nmodel:\n  n_layer: 2\n n_head: 3\n", "line 4"),
        (b"- a\n- b\n", "the top level must be a mapping of config keys, got list"),
        (b"", "config file is empty"),
        (b"name: x\nname: y\n", "found duplicate key 'name'"),
        (b"name: \xff\xfe\n", "not valid UTF-8 at byte 6 (line 1)"),
        (b"name: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
        (b"name: x\nmodel: {n_layr: 1}\n", "model.n_layr: unknown key"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path, content, fragment):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path, Experiment)
    assert str(info.value).startswith(str(path))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_load_config_missing_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", Experiment)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, Experiment)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path, "base: &b {n_layer: 3, n_head: 2}\n")
    data = yaml.safe_load(path.read_text())
    assert data == {"base": {"n_layer": 3, "n_head": 2}}
    path = write(tmp_path, "name: x\nmodel:\n  <<: {n_layer: 3, n_head: 4}\n  n_head: 2\n", "merge.yaml")
    assert load_config(path, Experiment).model == Model(n_layer=3, n_head=2)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_layr=3", "unknown key 'n_layr'; did you mean 'n_layer'?"),
        ("modle.n_layer=3", "did you mean 'model'?"),
        ("model.n_layer.x=3", "'model.n_layer' has type int and no sub-key 'x'"),
        ("model.n_layer", "malformed override 'model.n_layer': expected key.sub=value"),
        ("=3", "malformed override"),
        ("model..n_layer=3", "malformed override"),
        ("lr=[1,", "cannot parse the value of override"),
    ],
)
def test_bad_overrides(tmp_path, override, fragment):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, Experiment, [override])
    assert fragment in str(info.value)


def test_override_with_wrong_type_names_the_override(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, Experiment, ["model.n_layer=abc"])
    assert str(info.value) == "model.n_layer: expected int, got str 'abc' (from override 'model.n_layer=abc')"


def test_apply_overrides_does_not_modify_input():
    data = {"model": {"n_layer": 2}}
    out = apply_overrides(data, ["model.n_layer=5", "new.key=x y"])
    assert data == {"model": {"n_layer": 2}}
    assert out == {"model": {"n_layer": 5}, "new": {"key": "x y"}}
    with pytest.raises(ConfigError, match="'model.n_layer' is int 2, not a mapping"):
        apply_overrides(data, ["model.n_layer.deep=1"])
    with pytest.raises(ConfigError, match="must be a list"):
        apply_overrides(data, "model.n_layer=5")


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
config_keys = (st.sampled_from(["name", "model", "data", "lr", "tags", "rules", "seed", "n_layer", "buckets"])
               | st.text(max_size=6))
fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(st.dictionaries(config_keys, yaml_values | st.dictionaries(config_keys, yaml_values, max_size=4), max_size=6))
def test_fuzz_from_dict_only_raises_config_errors(data):
    try:
        cfg = from_dict(Experiment, data)
    except ConfigError:
        return
    assert from_dict(Experiment, to_dict(cfg)) == cfg


@fuzz
@given(st.lists(st.text(max_size=20) | st.from_regex(r"(model|data|lr|rules)(\.[a-z_]{1,8}){0,2}=.{0,10}",
                                                     fullmatch=True), max_size=4))
def test_fuzz_overrides_only_raise_config_errors(overrides):
    try:
        from_dict(Experiment, apply_overrides({"name": "x"}, overrides, Experiment))
    except ConfigError:
        pass


@fuzz
@given(st.binary(max_size=200) | yaml_values.map(lambda v: yaml.safe_dump(v).encode()))
def test_fuzz_load_config_on_arbitrary_files(tmp_path, content):
    path = write(tmp_path, content, "fuzz.yaml")
    try:
        load_config(path, Experiment)
    except FlaxlmError as e:
        assert isinstance(e, ConfigError)


def test_config_error_format_and_pickle():
    import pickle

    error = ConfigError("expected int", key="model.n_layer", file="c.yaml")
    assert str(error) == "c.yaml: model.n_layer: expected int"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert isinstance(error, FlaxlmError) and isinstance(error, ValueError)


def test_dtype_fields_load_from_names_and_save_as_names():
    import jax.numpy as jnp

    @dataclasses.dataclass(frozen=True)
    class WithDtype:
        dtype: jnp.dtype = jnp.float32

    loaded = from_dict(WithDtype, {"dtype": "bfloat16"})
    assert loaded.dtype == jnp.bfloat16
    assert to_dict(loaded) == {"dtype": "bfloat16"}
    assert to_dict(WithDtype()) == {"dtype": "float32"}
    with pytest.raises(ConfigError, match="dtype: unknown dtype 'float99'"):
        from_dict(WithDtype, {"dtype": "float99"})


@pytest.mark.parametrize("value", ["0:", "01", "0B", "int32", "S4"])
def test_dtype_fields_refuse_what_is_not_a_floating_dtype(value):
    """Strings numpy reads as format strings (found by test_fuzz_model_configs) or as non-float types are config
    errors naming the key, not numpy's ValueError/SyntaxError or a dtype that does not round-trip."""
    import jax.numpy as jnp

    @dataclasses.dataclass(frozen=True)
    class WithDtype:
        dtype: jnp.dtype = jnp.float32

    with pytest.raises(ConfigError, match=r"dtype: unknown dtype .*expected a floating dtype"):
        from_dict(WithDtype, {"dtype": value})
