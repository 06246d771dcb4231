"""YAML files and `section.key=value` overrides → a validated RunConfig.

    run = load_config("configs/sft_lora.yaml", ["train.steps=10", "lora.r=8"])

An unknown key, a wrong type or an impossible value is a one-line JaxftError naming the key (and the file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxft.config.checks import check_number, validate
from jaxft.config.run import RunConfig
from jaxft.config.sections import show
from jaxft.errors import JaxftError

# paths / addresses: "" would silently mean the current directory
NONEMPTY = ("model.path", "train.out_dir", "data.validation", "eval.file", "lora.init_adapter", "dpo.cache_dir",
            "mesh.coordinator_address", "ppo.reward_model", "cai.out_dir")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """value (from YAML or a key=value string) → type tp, or a JaxftError naming the key.

    Numbers are also checked by `_check_number` (see there)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if not isinstance(value, (str, int, float)) or value not in args:
            raise JaxftError(f"{key}: {show(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple and dataclasses.is_dataclass(args[0]):  # a list of sections (adapters:)
        if not isinstance(value, (list, tuple)):
            raise JaxftError(f"{key}: expected a list of mappings, got {show(value)}")
        return tuple(_build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value))
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise JaxftError(f"{key}: expected a list, got {show(value)}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise JaxftError(f"{key}: expected true or false, got {show(value)}")
        return value
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:  # not a number, or an integer of more than 4300 digits
                raise JaxftError(f"{key}: expected {what}, got {show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int if tp is int else (int, float)):
            raise JaxftError(f"{key}: expected {what}, got {show(value)}")
        try:
            value = tp(value)
        except OverflowError:  # float() of an integer beyond 1.8e308
            raise JaxftError(f"{key}: {show(value)} is out of range") from None
        check_number(value, key)
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise JaxftError(f"{key}: expected a string, got {show(value)}")
        value = str(value)
        if "\0" in value:
            raise JaxftError(f"{key}: contains a NUL character")
        if not value and key in NONEMPTY:
            raise JaxftError(f"{key}: is empty (give a value, or null where the key allows it)")
        return value
    raise TypeError(f"unhandled config type {tp}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise JaxftError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in fields)  # str: YAML keys may be numbers
    if unknown:
        raise JaxftError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: str):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise JaxftError(f"{dotted}: {p} is not a section")
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a >4300-digit int, deep nesting):
        node[leaf] = value                                # keep the text; the key's type check reports it


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + `section.key=value` overrides → a validated RunConfig."""
    tree: dict = {}
    where = ""
    if path is not None:
        p = Path(path)
        where = f"{p}: "
        if not p.is_file():
            raise JaxftError(f"{p}: no such config file")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JaxftError(f"{p}: invalid YAML ({first[:200]})") from None
    for o in overrides:
        if "=" not in o:
            raise JaxftError(f"override {o!r}: expected section.key=value")
        k, v = o.split("=", 1)
        _set(tree, k.strip(), v)
    try:
        run = _build(RunConfig, tree, "")
        validate(run)
    except JaxftError as e:
        raise JaxftError(f"{where}{e}") from None
    return run


def read_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A run's config: a YAML file, or a run directory (the resolved config.json it wrote, which YAML reads)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise JaxftError(f"{p}: not a run directory (no config.json)")
        p = p / "config.json"
    return load_config(p, overrides)
