"""Seeded fuzz of every file reader: safetensors (one file, shards and their index), GGUF, PEFT adapter
directories, Orbax checkpoints (a run's checkpoints/), YAML / JSON run configs, constitutions, and the
merge-adapters / --adapter sources.

Each good file is damaged in the ways users' disks, downloads and editors damage files: truncated at random
offsets, bits flipped at random (in the header, where the reader's decisions come from, and anywhere),
the magic replaced, and headers whose sizes, offsets and counts lie (a header claiming 2**60 tensors, a
string of 2**60 bytes, a tensor past the end of the file, two tensors sharing bytes, a key given twice).
Every read must then either succeed or end in one `JaxftError` of one line naming the file; any other
exception fails the test, and so does a read taking more than `SLOW` seconds (a hang, or an allocation
of what a header claims). A read that succeeds on a damaged header, or on a damaged checkpoint, must give
the very values of the undamaged file (never a silent wrong model). Flips inside the tensor data of a
safetensors / GGUF / PEFT file, or inside a value of a text file (alpha 8 → 9), make another valid file:
those formats carry no checksums, so such a read is only required not to crash.

Seeds: random.Random(SEED + k) per format (k below); about 40 damaged files per format, tiny files, in-process
reads, plus a few end-to-end runs of `jaxft` in a subprocess (exit 2, one `jaxft: error:` line, no traceback).
"""

import json
import random
import shutil
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import JaxftError
from tiny import ROOT, run_cli, save_model

SEED = 30  # issue 30
SLOW = 20.0  # seconds one read may take on a shared 2-core machine (the reads here take well under 1 s)


def outcome(fn, *names):
    """("ok", value) or ("error", message) for a one-line JaxftError naming one of `names`; any other exception
    (or a read slower than SLOW) fails the test."""
    t0 = time.perf_counter()
    try:
        value = fn()
        got = ("ok", value)
    except JaxftError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg[:800]
        assert any(str(n) in msg for n in names), f"{msg!r} names none of {names}"
        got = ("error", msg)
    assert time.perf_counter() - t0 < SLOW, f"took {time.perf_counter() - t0:.1f}s"
    return got


def damaged(data: bytes, rng: random.Random, header: int, cuts: int = 5, flips: int = 10):
    """(label, bytes, touches only the header) of `data` truncated, flipped (half in the first `header` bytes)
    and with its first four bytes replaced."""
    out = [(f"truncated at {k}", data[:k], False) for k in sorted(rng.sample(range(len(data)), cuts))]
    for i in range(flips):
        b, where = bytearray(data), header if i % 2 == 0 else len(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(where)] ^= 1 << rng.randrange(8)
        out.append((f"{'header ' if where == header else ''}flip {i}", bytes(b), where == header))
    out.append(("wrong magic", b"\x00JX!" + data[4:], True))
    return out


