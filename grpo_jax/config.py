"""Strict, typed configuration: frozen kw_only dataclasses built from YAML and dotted overrides.

    cfg = from_yaml(AlgoConfig, "algo.yaml", overrides=["loss.beta=0.04"])

Every mapping key must name a field (an unknown key raises, naming it and the keys that exist); every value is
checked against the field's type (int, float, bool, str, Literal, Optional, tuple, dict, nested dataclass);
``__post_init__`` checks the invariants. A dataclass that defines ``from_preset(name)`` accepts a ``preset:`` key
whose values are the base that the other keys override.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to type ``tp``, or raise ConfigError naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check(value, arm, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path=path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_check(k, kt, path): _check(v, vt, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads '1e-6' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: config fields of type {tp!r} are not supported")


def _deep_merge(base: Mapping, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def from_dict(cls: type, data: Mapping[str, Any], *, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, strictly."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    data = dict(data)
    if "preset" in data and hasattr(cls, "from_preset"):
        try:
            base = cls.from_preset(data.pop("preset"))
        except ValueError as e:
            raise ConfigError(f"{_join(path, 'preset')}: {e}") from None
        data = _deep_merge(to_dict(base), data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; {cls.__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check(v, hints[k], _join(path, k)) for k, v in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) that ``from_dict`` turns back into ``cfg``."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists) to a nested mapping."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. loss.beta=0.04")
        keys = key.strip().split(".")
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, Mapping) else {}
            node = node[k]
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:  # not a YAML scalar/list/map (e.g. a format string like "{expression}="): keep the text
            node[keys[-1]] = raw
    return out


def from_yaml(cls: type, path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Load ``cls`` from a YAML file, then apply dotted overrides; all errors name the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, apply_overrides(data, overrides))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
