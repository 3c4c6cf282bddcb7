"""Typed configs: nested frozen dataclasses loaded from YAML, validated, overridden from the command line.

The loader is generic: any dataclass whose fields are annotated with the supported types can be loaded.

    cfg = load_config("configs/char_gpt_cpu.yaml", ExperimentConfig, ["model.n_layer=6", "train.lr=3e-4"])
    save_config(cfg, workdir / "config.yaml")
    config_hash(cfg)  # stable sha256 hex digest of the canonical dict

Supported field annotations: bool, int, float (an int, or a number written as a string such as `1e-3`,
which YAML 1.1 reads as a string, is accepted), str, pathlib.Path (from a string), None, `X | None`
and other unions, `tuple[X, ...]`, `tuple[X, Y]`, `list[X]`, `dict[K, V]`, `Literal[...]`, `typing.Any`
numpy/JAX dtypes (`jnp.dtype` fields, from names such as `float32` or `bfloat16`)
and nested dataclasses. Dataclasses may validate combinations in `__post_init__` by raising `ConfigError`
with the offending field as `key` (relative to the dataclass); the loader prefixes the key path. Any other
`ValueError`/`TypeError` from a constructor becomes a `ConfigError` naming the section.

Every error is a `ConfigError` naming the file and the full dotted key path: unknown keys (with the valid
keys and the closest match), wrong types (expected and got), missing required keys, invalid YAML (with the
line), duplicate keys, and malformed or unknown `key.sub=value` overrides. YAML is read with
`yaml.safe_load` semantics only.
"""

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import pathlib
import re
import reprlib
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import ml_dtypes
import numpy as np
import yaml

from flaxlm.errors import ConfigError

T = TypeVar("T")

