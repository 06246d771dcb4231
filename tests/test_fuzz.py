"""Seeded fuzz tests of everything a user feeds in: config overrides and data files.

Config: every field of RunConfig, found by walking the dataclasses (a new field is covered without
editing this file), gets wrong types, out-of-range, NaN/inf, empty and huge values as `key=value`
overrides; each must be a one-line JaxftError naming the key, never another exception.
Data: random bytes, random JSON shapes and depths, random Unicode (lone surrogates, control
characters) and random field types through load_examples, load_pairs and prepare: never an
uncaught exception, and every row read is either used or counted.
"""

import dataclasses
import json
import random
import types
import typing
from typing import Literal

import pytest

from jaxft.config import RunConfig, load_config
from jaxft.errors import JaxftError


def leaves(cls=RunConfig, prefix=""):
    """(dotted key, type) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner, True
    return tp, False


NOT_A_SCALAR = ["[1, 2]", "{a: 1}", "[" * 1000]  # a list, a mapping, nesting too deep for YAML's parser (RecursionError)
NON_FINITE = [".nan", "nan", ".inf", "inf", "-.inf", "-inf", "1e400"]
HUGE_INT = [str(10**30), "1" * 5000, str(-10**30)]


def bad_values(key, tp):
    """Values the key must refuse. Numbers: every numeric key has a range that excludes -1e9."""
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if tp is int:
        return [*NOT_A_SCALAR, "", "abc", "1.5", "true", *NON_FINITE, *HUGE_INT, "-1000000000"]
    if tp is float:
        return [*NOT_A_SCALAR, "", "abc", "true", *NON_FINITE, "-1000000000", "-1e9"]
    if tp is bool:
        return [*NOT_A_SCALAR, "", "maybe", "2", "-1"]
    if origin is Literal:
        return [*NOT_A_SCALAR, "", "nope", "1", "true"]
    if origin is tuple:
        return ["{a: 1}", "[[a]]", "[{a: 1}]", "[" * 1000 + "a", "not_a_module"]
    if tp is str:
        from jaxft.config import NONEMPTY

        return ["[1, 2]", "{a: 1}", "a\0b", *([""] if key in NONEMPTY else [])]
    raise AssertionError(f"{key}: no fuzz values for type {tp} — add them here")


CASES = [(key, v) for key, tp in leaves() for v in bad_values(key, tp)]


def test_every_field_is_enumerated():
    keys = [k for k, _ in leaves()]
    assert len(keys) == len(set(keys)) > 60 and "train.log_every" in keys and "mesh.process_id" in keys


@pytest.mark.parametrize("key", sorted({k for k, _ in CASES}))
def test_config_fuzz_one_line_error_naming_the_key(key):
    for v in [v for k, v in CASES if k == key]:
        try:
            load_config(None, [f"{key}={v}"])
        except JaxftError as e:
            msg = str(e)
            assert key in msg and "\n" not in msg and len(msg) < 400, (key, v[:40], msg[:500])
        else:
            raise AssertionError(f"{key}={v[:40]!r} was accepted")


def test_config_fuzz_random_overrides_and_yaml(tmp_path):
    """Random pairs of (key, bad value) and random YAML files: a JaxftError or a valid config, nothing else."""
    rng = random.Random(0)
    for _ in range(200):
        picks = rng.sample(CASES, 2)
        with pytest.raises(JaxftError) as e:
            load_config(None, [f"{k}={v}" for k, v in picks])
        assert "\n" not in str(e.value)
    junk = ["train: [unclosed", "1: 2\n3: 4", "- a\n- b", "train:\n  steps: !!python/object:os.system x",
            "\x00\x01", "train: {steps: " + "[" * 2000, "train:\n  steps: " + "9" * 5000, "a: &a [*a]"]
    for i, text in enumerate(junk):
        f = tmp_path / f"c{i}.yaml"
        f.write_text(text)
        with pytest.raises(JaxftError) as e:
            load_config(f)
        assert "\n" not in str(e.value) and str(f) in str(e.value)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(JaxftError, match="bin.yaml"):
        load_config(tmp_path / "bin.yaml")
