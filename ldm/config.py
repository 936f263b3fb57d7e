"""Typed configs: dataclasses filled from a YAML file and `dotted.key=value` overrides.

YAML holds values only (no import paths). Every key is checked against the dataclass fields: an unknown key or a value
of the wrong type is a `UserError` that names the key, raised before any work starts. Impossible values are caught by
each config's `validate()` method, which `load_config` calls last.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ldm.errors import UserError
from ldm.files import atomic_write_text

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `key=value` overrides, then validate."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(values, key, value)
    config = _build(cls(), values, prefix="")
    _validate_tree(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-able values (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so the run can be reproduced from it alone."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


def check(condition: bool, key: str, message: str) -> None:
    """Raise a `UserError` naming `key` when a value is impossible (used by `validate()` methods)."""
    if not condition:
        raise UserError(f"config key '{key}': {message}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist: pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file '{path}' is not valid YAML{line}: fix its syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections (e.g. 'train: {{max_steps: 100}}')")
    return values


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=200)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the raw text, the field's type decides whether that is acceptable
    return key.strip(), _RawText(text, value)


class _RawText:
    """An override's parsed value plus its original text, so a `str` field gets exactly what the user typed."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key '{'.'.join(parents[: i + 1])}' is a value, not a section; cannot set '{key}'")
        node = child
    node[leaf] = value


def _build(base: T, values: dict[str, Any], prefix: str) -> T:
    """`base` (a dataclass instance holding the defaults) with `values` applied, checked and coerced."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            # a section starts from its parent's default for it (which may differ from the section class's defaults)
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' is a section: set its fields (e.g. {key}.<field>=...), not a value")
            kwargs[name] = _build(getattr(base, name), value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(hints[name], value, key)
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    raw_text = value.text if isinstance(value, _RawText) else None
    if isinstance(value, _RawText):
        value = value.value
    origin, args = get_origin(tp), get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, _RawText(raw_text, value) if raw_text is not None else value, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r} (write e.g. {key}=[1,2])")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:  # free-form options handed to a library (data.storage_options): keys are text
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r} (write e.g. {key}={{a: 1}})")
        return {str(k): _unwrap(v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string; accept any text that is a plain number
            try:
                return float(value) if isinstance(value, str) else _fail_float(key, value)
            except ValueError:
                _fail_float(key, value)
        return float(value)
    if tp is str:
        if raw_text is not None:
            return raw_text.strip()
        if not isinstance(value, str):
            raise UserError(f"config key '{key}': expected text, got {value!r} (quote it in YAML)")
        return value
    raise TypeError(f"config field '{key}' has an unsupported type {tp}")  # a bug in a config class, not user input


def _unwrap(value: Any) -> Any:
    """Plain values from overrides' `_RawText`s, at any depth (a.b.c=1 nests mappings)."""
    if isinstance(value, _RawText):
        value = value.value
    if isinstance(value, dict):
        return {str(k): _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


def _fail_float(key: str, value: Any) -> float:
    raise UserError(f"config key '{key}': expected a number, got {value!r}")


def _validate_tree(config: Any) -> None:
    for field in dataclasses.fields(config):
        child = getattr(config, field.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child)
    if hasattr(config, "validate"):
        config.validate()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