_SCALARS = (bool, int, float, str, pathlib.Path)
_DTYPE_NAMES = {"bfloat16": ml_dtypes.bfloat16}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)
_short_repr = reprlib.Repr()
_short_repr.maxstring = 60
_short_repr.maxother = 60


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects duplicate keys in a mapping instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass: safe_load semantics


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _got(value: Any) -> str:
    return f"{type(value).__name__} {_short_repr.repr(value)}"


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: Any, valid: Sequence[str]) -> str:
    message = f"unknown key {key!r}"
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" (valid keys: {', '.join(valid) if valid else 'none'})"


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a mapping, converting and validating every value.

    Args:
      cls: a dataclass type whose field annotations are among the supported types (see module docstring).
      data: the mapping of field name to value (as read from YAML).
      path: dotted key path of `data` inside the whole config; used in error messages.

    Missing keys take the field defaults. Raises ConfigError naming the full key path on unknown keys,
    missing required keys, wrong types and `__post_init__` validation failures.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {_got(data)}", key=path)
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise ConfigError(_unknown_key(key, list(types_)), key=_join(path, str(key)))
        kwargs[key] = _convert(value, types_[key], _join(path, key))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(_join(path, m) for m in missing)}", key=path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(e.message, key=_join(path, e.key) if e.key else path, file=e.file) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}", key=path) from None


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Annotated:
        return _convert(value, args[0], path)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and options[0] not in _SCALARS:
            return _convert(value, options[0], path)
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"expected {_type_name(tp)}, got {_got(value)}", key=path)
    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise ConfigError(f"expected {_type_name(tp)}, got {_got(value)}", key=path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, path)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list ({_type_name(tp)}), got {_got(value)}", key=path)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}", key=path)
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if (origin is list or tp is list) else tuple(items)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping ({_type_name(tp)}), got {_got(value)}", key=path)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, path): _convert(v, value_tp, _join(path, str(k))) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is pathlib.Path:
        if isinstance(value, (str, pathlib.PurePath)):
            return pathlib.Path(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is np.dtype:
        if isinstance(value, str):
            try:
                dtype = np.dtype(_DTYPE_NAMES.get(value, value))
            except (TypeError, ValueError, SyntaxError):  # numpy parses '0:' or '01' as a format string
                dtype = None
            if dtype is None or not (dtype.kind == "f" or dtype.type in _DTYPE_NAMES.values()):
                raise ConfigError(f"unknown dtype {value!r}: expected a floating dtype (e.g. float32, bfloat16)",
                                  key=path)
            return dtype
        if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
            return np.dtype(value)
    else:
        raise TypeError(f"{path}: unsupported config annotation {tp!r}")
    raise ConfigError(f"expected {_type_name(tp)}, got {_got(value)}", key=path)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON data: dicts, lists (from tuples), str (from Path), scalars."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, type) and hasattr(value, "dtype"):
        return np.dtype(value.dtype).name
    return value


def _schema_check(cls: type, parts: list[str], override: str) -> None:
    """Raise ConfigError when the dotted key `parts` does not name a field reachable from dataclass `cls`."""
    tp: Any = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            fields = _field_types(tp)
            if part not in fields:
                raise ConfigError(f"{_unknown_key(part, list(fields))} in override {override!r}", key=key)
            tp = fields[part]
        elif typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping) or tp is Any:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        else:
            parent = ".".join(parts[:i])
            raise ConfigError(
                f"{parent!r} has type {_type_name(tp)} and no sub-key {part!r} (override {override!r})", key=key
            )


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set; `value` is parsed as YAML.

    With `cls` (the config dataclass), an override naming a key the schema does not have is rejected up
    front with the closest valid key. Intermediate mappings are created as needed. `data` is not modified.
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    result = copy.deepcopy(dict(data))
    for override in overrides:
        if not isinstance(override, str) or "=" not in override:
            raise ConfigError(f"malformed override {override!r}: expected key.sub=value")
        key, _, raw = override.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p or p != p.strip() for p in parts):
            raise ConfigError(f"malformed override {override!r}: expected key.sub=value with non-empty key parts")
        try:
            value = _parse_yaml(raw)
        except _YAML_ERRORS as e:
            raise ConfigError(f"cannot parse the value of override {override!r}: {_yaml_problem(e)}", key=key) from None
        if cls is not None:
            _schema_check(cls, parts, override)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"cannot apply override {override!r}: {'.'.join(parts[: i + 1])!r} is {_got(child)}, not a mapping",
                    key=key,
                )
            node = child
        node[parts[-1]] = value
    return result


def _yaml_problem(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, RecursionError):
        return "nesting too deep"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from `path` (safe loading only); ConfigError naming the file on any problem."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError("config file not found", file=path)
    if p.is_dir():
        raise ConfigError("is a directory, expected a YAML config file", file=path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"not valid UTF-8 at byte {e.start} (line {line})", file=path) from None
    try:
        data = _parse_yaml(text)
    except _YAML_ERRORS as e:
        raise ConfigError(f"invalid YAML: {_yaml_problem(e)}", file=path) from None
    if data is None:
        raise ConfigError("config file is empty; expected a mapping of config keys", file=path)
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of config keys, got {_got(data)}", file=path)
    return data


def load_config(path: str | os.PathLike, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read YAML file `path`, apply `key.sub=value` overrides and build dataclass `cls`.

    Errors name the file and the key path; an error caused by an override value names the override.
    """
    data = apply_overrides(read_yaml(path), overrides, cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        for override in overrides:
            key = override.partition("=")[0].strip()
            if e.key and (e.key == key or e.key.startswith(key + ".") or e.key.startswith(key + "[")):
                raise ConfigError(f"{e.message} (from override {override!r})", key=e.key) from None
        raise ConfigError(e.message, key=e.key, file=path) from None


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML to `path` atomically (a temporary file renamed into place).

    Raises ConfigError naming the path when it cannot be written (missing or read-only directory, full disk).
    """
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    target = pathlib.Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise ConfigError(f"cannot write config: {e.strerror or e}", file=path) from None


def config_hash(cfg: Any) -> str:
    """Stable sha256 hex digest of the canonical (sorted-key JSON) form of `to_dict(cfg)`."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
