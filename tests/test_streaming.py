"""data.streaming (jaxft.data.stream): the same batches as in memory, resumable anywhere, bad rows counted,
each process its own rows, and a file larger than an RSS budget trains within it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxft.commands.train import train
from jaxft.config import DataConfig, load_config
from jaxft.data.encode import Batches, load_examples
from jaxft.data.stream import Stream, records
from jaxft.data.task import make_examples
from jaxft.errors import JaxftError
from test_sft import _losses, _overrides, _train_cli, task_data  # noqa: F401 — a fixture
from tiny import ROOT, example_tokenizer

CFG = str(ROOT / "configs" / "sft_lora.yaml")
BAD = ['{"messages": [', '{"prompt": "only a prompt"}', '{"messages": [{"role": "user", "content": "no reply"}]}']


def _rows(n=30, seed=5):
    """Chat rows and prompt/completion rows (string and chat-style), mixed in one file."""
    rows = make_examples(n, seed=seed)
    for r in rows[::3]:
        m = r.pop("messages")
        r.update(prompt=m[0]["content"], completion=m[1]["content"])
    for r in rows[1::6]:
        m = r.pop("messages")
        r.update(prompt=[m[0]], completion=[m[1]])
    return rows


def _write(path, rows, bad=()):
    lines = [json.dumps(r) for r in rows]
    for k, b in enumerate(bad):  # bad rows spread through the file
        lines.insert(3 + 7 * k, b)
    path.write_text("\n".join(lines) + "\n")
    return path


def _blocks(stream, n):
    out = [stream.next() for _ in range(n)]
    stream.close()
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_a_stream_that_fits_one_window_gives_the_in_memory_batches(tmp_path, packing):
    """Same rows, seed and packing: the stream's batches over three epochs are those of encode.Batches, and the
    epoch's report (bad rows by reason, first errors) is load_examples' report."""
    path = _write(tmp_path / "train.jsonl", _rows(), BAD)
    cfg = DataConfig(train=str(path), max_length=256, packing=packing, seed=3, stream_window=1000)
    tok = example_tokenizer()
    examples, report = load_examples(cfg, tok)
    assert report.skipped == len(BAD)
    memory = Batches(examples, 4, 256, packing, 3)
    said = []
    got = _blocks(Stream(cfg, tok, rows=4, say=said.append), 3 * len(memory))
    for i, (block, _) in enumerate(got):
        want = memory.batch(i)
        assert block.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(block[k], want[k], err_msg=f"batch {i} {k}")
    assert said[0] == f"train data, epoch 1 (streamed): {report.summary()}"
    assert len(said) >= 2 and said[1] == said[0].replace("epoch 1", "epoch 2")  # every epoch counts alike


def test_parquet_and_saved_folders_stream_the_jsonl_rows(tmp_path):
    import datasets

    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in make_examples(12, seed=2)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    _write(tmp_path / "t.jsonl", rows)
    want = [r for r, _ in records(str(tmp_path / "t.jsonl"))]
    for name in ("t.parquet", "saved"):
        got = [r for r, _ in records(str(tmp_path / name))]
        assert [r.row for r in got] == [r.row for r in want]
        assert got[4].where == f"{tmp_path / name} row 4"
    for name in ("t.jsonl", "t.parquet", "saved"):  # from a saved position, on two processes
        path = str(tmp_path / name)
        _, at = list(records(path))[4]
        assert [r.row for r, _ in records(path, at)] == [r.row for r in want[5:]]
        halves = [[r.row for r, _ in records(path, at, p, 2)] for p in (0, 1)]
        assert halves == [[r.row for i, r in enumerate(want) if i >= 5 and i % 2 == p] for p in (0, 1)]


def test_a_stream_resumed_from_any_saved_state_goes_on_exactly(tmp_path):
    """Small windows, blocks across window and epoch ends: from each block's state a new stream (a resumed
    process) gives the rest of the same blocks."""
    path = _write(tmp_path / "train.jsonl", _rows(24), BAD)
    cfg = DataConfig(train=str(path), max_length=256, packing=True, seed=1, stream_window=5)
    tok = example_tokenizer()
    full = _blocks(Stream(cfg, tok, rows=3), 14)
    for k in (0, 3, 6, 11):
        s = Stream(cfg, tok, rows=3)
        s.restore(json.loads(json.dumps(full[k][1])))  # as a checkpoint's meta holds it
        for (block, state), (want, want_state) in zip(_blocks(s, 14 - k - 1), full[k + 1:]):
            assert state == want_state
            for key in want:
                np.testing.assert_array_equal(block[key], want[key])
    assert {b[1]["epoch"] for b in full} >= {0, 1}  # it did cross an epoch end
    other = DataConfig(**{**cfg.__dict__, "stream_window": 6})
    with pytest.raises(JaxftError, match="stream_window"):
        Stream(other, tok, rows=3).restore(full[3][1])


def test_the_global_batches_of_a_stream_on_a_mesh_are_its_blocks(tmp_path):
    """On 4 devices (each a slice of every micro-batch's rows, asked for micro-batch by micro-batch), the
    StreamSource's global batches [A, B, S] are the stream's blocks in order, and its state after step s
    is the stream's after s*A blocks."""
    from jaxft import sharding
    from jaxft.config import MeshConfig
    from jaxft.objectives.sft import StreamSource

    path = _write(tmp_path / "train.jsonl", _rows(20))
    cfg = DataConfig(train=str(path), max_length=256, stream_window=6, streaming=True)
    run = load_config(CFG, [f"data.train={path}", "data.max_length=256", "data.stream_window=6", "data.streaming=true",
                            "train.batch_size=4", "train.grad_accum=3", "data.validation=null"])
    mesh = sharding.make_mesh(MeshConfig(fsdp=4))
    tok = example_tokenizer()
    source = StreamSource(run, tok, lambda *a: None, lambda b: sharding.ShardedBatches(b, mesh))
    want = _blocks(Stream(cfg, tok, rows=4), 9)
    for step in (1, 2, 3):
        got = source(step)
        for a in range(3):
            for k, v in want[(step - 1) * 3 + a][0].items():
                np.testing.assert_array_equal(np.asarray(got[k][a]), v)
        assert source.data_state(step) == {"processes": [want[step * 3 - 1][1]]}
    source.close()


def test_each_process_streams_only_its_own_rows(tmp_path):
    path = _write(tmp_path / "train.jsonl", _rows(20), BAD)
    cfg = DataConfig(train=str(path), max_length=256, stream_window=4)
    tok = example_tokenizer()
    said = {0: [], 1: []}
    for p in (0, 1):
        _blocks(Stream(cfg, tok, rows=2, process=p, processes=2, say=said[p].append), 12)
    counts = [int(s[0].split(": ", 1)[1].split(" rows")[0]) for s in (said[0], said[1])]
    assert counts == [12, 11]  # 23 rows, 3 of them bad
    assert [r.where for r, _ in records(str(path), process=1, processes=2)] == \
        [r.where for r, _ in records(str(path))][1::2]


def test_streaming_refusals(tmp_path, chat_model):
    o = [f"model.path={chat_model}", "data.streaming=true"]
    with pytest.raises(JaxftError, match="data.streaming: objective dpo"):
        load_config(str(ROOT / "configs" / "dpo_lora.yaml"), o)
    with pytest.raises(JaxftError, match="data.streaming: cannot split data.validation_fraction"):
        load_config(CFG, [*o, "data.validation_fraction=0.1"])
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(JaxftError, match=r"a.json: data.streaming reads .jsonl"):
        next(records(str(tmp_path / "a.json")))


def test_sigkill_mid_epoch_and_resume_is_bit_exact(chat_model, task_data, tmp_path):
    """A streamed run killed at step 5 (checkpoints at 2 and 4, in the middle of an epoch and of a window)
    resumes to the uninterrupted run's losses, bit for bit; a resume without data.streaming is refused."""
    o = {"train.steps": 8, "train.save_every": 2, "data.streaming": "true", "data.stream_window": 7,
         "data.validation": "null"}
    ref = _train_cli([CFG, *_overrides(chat_model, task_data, tmp_path / "ref", **o)])
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    assert "train data: streaming" in err
    expected = _losses(tmp_path / "ref")
    run = tmp_path / "killed"
    p = _train_cli([CFG, *_overrides(chat_model, task_data, run, **o)])
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 5:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = _train_cli([CFG, *_overrides(chat_model, task_data, run, **o), "--resume"])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "resumed from" in err
    assert _losses(run) == expected  # bit-exact on CPU
    at = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())["data_state"]["processes"][0]
    assert at["epoch"] == 0 and at["window"] > 0 and at["skip"] > 0  # mid-epoch, mid-window
    with pytest.raises(JaxftError, match="holds a data position"):  # the in-memory order is another order
        train(load_config(CFG, _overrides(chat_model, task_data, run, **{**o, "data.streaming": "false",
                                                                        "train.steps": 10})), resume=True)


