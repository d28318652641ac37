"""Turn plain YAML data into typed dataclasses, with errors that name the key path.

:func:`from_dict` walks a dataclass's fields: an unknown key, a value of the wrong type or a missing required key raises
:class:`~hpmkd.registry.ConfigError` naming the full key path (``teachers.1.train.lr``), what was given and what is
allowed. Supported field types: ``bool``, ``int``, ``float`` (ints accepted; NaN and infinities refused), ``str``,
``Literal[...]``, ``X | None``, ``list[X]``, ``dict[str, Any]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from hpmkd.registry import ConfigError, did_you_mean


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from the mapping ``data``; see the module docstring."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}.")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{join(path, key)}: unknown key.{did_you_mean(str(key), fields)} "
                f"Allowed keys here: {', '.join(sorted(fields))}."
            )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{join(path, name)}: required key is missing.")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` (converting ints to floats and nested mappings to dataclasses)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        nested = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(nested) == 1:  # a section or null: the section's own error names its key
            return from_dict(nested[0], value, path)
        errors = []
        for option in get_args(tp):
            try:
                return convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{path}: expected {describe(tp)}, got {value!r}.")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}.")
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {describe(tp)}.")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        (item,) = get_args(tp)
        return [convert(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        _, item = get_args(tp)
        return {str(k): convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: must be a finite number, got {value}.")
            return float(value)
        if isinstance(value, str) and is_number(value):
            raise ConfigError(f"{path}: expected float, got the string {value!r}; write it without quotes "
                              f"({value.strip()} is a number).")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {describe(tp)}, got {type(value).__name__} {value!r}.")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c.0": 2}`` (for MLflow params)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, join(prefix, k)))
        return out if out or not prefix else {prefix: "{}"}
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, join(prefix, i)))
        return out if out or not prefix else {prefix: "[]"}
    return {prefix: data}


def replace_path(obj: Any, dotted: str, value: Any, where: str = "") -> Any:
    """A copy of the dataclass or mapping ``obj`` with the field or key at ``dotted`` (``"temperature.T"``) set to
    ``value``: dataclasses are copied with :func:`dataclasses.replace` (the value checked against the field's type),
    mappings are copied; nothing in ``obj`` is changed. ``where`` prefixes the key path in errors."""
    head, _, rest = dotted.partition(".")
    path = join(where, head)
    if dataclasses.is_dataclass(obj):
        fields = {f.name for f in dataclasses.fields(obj) if f.init}
        if head not in fields:
            raise ConfigError(f"{path}: unknown key.{did_you_mean(head, fields)}")
        current = getattr(obj, head)
        new = replace_path(current, rest, value, path) if rest else convert(get_type_hints(type(obj))[head], value, path)
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, dict):
        new = replace_path(obj.get(head, {}), rest, value, path) if rest else value
        return {**obj, head: new}
    raise ConfigError(f"{path}: {where or 'the config'} holds {obj!r}, not a mapping.")


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][0][c] = value`` for ``dotted = "a.b.0.c"``; list indices are numbers.

    Missing mapping keys are created (validation reports them if they are not allowed).
    """
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: {here} is not an index of a list of {len(node)} items.")
            key = int(key)
            if last:
                node[key] = value
            else:
                node = node[key]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth])} holds {node!r}, not a mapping or list.")