def same_tree(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---------------------------------------------------------------- safetensors (+ the shard index)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    save_model("llama", d)
    return d


def _load(d):
    from jaxft.formats.hf import load_pretrained

    model = load_pretrained(d)
    return jax.tree.map(np.asarray, jax.tree.leaves(model))


def _st_lies(data: bytes) -> list[tuple[str, bytes]]:
    """safetensors files whose header lies, built from a good one."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    name = next(k for k in header if k != "__metadata__")

    def with_header(h, raw=None):
        text = raw if raw is not None else json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + body

    def edit(**changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return with_header(h)

    other = next(k for k in header if k not in ("__metadata__", name) and header[k]["shape"] == header[name]["shape"])
    overlap = json.loads(json.dumps(header))
    overlap[other]["data_offsets"] = header[name]["data_offsets"]
    text = json.dumps(header).encode()
    return [("header length 2**60", struct.pack("<Q", 2**60) + data[8:]),
            ("header length one past the file", struct.pack("<Q", len(data) - 7) + data[8:]),
            ("header length 0", struct.pack("<Q", 0) + data[8:]),
            ("shape 2**40 x 2**40", edit(shape=[2**40, 2**40])), ("negative shape", edit(shape=[-1, 64])),
            ("shape of strings", edit(shape=["64"])), ("end before begin", edit(data_offsets=[100, 0])),
            ("end past the file", edit(data_offsets=[0, 2**62])), ("offsets of floats", edit(data_offsets=[0.0, 4.5])),
            ("dtype I64", edit(dtype="I64")), ("dtype missing", with_header({**header, name: {"shape": [1]}})),
            ("entry not an object", with_header({**header, name: [1, 2]})),
            ("header is a list", with_header(None, b"[1, 2, 3]")),
            ("metadata not strings", with_header({**header, "__metadata__": {"format": 5}})),
            ("two tensors share bytes", with_header(overlap)),
            ("a key given twice", with_header(None, text[:-1] + b", " + json.dumps(name).encode() + b": "
                                              + json.dumps(header[name]).encode() + b"}")),
            ("header not UTF-8", with_header(None, b'{"\xff\xfe": 1}')),
            ("header nested 100000 deep", with_header(None, b"[" * 100000 + b"]" * 100000))]


def test_fuzz_safetensors_model(tiny_hf, tmp_path):
    rng = random.Random(SEED)
    good = _load(tiny_hf)
    data = (tiny_hf / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cases = damaged(data, rng, header_end) + [(label, b, True) for label, b in _st_lies(data)]
    results = {}
    for i, (label, b, in_header) in enumerate(cases):
        d = tmp_path / f"m{i}"
        shutil.copytree(tiny_hf, d)
        (d / "model.safetensors").write_bytes(b)
        kind, value = outcome(lambda: _load(d), d / "model.safetensors", d)
        if kind == "ok" and in_header:
            assert same_tree(value, good), f"{label}: loaded, with other values"
        results[label] = kind
        shutil.rmtree(d)
    assert sum(k == "error" for k in results.values()) >= len(_st_lies(data)), results


def test_fuzz_safetensors_shard_index(tiny_hf, tmp_path):
    """A sharded checkpoint: its index damaged or lying (shards outside the directory, missing, a tensor in
    the wrong shard, a weight_map that is not one)."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_hf).save_pretrained(sharded, max_shard_size="200KB")
    index = sharded / "model.safetensors.index.json"
    good, text = _load(sharded), index.read_bytes()
    wm = json.loads(text)["weight_map"]
    first = next(iter(wm))
    lies = [json.dumps(x).encode() for x in (
        [1, 2], {"weight_map": [1]}, {"weight_map": {first: 5}}, {"weight_map": {**wm, first: "../outside"}},
        {"weight_map": {**wm, first: ""}}, {"weight_map": {**wm, first: "nope.safetensors"}},
        {"weight_map": {**wm, first: next(v for v in wm.values() if v != wm[first])}}, {})]
    rng = random.Random(SEED + 1)
    cases = [(label, b) for label, b, _ in damaged(text, rng, len(text))] + [(f"lie {i}", b) for i, b in enumerate(lies)]
    for label, b in cases:
        index.write_bytes(b)
        kind, value = outcome(lambda: _load(sharded), index, sharded)
        if kind == "ok":  # a flip in a name's spelling the map does not use, or in JSON whitespace
            assert same_tree(value, good), f"{label}: loaded, with other values"
    index.write_bytes(text)


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_gguf import tiny_tensors, write_gguf

    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_tensors()[1])


def _gguf_offsets(path):
    """(byte offset of the tensor count, of the kv count, of the first KV's key length, of a string array's
    length, of the first tensor's dims, of its offset, where the tensor data starts)."""
    import gguf

    r = gguf.GGUFReader(path)
    arr = next(f for f in r.fields.values() if f.types and f.types[0] == gguf.GGUFValueType.ARRAY) \
        if any(f.types and f.types[0] == gguf.GGUFValueType.ARRAY for f in r.fields.values()) else None
    first_kv = next(f for k, f in r.fields.items() if not k.startswith("GGUF."))
    t = r.tensors[0].field
    return dict(tensor_count=8, kv_count=16, key_length=first_kv.offset,
                value_type=first_kv.offset + 8 + len(first_kv.name.encode()),
                array_length=None if arr is None else arr.offset + 8 + len(arr.name.encode()) + 4 + 4,
                dims=t.offset + 8 + len(t.name.encode()) + 4,
                tensor_offset=t.offset + 8 + len(t.name.encode()) + 4 + 8 * int(t.parts[2][0]) + 4,
                data=r.data_offset)


def _gguf_lies(path) -> list[tuple[str, bytes]]:
    data, o = path.read_bytes(), _gguf_offsets(path)

    def put(offset, value, fmt="<Q"):
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    lies = [("2**60 tensors", put(o["tensor_count"], 2**60)), ("2**60 metadata keys", put(o["kv_count"], 2**60)),
            ("a key of 2**60 bytes", put(o["key_length"], 2**60)),
            ("a tensor of 2**40 x 2**40 values", put(o["dims"], 2**40)),
            ("a tensor past the end", put(o["tensor_offset"], 2**40)),
            ("a tensor offset not aligned", put(o["tensor_offset"], 3)),
            ("version 9", put(4, 9, "<I")), ("a value type 99", put(o["value_type"], 99, "<I")),
            ("no tensor data", data[:o["data"]])]
    if o["array_length"] is not None:
        lies.append(("an array of 2**60 items", put(o["array_length"], 2**60)))
    return lies


