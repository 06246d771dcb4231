"""YAML files and `section.key=value` overrides → a validated RunConfig.

    run = load_config("configs/sft_lora.yaml", ["train.steps=10", "lora.r=8"])

An unknown key, a wrong type or an impossible value is a one-line JaxftError naming the key (and the file).

YAML is read strictly (`read_yaml`), refusing what PyYAML silently accepts but a user rarely means:
- a key given twice in one mapping (PyYAML keeps the last): an error naming both lines;
- merge keys (`<<: *defaults`): the explicit keys silently win over the merged ones, and a merged key has no
  line of its own to name in an error; refused (anchors and aliases of values are fine, but their expansion
  is bounded: `&a [*a]` or a "billion laughs" file is an error, not a hang);
- several documents (`---`), a tab where YAML wants spaces: one line naming the line and column.
Scalars resolve as YAML 1.2 (the core schema, what JSON, ruamel, Go and most current tools use), not 1.1:
`yes` / `no` / `on` / `off` are strings, `1e-3` is a number, `010` is ten and `12:30` is text, not 750.
Then each key's type decides: a bool key accepts true / false / yes / no / on / off (its meaning is not in
doubt there); a string key keeps the text as written — `system_prompt: No` is the text "No" (YAML 1.1
would make it False, which the key would then refuse), `model.path: 1.10` is "1.10", not "1.1"; a
number key accepts `1e-3` (users write it; PyYAML alone reads it as a string).
"""

from __future__ import annotations

import dataclasses
import math
import re
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
NONEMPTY = ("model.path", "train.out_dir", "data.validation", "eval.file", "eval.regression_file", "lora.init_adapter",
            "eval.regression_text", "dpo.cache_dir", "mesh.coordinator_address", "ppo.reward_model", "cai.out_dir")
MAX_YAML_NODES = 100_000  # values after alias expansion: a run config has a few hundred


class _Number:
    """A number as YAML wrote it (`1.10`, `0x1F`): a string key keeps the text, not str(number)."""

    text: str


class _Int(_Number, int):
    pass


class _Float(_Number, float):
    pass


def _number(cls, value: float | int, text: str):
    out = cls(value)
    out.text = text
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars (see the module docstring)."""

    yaml_implicit_resolvers: dict = {}


for _first, _pairs in yaml.SafeLoader.yaml_implicit_resolvers.items():  # keep null, merge (refused later) and str
    _Loader.yaml_implicit_resolvers[_first] = [(t, r) for t, r in _pairs if t.rsplit(":", 1)[-1] in ("null", "merge")]
for _tag, _regexp, _firsts in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|"
                  r"\.(?:nan|NaN|NAN))$", "-+.0123456789")):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_regexp), list(_firsts))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    base = 16 if text.startswith("0x") else 8 if text.startswith("0o") else 10
    try:
        return _number(_Int, int(text[2:] if base != 10 else text, base), text)
    except ValueError:  # an explicit !!int tag on something else, or a >4300-digit number
        raise JaxftError(f"line {node.start_mark.line + 1}: {show(text)} is not an integer") from None


def _construct_float(loader, node):
    text = loader.construct_scalar(node)
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    try:
        return _number(_Float, special.get(text.lower(), None) or float(text), text)
    except ValueError:
        raise JaxftError(f"line {node.start_mark.line + 1}: {show(text)} is not a number") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _check_nodes(root) -> None:
    """Duplicate keys, merge keys and alias expansion, each a JaxftError naming the line and the key. A node's
    path is kept as a chain (parent, key) and spelled out only for an error: a recursive alias nests deep."""
    seen, stack = 0, [(root, None)]
    while stack:
        node, chain = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise JaxftError(f"line {node.start_mark.line + 1}: more than {MAX_YAML_NODES} values once aliases are "
                             "expanded (an alias that refers to itself, or aliases of aliases); write the values out")
        if isinstance(node, yaml.SequenceNode):
            stack += [(v, (chain, i)) for i, v in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first: dict = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if k.tag == "tag:yaml.org,2002:merge":
                    raise JaxftError(f"line {line}: {_spell((chain, '<<'))}: merge keys are not read (keys written "
                                     "next to them silently win over the merged ones); write the keys out")
                if key is not None and key in first:
                    raise JaxftError(f"line {line}: {_spell((chain, key))}: given twice (first on line {first[key]}); "
                                     "YAML would silently keep the last")
                first[key] = line
                stack.append((v, (chain, key)))


def _spell(chain) -> str:
    """(((None, "train"), "steps")) → "train.steps"; list items as [i]."""
    parts = []
    while chain is not None:
        chain, key = chain
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".")[:200]


def _yaml_error(e: Exception) -> str:
    """A PyYAML error as 'line L, column C: what' (its first message line says where it was, not what)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    if "'\\t'" in problem or "\t" in problem:
        problem = "a tab character; YAML indents and separates with spaces"
    elif "expected a single document" in (getattr(e, "context", None) or ""):
        problem = "a second YAML document ('---'); a run config is one document"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"[:200]


def read_yaml(text: str | bytes, where: str, invalid: str = "invalid YAML"):
    """One YAML document → Python values, strictly (module docstring); JaxftError '<where>: ...' otherwise
    ('<where>: <invalid> (line L, column C: ...)' for what is not YAML at all). None for an empty document."""
    loader = None
    try:
        loader = _Loader(text)  # reads the encoding (a BOM, UTF-16) and the first bytes: may fail already
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except JaxftError as e:
        raise JaxftError(f"{where}: {e}") from None
    except (yaml.YAMLError, ValueError, RecursionError, UnicodeDecodeError) as e:
        raise JaxftError(f"{where}: {invalid} ({_yaml_error(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()


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
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
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
        value = value.text if isinstance(value, _Number) else str(value)
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
    """tree[a][b]... = value for the override `a.b...=value`; `adapters.0.lr` (or `adapters[0].lr`) reaches into
    a list of sections."""
    *parents, leaf = re.sub(r"\[(\d+)\]", r".\1", dotted).split(".")
    node = tree
    for i, p in enumerate(parents):
        where = ".".join(parents[:i + 1])
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                raise JaxftError(f"{dotted}: {'.'.join(parents[:i]) or 'config'} is a list of {len(node)}; "
                                 f"{p!r} is not one of its indices (0 to {len(node) - 1})")
            node = node[int(p)]
        elif isinstance(node, dict):
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise JaxftError(f"{dotted}: {where} is not a section")
    if isinstance(node, list):
        raise JaxftError(f"{dotted}: {'.'.join(parents)} is a list; set one of its items' keys "
                         f"({'.'.join(parents)}.0.KEY=...)")
    try:
        node[leaf] = read_yaml(value, f"override {dotted}") if value.strip() else ""
    except JaxftError:  # not YAML (or a >4300-digit int, deep nesting): keep the text; the key's type check
        node[leaf] = value  # reports it


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
            text = p.read_bytes()
        except OSError as e:
            raise JaxftError(f"{p}: cannot read ({e.strerror})") from None
        tree = read_yaml(text, str(p))
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise JaxftError(f"{p}: expected a mapping of sections (model:, data:, train:, ...) at the top, got "
                             f"{show(tree)}")
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
