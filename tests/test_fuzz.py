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
        from jaxft.config.load import NONEMPTY

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


# ---------------------------------------------------------------- data


KEYS = ["messages", "conversations", "prompt", "completion", "chosen", "rejected", "text", "instruction",
        "output", "input", "role", "content", "from", "value", "system"]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", ""]


def _text(rng):
    """Random Unicode: words, control characters, lone surrogates, astral and combining characters."""
    parts = []
    for _ in range(rng.randint(0, 6)):
        kind = rng.random()
        if kind < 0.4:
            parts.append(rng.choice(["hello", "4", " ", "\n\n\n", "\t", "<|im_end|>", "{{ x }}", "{%", "é", "🕰"]))
        elif kind < 0.55:
            parts.append(chr(rng.randint(0, 31)))  # control characters, NUL included
        elif kind < 0.7:
            parts.append(chr(rng.randint(0xD800, 0xDFFF)))  # a lone surrogate (JSON "\udXXX")
        else:
            parts.append(chr(rng.choice([rng.randint(0x80, 0x7FF), rng.randint(0x10000, 0x10FFFF),
                                         rng.randint(0x300, 0x36F)])))
    return "".join(parts)


def _value(rng, depth=0):
    """A random JSON value of any type and shape (deep nesting now and then)."""
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([None, True, False, 0, -1, 10**30, 1.5, float("nan"), float("inf"), _text(rng),
                           _text(rng)])
    if r < 0.45:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if r < 0.55:
        return [{"role": rng.choice(ROLES), "content": _value(rng, depth + 2) if rng.random() < 0.3 else _text(rng)}
                for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS + [_text(rng)]): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _mutate(rng, row):
    """A valid row with one field replaced by a random value."""
    row = json.loads(json.dumps(row))
    key = rng.choice(list(row))
    row[key] = _value(rng)
    return row


VALID_SFT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
             {"prompt": "2+2?", "completion": "4"}, {"instruction": "Say hi", "input": "", "output": "hi"},
             {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
             {"text": "plain text"}]
VALID_PAIRS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
               {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]


def _line(rng, valid):
    """One line of a fuzzed JSONL file (bytes)."""
    r = rng.random()
    if r < 0.2:
        return json.dumps(rng.choice(valid)).encode()
    if r < 0.35:  # valid shape, random text (control characters, NUL, surrogates) in every string but roles
        from jaxft.data.prepare import map_strings

        row = map_strings(rng.choice(valid), lambda t: t if t in ROLES else _text(rng) + "x")
        return json.dumps(row).encode()
    if r < 0.5:
        return json.dumps(_mutate(rng, rng.choice(valid))).encode()
    if r < 0.7:
        return json.dumps(_value(rng)).encode()  # lone surrogates become "\udXXX" escapes
    if r < 0.8:
        n = rng.randint(1, 3000)
        return (rng.choice("[{") * n).encode() + rng.choice([b"", b"]" * n, b"1"])  # deep, maybe unclosed
    if r < 0.9:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 40))).replace(b"\n", b"")  # random bytes
    line = json.dumps(rng.choice(valid)).encode()
    cut = rng.randint(0, len(line))
    return line[:cut] + bytes([rng.randint(0, 255)]) + line[cut + 1:]  # one byte flipped


def _fuzz_file(tmp_path, rng, name, valid, n=120):
    """A file of n fuzzed rows around one valid format (so that "auto" picks it and many rows are used)."""
    valid = [rng.choice(valid)]
    lines = [_line(rng, valid) for _ in range(n)]
    path = tmp_path / name
    if name.endswith(".json"):  # a JSON array: elements that json can at least delimit
        decodable = [x for x in lines if _decodes(x)]
        path.write_bytes(b"[" + b",\n".join(decodable) + b"]")
        return path, len(decodable)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, sum(1 for x in path.read_bytes().split(b"\n") if x.strip())  # a flipped byte may be a newline


def _decodes(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
        return True
    except RecursionError:  # too deep for json: a bad row of the array if its brackets close
        return set(line) == set(b"[]") and line.count(b"[") == line.count(b"]")
    except ValueError:
        return False


def _counted(report) -> bool:
    return report.rows == report.examples + report.skipped + report.dropped


@pytest.fixture(scope="module")
def tok():
    from tiny import example_tokenizer

    return example_tokenizer()


@pytest.mark.parametrize("seed", range(6))
def test_data_fuzz_load_examples(tmp_path, tok, seed):
    from jaxft.config import DataConfig
    from jaxft.data.encode import load_examples

    rng = random.Random(seed)
    for name in ("train.jsonl", "train.json"):
        path, rows = _fuzz_file(tmp_path, rng, name, VALID_SFT)
        for fmt in ("auto", rng.choice(["messages", "prompt_completion", "alpaca", "sharegpt", "text"])):
            cfg = DataConfig(train=str(path), format=fmt, max_length=rng.choice([8, 64, 1024]),
                             overlong=rng.choice(["truncate", "drop"]), system_prompt=rng.choice([None, "Be brief."]))
            try:
                examples, report = load_examples(cfg, tok)
            except JaxftError as e:  # allowed: nothing usable in the file, said in one line
                assert "\n" not in str(e) and "no usable rows" in str(e), str(e)
                continue
            assert report.rows == rows and _counted(report) and len(examples) == report.examples
            assert all(len(e.tokens) <= cfg.max_length and e.loss_mask.any() for e in examples)


@pytest.mark.parametrize("seed", range(3))
def test_data_fuzz_load_pairs(tmp_path, tok, seed):
    from jaxft.config import DataConfig, DpoConfig
    from jaxft.data.pairs import load_pairs

    rng = random.Random(100 + seed)
    for name in ("pairs.jsonl", "pairs.json"):
        path, rows = _fuzz_file(tmp_path, rng, name, VALID_PAIRS)
        try:
            pairs, report = load_pairs(DataConfig(train=str(path), max_length=rng.choice([16, 256])), DpoConfig(), tok)
        except JaxftError as e:
            assert "\n" not in str(e) and "no usable preference pairs" in str(e), str(e)
            continue
        assert report.rows == rows and _counted(report) and len(pairs) == report.examples


@pytest.mark.parametrize("seed", range(3))
def test_data_fuzz_prepare(tmp_path, seed, capsys):
    from jaxft.data.prepare import prepare

    rng = random.Random(200 + seed)
    inputs, rows = [], 0
    for name in ("a.jsonl", "b.json"):
        path, n = _fuzz_file(tmp_path, rng, name, VALID_SFT)
        inputs.append(str(path))
        rows += n
    counts = prepare(inputs, str(tmp_path / "out"), validation_fraction=0.2, seed=seed, near_dup_threshold=0.8)
    assert counts["read"] == rows
    assert rows == sum(counts[k] for k in ("bad", "empty", "exact_dups", "near_dups", "train", "validation"))
    written = [json.loads(line) for f in ("train.jsonl", "validation.jsonl")
               for line in (tmp_path / "out" / f).read_text(encoding="utf-8").splitlines()]
    assert len(written) == counts["train"] + counts["validation"]