def test_fuzz_gguf(tiny_gguf, tmp_path):
    from jaxft.formats.gguf import GGUFSource

    rng = random.Random(SEED + 2)
    good = _load(tiny_gguf)
    data = tiny_gguf.read_bytes()
    cases = damaged(data, rng, _gguf_offsets(tiny_gguf)["data"]) + [(label, b, True) for label, b in _gguf_lies(tiny_gguf)]
    errors = 0
    for i, (label, b, in_header) in enumerate(cases):
        path = tmp_path / f"g{i}.gguf"
        path.write_bytes(b)
        kind, value = outcome(lambda: _load(path), path)
        if kind == "ok" and in_header:
            assert same_tree(value, good), f"{label}: loaded, with other values"
        errors += kind == "error"
        kind, _ = outcome(lambda: GGUFSource(path).keys(), path)
        path.unlink()
    assert errors >= len(_gguf_lies(tiny_gguf))


def test_fuzz_gguf_tokenizer(tmp_path):
    """The tokenizer a GGUF carries (what `jaxft generate x.gguf` reads besides the weights), its metadata
    damaged: a one-line error or a tokenizer, never a traceback."""
    from jaxft.formats.gguf import load_gguf_tokenizer
    from tiny import save_tiny_gguf

    (tmp_path / "good").mkdir()
    path = tmp_path / "good" / "tiny.gguf"
    save_tiny_gguf(path)
    data = path.read_bytes()
    rng = random.Random(SEED + 3)
    lies = [(label, b, True) for label, b in _gguf_lies(path) if "array" in label]
    assert lies  # the tokenizer's arrays: tokens, merges, types
    for _label, b, _ in damaged(data, rng, _gguf_offsets(path)["data"], cuts=3, flips=8) + lies:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b)
        outcome(lambda: load_gguf_tokenizer(bad), bad)


# ---------------------------------------------------------------- PEFT adapter directories (+ merge-adapters)


@pytest.fixture(scope="module")
def adapter_dir(tiny_hf, tmp_path_factory):
    from jaxft import adapters
    from jaxft.config import LoraConfig
    from jaxft.formats.hf import load_pretrained
    from jaxft.formats.peft import export_adapter

    model = load_pretrained(tiny_hf)
    cfg = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    adapters.attach(model, cfg, jax.random.key(0))
    for i, (_, lin) in enumerate(adapters.targets(model, cfg.target_modules)):
        lin.adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), lin.adapter.b.shape)
    return export_adapter(model, cfg, tmp_path_factory.mktemp("peft") / "adapter", base_model=str(tiny_hf))


PEFT_CONFIG_LIES = [[1], {"peft_type": 5}, {"peft_type": "LOHA"}, {"r": "2"}, {"r": True}, {"r": 2**62}, {"r": 0},
                    {"lora_alpha": "4"}, {"lora_alpha": float("nan")}, {"lora_dropout": 2}, {"target_modules": 5},
                    {"target_modules": [1, 2]}, {"use_rslora": "yes"}, {"base_model_name_or_path": 7},
                    {"target_modules": None, "r": None}]


def test_fuzz_peft_adapter(adapter_dir, tiny_hf, tmp_path, capsys):
    from jaxft import adapters
    from jaxft.cli import main
    from jaxft.formats.hf import load_pretrained
    from jaxft.formats.peft import load_adapter, read_adapter

    st, cfg = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    st_data, cfg_data = st.read_bytes(), cfg.read_bytes()
    good = read_adapter(adapter_dir)[1]
    rng = random.Random(SEED + 4)
    cases = [("adapter_model.safetensors", label, b, h) for label, b, h in
             damaged(st_data, rng, 8 + struct.unpack("<Q", st_data[:8])[0])]
    cases += [("adapter_model.safetensors", label, b, True) for label, b in _st_lies(st_data)]
    cases += [("adapter_config.json", label, b, False) for label, b, _ in damaged(cfg_data, rng, len(cfg_data))]
    base = json.loads(cfg_data)
    cases += [("adapter_config.json", f"lie {x}", json.dumps(x if isinstance(x, list) else {**base, **x}).encode(), False)
              for x in PEFT_CONFIG_LIES]
    model = load_pretrained(tiny_hf)
    for i, (fname, label, b, in_header) in enumerate(cases):
        d = tmp_path / f"a{i}"
        shutil.copytree(adapter_dir, d)
        (d / fname).write_bytes(b)
        kind, value = outcome(lambda: read_adapter(d), d / fname)
        if kind == "ok":
            for _, lin in adapters.targets(model, ("all-linear",)):
                lin.adapter = None
            loaded, _ = outcome(lambda: load_adapter(model, d), d)
            if in_header and loaded == "ok":  # a damaged header may rename a tensor: then loading it fails
                assert value[1].keys() == good.keys() and same_tree(value[1], good), f"{label}: other values"
        if i % 4 == 0:  # merge-adapters reads the same directories (no model needed): one line, exit 2
            rc = main(["merge-adapters", str(d), str(adapter_dir), "--weights", "1", "1", "--method", "linear",
                       "--out", str(tmp_path / f"merged{i}")])
            err = capsys.readouterr().err
            assert rc == (0 if kind == "ok" else 2), (label, err)
            if rc == 2:
                lines = [x for x in err.splitlines() if x.startswith("jaxft: error:")]
                assert len(lines) == 1 and str(d) in lines[0], err
        shutil.rmtree(d)