PEAK_RSS = ("import resource, sys; from jaxft.cli import main; code = main(sys.argv[1:]); "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _peak_rss_mb(args) -> float:
    """Peak RSS of `jaxft train args`, compiling its program itself: one loaded from the tests' compilation cache
    (conftest.py) skips the compiler's memory, which made a second run's peak ~220 MB lower than the first's."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, "train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**env, "JAX_ENABLE_COMPILATION_CACHE": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stderr.split("peak_rss_kb")[-1].split()[0]) / 1024


def test_a_file_larger_than_the_rss_budget_trains_within_it(chat_model, tmp_path):
    """128 MB of JSON Lines (in memory, read_rows alone grows the RSS by ~580 MB for it, before any
    tokenizing) streams through 3 steps with a peak RSS within 48 MB of the same run's on 2,000 of its rows.
    Two processes: a second run in the same process keeps the first one's compiled programs (+75 MB)."""
    small = tmp_path / "small.jsonl"
    _write(small, make_examples(2000, seed=4))
    chunk = small.read_bytes()
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        while f.tell() < 128 << 20:
            f.write(chunk)
    budget_mb = 48
    o = {"train.steps": 3, "data.streaming": "true", "data.stream_window": 512, "data.validation": "null"}
    base, got = (_peak_rss_mb([CFG, *_overrides(chat_model, tmp_path, tmp_path / name, **o, **{"data.train": data})])
                 for name, data in (("small", small), ("big", big)))
    assert big.stat().st_size > 2 * (budget_mb << 20)
    assert got - base < budget_mb, (got, base)