def test_fuzz_adapter_sources(adapter_dir, tiny_hf, tmp_path):
    """--adapter NAME=DIR / DIR: PEFT folders and run folders with damaged files."""
    from jaxft import runs
    from jaxft.formats.hf import load_pretrained

    model = load_pretrained(tiny_hf)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    rng = random.Random(SEED + 5)
    text = json.dumps({"model": {"path": str(tiny_hf)}, "train": {"out_dir": str(run)}}).encode()
    for _label, b, _ in damaged(text, rng, len(text), cuts=4, flips=6):
        (run / "config.json").write_bytes(b)
        outcome(lambda: runs.load_bank(model, [str(run)], base=str(tiny_hf)), run)
    d = tmp_path / "peft"
    shutil.copytree(adapter_dir, d)
    (d / "adapter_config.json").write_text("{")
    outcome(lambda: runs.load_bank(model, [f"x={d}"], base=str(tiny_hf)), d)


# ---------------------------------------------------------------- Orbax checkpoints


def _state():
    k = jax.random.split(jax.random.key(SEED), 3)
    params = {"q": {"a": jax.random.normal(k[0], (3, 128, 8)), "b": jax.random.normal(k[1], (3, 8, 128))},
              "v": {"a": jax.random.normal(k[2], (3, 128, 8)), "b": jnp.zeros((3, 8, 128))}}
    return dict(params=params, opt_state={"mu": jax.tree.map(lambda x: x * 0.5, params)}, step=jnp.int32(4))


def test_fuzz_checkpoints(tmp_path):
    """Every file of a checkpoint damaged in turn: a restore gives the saved values or says the checkpoint is
    damaged (and `restore_latest` moves it aside and uses the previous one); never other values."""
    from jaxft.checkpoint import Checkpoints, restore_trainable

    src = tmp_path / "src"
    state, older = _state(), jax.tree.map(lambda x: x + 1 if x.dtype != jnp.int32 else x, _state())
    c = Checkpoints(src, keep=3)
    c.save(3, older, {"step": 3})
    c.save(4, state, {"step": 4})
    c.close()
    files = sorted(p for p in (src / "checkpoints" / "4").rglob("*") if p.is_file())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    rng = random.Random(SEED + 6)
    seen = {"error": 0, "ok": 0, "older": 0}
    largest = sorted(files, key=lambda p: p.stat().st_size)[-3:]  # the arrays' bytes (zstd chunks)
    for i in range(24):  # every file of the checkpoint at least once, then its largest ones again
        f = files[i] if i < len(files) else rng.choice(largest)
        d = tmp_path / f"c{i}"
        shutil.copytree(src, d)
        g = d / f.relative_to(src)
        data = g.read_bytes()
        how = rng.choice(["flip", "flip", "truncate", "empty", "delete"] if i < len(files) else ["flip"]) \
            if data else "delete"
        if how == "flip":
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            g.write_bytes(bytes(b))
        elif how == "truncate":
            g.write_bytes(data[:rng.randrange(len(data))])
        elif how == "empty":
            g.write_bytes(b"")
        else:
            g.unlink()
        kind, value = outcome(lambda: restore_trainable(d, state["params"]), d / "checkpoints")
        if kind == "ok":
            params, meta = value
            assert same_tree(params, state["params"]) if meta["step"] == 4 else same_tree(params, older["params"]), \
                f"{g} {how}: restored other values"
        kind, value = outcome(lambda: Checkpoints(d, keep=3).restore_latest(abstract), d / "checkpoints")
        assert kind == "ok" and value is not None, (g, how, value)
        restored, meta = value
        want = state if meta["step"] == 4 else older
        assert same_tree(restored, want), f"{g} {how}: restored other values"
        seen["ok" if meta["step"] == 4 else "older"] += 1
        shutil.rmtree(d)
    assert seen["older"] >= 5, seen  # damage is seen (and the previous checkpoint used)


# ---------------------------------------------------------------- YAML / JSON run configs, constitutions


def test_fuzz_run_configs(tmp_path):
    from jaxft.config import load_config, read_config

    rng = random.Random(SEED + 7)
    yaml_text = (ROOT / "configs" / "quickstart.yaml").read_bytes()
    json_text = json.dumps(load_config(ROOT / "configs" / "sft_lora.yaml").to_dict(), indent=1).encode()
    run = tmp_path / "run"
    run.mkdir()
    for text, name in ((yaml_text, "c.yaml"), (json_text, "run/config.json")):
        for _label, b, _ in damaged(text, rng, len(text), cuts=20, flips=60):
            path = tmp_path / name
            path.write_bytes(b)
            outcome(lambda: load_config(path), path)
            if name.endswith("config.json"):
                outcome(lambda: read_config(run), path)


def test_fuzz_constitutions(tmp_path):
    import yaml

    from jaxft.data.constitution import load_constitution

    rng = random.Random(SEED + 8)
    ours = (ROOT / "configs" / "constitutions" / "default.yaml").read_bytes()
    as_json = json.dumps(yaml.safe_load(ours)).encode()
    swarm = json.dumps({"constitutions": [{"critic": "Find flaws.", "revision": "Fix them."}],
                        "system_chat": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                        "feedback_principles": ["Which is kinder?"]}).encode()
    lies = [b"examples: 5\nprinciples: [{name: a, compare: b}]", b'{"constitutions": [], "system_chat": 5}',
            b'{"constitutions": [{"critic": "a", "revision": "b"}], "feedback_principles": 3}',
            b"principles:\n  - name: a\n    compare: b\n    compare: c\n", b"- 1\n- [2]\n", b"principles: {a: 1}"]
    for text, suffix in ((ours, ".yaml"), (as_json, ".json"), (swarm, ".json")):
        for _label, b, _ in damaged(text, rng, len(text), cuts=15, flips=40):
            path = tmp_path / f"c{suffix}"
            path.write_bytes(b)
            outcome(lambda: load_constitution(path), path)
    for i, b in enumerate(lies):
        path = tmp_path / f"lie{i}{'.json' if b.startswith(b'{') else '.yaml'}"
        path.write_bytes(b)
        kind, _ = outcome(lambda: load_constitution(path), path)
        assert kind == "error", b


# ---------------------------------------------------------------- the command line, end to end


def _one_error_line(rc, err, *names):
    lines = [x for x in err.splitlines() if x.startswith("jaxft: error:")]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert any(str(n) in lines[0] for n in names), lines[0]


def test_cli_damaged_files_end_in_one_line(tiny_hf, tiny_gguf, chat_model, tmp_path, capsys):
    """`jaxft` on damaged inputs: in this process (the same `main`), and once in a fresh one, what a user sees
    end to end (absl, asyncio and orbax's threads included)."""
    from jaxft.checkpoint import Checkpoints
    from jaxft.cli import main
    from jaxft.config import load_config
    from jaxft.setup import build

    def cli(*args):
        rc = main([str(a) for a in args])
        return rc, capsys.readouterr().err

    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + data[8:])
    _one_error_line(*cli("generate", d, "--prompt", "hi"), d / "model.safetensors")
    g = tmp_path / "bad.gguf"
    b = bytearray(tiny_gguf.read_bytes())
    struct.pack_into("<Q", b, 8, 2**60)
    g.write_bytes(bytes(b))
    _one_error_line(*cli("generate", g, "--prompt", "hi"), g)
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 5\n  steps: 6\n")
    _one_error_line(*cli("train", y), y)
    # a run whose only checkpoint has its arrays' bytes cut: export and merge-adapters say so in one line
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={chat_model}", f"train.out_dir={run}", "lora.r=2", "lora.alpha=4"])
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    params = build(cfg).params
    c = Checkpoints(run, keep=1)
    c.save(1, {"params": params, "step": jnp.int32(1)}, {"step": 1})
    c.close()
    for f in (run / "checkpoints" / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:-500])
    _one_error_line(*cli("merge-adapters", run, run, "--weights", "1", "1", "--method", "linear", "--out",
                         tmp_path / "m"), run / "checkpoints")
    r = run_cli("export", run, "--format", "peft", "--out", tmp_path / "x")
    _one_error_line(r.returncode, r.stderr, run / "checkpoints")
