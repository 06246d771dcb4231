"""SFT data: chat-template loss masks, formats, bad rows, loaders, packing, batches, prepare.

Everything runs against the real SmolLM2 tokenizer (ChatML template, EOS = <|im_end|>), loaded once.
"""

import json
import os
import re

import datasets
import numpy as np
import pytest

from jaxft.config import DataConfig
from jaxft.data.encode import Batches, Example, load_examples, pack
from jaxft.errors import JaxftError
from jaxft.example import example_model
from jaxft.formats.hf import load_tokenizer
from jaxft.data.prepare import MinHasher, prepare

EOS = "<|im_end|>"
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Wie spät ist es? 🕰"},
    {"role": "assistant", "content": "Es ist 3 Uhr — café time ☕."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "4, of course.\n\nDone."},
]


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(example_model())


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(tmp_path, rows, tok, name="train.jsonl", **kw):
    path = write_jsonl(tmp_path / name, rows)
    return load_examples(DataConfig(train=str(path), **kw), tok)


def masked_runs(ex):
    """[(start, end)] of the contiguous True runs of an example's loss mask."""
    m = np.concatenate([[False], ex.loss_mask, [False]]).astype(int)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def qa_rows(n, seed=0):
    """n distinct messages rows of varied lengths."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, 12)))
        a = " ".join(rng.choice(words, rng.integers(1, 30)))
        rows.append({"messages": [{"role": "user", "content": f"{i}: {q}"}, {"role": "assistant", "content": a}]})
    return rows


# ---------------------------------------------------------------- loss masks against the template


def test_mask_is_exactly_the_assistant_turns(tmp_path, tok):
    (ex,), report = load(tmp_path, [{"messages": CHAT}], tok)
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    np.testing.assert_array_equal(ex.tokens, tok.apply_chat_template(CHAT)["input_ids"])  # ids = the template's
    runs = masked_runs(ex)
    assert [tok.decode(ex.tokens[a:b]) for a, b in runs] == [CHAT[2]["content"] + EOS, CHAT[4]["content"] + EOS]
    for a, b in runs:
        header = a - 1 - list(ex.tokens[:a][::-1]).index(tok.convert_tokens_to_ids("<|im_start|>"))
        assert tok.decode(ex.tokens[header:a]) == "<|im_start|>assistant\n"  # the header is not trained
        assert tok.decode(ex.tokens[b]) == "\n" and not ex.loss_mask[b]  # nor the newline after <|im_end|>
    unmasked = tok.decode(ex.tokens[~ex.loss_mask])
    for m in CHAT[:2] + CHAT[3:4]:
        assert m["content"] in unmasked
    assert report.target_tokens == ex.loss_mask.sum() and report.tokens == len(ex.tokens)


def test_token_straddling_the_header_is_not_trained(tmp_path, tok):
    """Leading spaces merge with the header's newline into one token ("\n "): it starts in the header,
    so it is not a target; the targets start at the first token that starts inside the reply."""
    (ex,), _ = load(tmp_path, [{"messages": [CHAT[1], {"role": "assistant", "content": "  4."}]}], tok)
    (a, b), = masked_runs(ex)
    assert tok.decode(ex.tokens[a - 1]) == "\n " and tok.decode(ex.tokens[a:b]) == f" 4.{EOS}"


def test_system_prompt_added_only_when_missing(tmp_path, tok):
    no_system = {"messages": CHAT[1:3]}
    (a, b), _ = load(tmp_path, [no_system, {"messages": CHAT[:3]}], tok, system_prompt="Be terse.")
    assert tok.decode(a.tokens).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user")
    np.testing.assert_array_equal(b.tokens, tok.apply_chat_template(CHAT[:3])["input_ids"])
    (c,), _ = load(tmp_path, [no_system], tok, name="b.jsonl")  # the template's own default system turn
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(c.tokens)


EQUIVALENT = {  # row of another format → the messages row it must tokenize like
    "prompt_completion": ({"prompt": "Say hi.", "completion": "Hi!"},
                          [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    "prompt_completion_chat": ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, CHAT[:3]),
    "alpaca": ({"instruction": "Translate.", "input": "Hund", "output": "dog"},
               [{"role": "user", "content": "Translate.\n\nHund"}, {"role": "assistant", "content": "dog"}]),
    "alpaca_no_input": ({"instruction": "Name a color.", "input": "", "output": "Blue."},
                        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S."}, {"from": "human", "value": "Q?"},
                                    {"from": "gpt", "value": "A."}, {"from": "user", "value": "Q2?"},
                                    {"from": "model", "value": "A2."}]},
                 [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"},
                  {"role": "assistant", "content": "A."}, {"role": "user", "content": "Q2?"},
                  {"role": "assistant", "content": "A2."}]),
}


@pytest.mark.parametrize("name", EQUIVALENT)
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_formats_tokenize_like_messages(tmp_path, tok, name, train_on_prompt):
    row, messages = EQUIVALENT[name]
    (got,), _ = load(tmp_path, [row], tok, name="a.jsonl", train_on_prompt=train_on_prompt)
    (want,), _ = load(tmp_path, [{"messages": messages}], tok, name="b.jsonl", train_on_prompt=train_on_prompt)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    if train_on_prompt:  # everything but the first token (nothing predicts it)
        assert not got.loss_mask[0] and got.loss_mask[1:].all()


def test_chat_prompt_completion_trains_the_completion_only(tmp_path, tok):
    few_shot = CHAT[:4]  # the prompt holds an assistant turn: context, not a target
    (ex,), _ = load(tmp_path, [{"prompt": few_shot, "completion": [CHAT[4]]}], tok)
    assert [tok.decode(ex.tokens[a:b]) for a, b in masked_runs(ex)] == [CHAT[4]["content"] + EOS]


def test_train_on_prompt_masks_everything_but_padding(tmp_path, tok):
    examples, _ = load(tmp_path, qa_rows(6), tok, train_on_prompt=True)
    b = Batches(examples, 2, 96, packing=True, seed=0).batch(0)
    seg = b["segment_ids"]
    last_of_doc = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((2, 1), bool)], axis=1)
    np.testing.assert_array_equal(b["loss_mask"], (seg > 0) & ~last_of_doc)


def test_eos_appended(tmp_path, tok, monkeypatch):
    eos = tok.eos_token_id
    (pc,), _ = load(tmp_path, [{"prompt": "Q", "completion": "A"}], tok, name="pc.jsonl")
    assert pc.tokens[masked_runs(pc)[-1][1] - 1] == eos  # the completion is closed by EOS, and trained
    (t1, t2), _ = load(tmp_path, [{"text": "Just some text."}, {"text": f"Ends already.{EOS}"}], tok, name="t.jsonl")
    assert t1.tokens[-1] == eos and t1.loss_mask[-1] and t1.loss_mask[1:].all() and not t1.loss_mask[0]
    np.testing.assert_array_equal(t1.tokens[:-1], tok("Just some text.")["input_ids"])
    assert t2.tokens[-1] == eos and t2.tokens[-2] != eos  # not doubled
    monkeypatch.setattr(tok, "chat_template", None)  # no template: plain concatenation
    (plain,), _ = load(tmp_path, [{"prompt": "Q: 2+2? A:", "completion": " 4"}], tok, name="plain.jsonl")
    assert tok.decode(plain.tokens) == f"Q: 2+2? A: 4{EOS}"
    assert tok.decode(plain.tokens[plain.loss_mask]) == f" 4{EOS}"
    with pytest.raises(JaxftError, match="no chat template"):
        load(tmp_path, [{"messages": CHAT}], tok, name="m.jsonl")


def test_plain_text_with_a_tokenizer_that_adds_bos_and_eos(tmp_path):
    """BOS kept (never a target); the tokenizer's own EOS becomes the trained final EOS, not doubled."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<unk> <s> </s> hello world again".split())}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    wl = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (text,), _ = load(tmp_path, [{"text": "hello world"}], wl, name="t.jsonl")
    (pair,), _ = load(tmp_path, [{"prompt": "hello world", "completion": " again"}], wl, name="p.jsonl")
    assert text.tokens.tolist() == [1, 3, 4, 2] and text.loss_mask.tolist() == [False, True, True, True]
    assert pair.tokens.tolist() == [1, 3, 4, 5, 2] and pair.loss_mask.tolist() == [False, False, False, True, True]


def test_templates_that_cannot_be_masked(tmp_path, tok, monkeypatch):
    """A template that renders earlier turns differently once later ones follow is refused (one line);
    a template that raises for a row makes that row bad."""
    upper_history = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'] | upper }}"
                     "{% endif %}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    monkeypatch.setattr(tok, "chat_template", upper_history)
    with pytest.raises(JaxftError, match=r"train.jsonl:1: the chat template renders earlier turns differently"):
        load(tmp_path, [{"messages": CHAT}], tok)
    assert len(load(tmp_path, [{"messages": CHAT}], tok, train_on_prompt=True)[0]) == 1
    picky = "{% if messages | length > 2 %}{{ raise_exception('too long') }}{% endif %}" + upper_history
    monkeypatch.setattr(tok, "chat_template", picky)
    _, r = load(tmp_path, [{"messages": CHAT[1:3]}, {"messages": CHAT}], tok, train_on_prompt=True)
    assert r.skipped_by_reason == {"chat template error": 1}
    assert r.first_errors == [f"{tmp_path / 'train.jsonl'}:2: chat template error: too long"]


# ---------------------------------------------------------------- max_length


def test_truncate_and_drop(tmp_path, tok):
    long_answer = {"messages": [{"role": "user", "content": "Count."},
                                {"role": "assistant", "content": " ".join(map(str, range(200)))}]}
    long_question = {"messages": [{"role": "user", "content": " ".join(map(str, range(200)))},
                                  {"role": "assistant", "content": "Done."}]}
    short = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}
    rows = [long_answer, long_question, short]
    (cut, kept), r = load(tmp_path, rows, tok, max_length=64)
    assert (r.rows, r.examples, r.truncated, r.dropped) == (3, 2, 1, 1)  # long question: no target left
    full = tok.apply_chat_template(long_answer["messages"])["input_ids"]
    np.testing.assert_array_equal(cut.tokens, full[:64])  # keeps the start
    assert cut.loss_mask.any() and len(kept.tokens) < 64
    (only,), r = load(tmp_path, rows, tok, name="d.jsonl", max_length=64, overlong="drop")
    assert (r.examples, r.truncated, r.dropped) == (1, 0, 2)
    np.testing.assert_array_equal(only.tokens, kept.tokens)
    assert r.rows == r.examples + r.skipped + r.dropped


# ---------------------------------------------------------------- bad rows

PC_BAD = {  # (line, reason, text in the message) for a prompt/completion file
    "invalid JSON": ('{"prompt": "a", "completion": "b"', "invalid JSON", "invalid JSON (Expecting"),
    "missing field": ({"prompt": "a"}, "missing field", "missing field 'completion'"),
    "wrong type": ({"prompt": "a", "completion": 5}, "wrong type", "'completion' is a number"),
    "empty completion": ({"prompt": "a", "completion": "  "}, "empty completion", "'completion' is empty"),
}
CHAT_BAD = {
    "unknown role": ({"messages": [{"role": "user", "content": "a"}, {"role": "narrator", "content": "x"},
                                   {"role": "assistant", "content": "b"}]}, "unknown role", "unknown role 'narrator'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn", "no assistant turn"),
    "empty assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
                        "empty assistant content", "empty assistant content"),
}
GOOD = {"prompt_completion": {"prompt": "q", "completion": "a"}, "messages": {"messages": CHAT[1:3]}}


@pytest.mark.parametrize("fmt,cases", [("prompt_completion", PC_BAD), ("messages", CHAT_BAD)])
def test_bad_rows_are_skipped_and_counted(tmp_path, tok, fmt, cases):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD[fmt], *(line for line, _, _ in cases.values())])
    examples, r = load_examples(DataConfig(train=str(path)), tok)
    assert len(examples) == 1 and r.skipped == len(cases) and r.rows == len(cases) + 1
    assert r.skipped_by_reason == {reason: 1 for _, reason, _ in cases.values()}
    for lineno, (_, _, text) in enumerate(cases.values(), 2):
        assert any(e.startswith(f"{path}:{lineno}: ") and text in e for e in r.first_errors), (text, r.first_errors)
    assert f"{len(cases)} bad rows skipped" in r.summary() and f"{path}:2" in r.summary()


@pytest.mark.parametrize("case", [*PC_BAD.values(), *CHAT_BAD.values()], ids=[*PC_BAD, *CHAT_BAD])
def test_strict_raises_on_the_first_bad_row(tmp_path, tok, case):
    line, _, text = case
    good = GOOD["messages" if "messages" in str(line) else "prompt_completion"]
    path = write_jsonl(tmp_path / "train.jsonl", [good, line, line])
    with pytest.raises(JaxftError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(text)):
        load_examples(DataConfig(train=str(path), strict=True), tok)


def test_file_level_errors(tmp_path, tok):
    cases = {
        tmp_path / "missing.jsonl": "no such file",
        write_jsonl(tmp_path / "data.txt", [{"text": "a"}]): "unknown data file type '.txt'",
        write_jsonl(tmp_path / "bad.jsonl", ["nope", "{"]): r"no usable rows \(all 2 bad; first: .*bad.jsonl:1: invalid JSON",
        write_jsonl(tmp_path / "cols.jsonl", [{"chosen": "a", "rejected": "b"}]): r"columns \(chosen, rejected\) match no format",
        write_jsonl(tmp_path / "empty.jsonl", []): "no rows in the file",
    }
    for path, msg in cases.items():
        with pytest.raises(JaxftError, match=msg) as e:
            load_examples(DataConfig(train=str(path)), tok)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- loaders


def test_all_loaders_give_the_same_examples(tmp_path, tok):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(5)]
    chat = qa_rows(4)
    ds, chat_ds = datasets.Dataset.from_list(rows), datasets.Dataset.from_list(chat)
    paths = {
        "jsonl": write_jsonl(tmp_path / "r.jsonl", rows),
        "json array": tmp_path / "r.json",
        "json lines named .json": write_jsonl(tmp_path / "lines.json", rows),
        "parquet": tmp_path / "r.parquet",
        "csv": tmp_path / "r.csv",
        "save_to_disk": tmp_path / "saved",
        "save_to_disk dict": tmp_path / "saved_dict",
    }
    paths["json array"].write_text(json.dumps(rows))
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]))
    ds.save_to_disk(str(paths["save_to_disk"]))
    datasets.DatasetDict(train=ds, validation=ds.select([0])).save_to_disk(str(paths["save_to_disk dict"]))
    want, _ = load_examples(DataConfig(train=str(paths["jsonl"])), tok)
    for kind, path in paths.items():
        got, report = load_examples(DataConfig(train=str(path)), tok)
        assert report.rows == 5 and len(got) == 5, kind
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.tokens, w.tokens, err_msg=kind)
            np.testing.assert_array_equal(g.loss_mask, w.loss_mask, err_msg=kind)
    chat_ds.to_parquet(str(tmp_path / "c.parquet"))  # nested messages survive Parquet
    want, _ = load(tmp_path, chat, tok, name="c.jsonl")
    got, _ = load_examples(DataConfig(train=str(tmp_path / "c.parquet")), tok)
    assert all(np.array_equal(g.tokens, w.tokens) for g, w in zip(got, want))


def test_row_numbers_of_tabular_files(tmp_path, tok):
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]).to_parquet(
        str(tmp_path / "t.parquet"))
    _, r = load_examples(DataConfig(train=str(tmp_path / "t.parquet")), tok)
    assert r.first_errors == [f"{tmp_path / 't.parquet'} row 1: 'completion' is empty"]


def test_validation_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "all.jsonl", qa_rows(20))
    cfg = DataConfig(train=str(path), validation_fraction=0.25, seed=3)
    train, rt = load_examples(cfg, tok, "train")
    val, rv = load_examples(cfg, tok, "validation")
    everything, _ = load_examples(DataConfig(train=str(path)), tok)
    key = lambda exs: sorted(tuple(e.tokens) for e in exs)  # noqa: E731
    assert (rt.rows, rv.rows) == (15, 5)
    assert key(train + val) == key(everything)
    assert key(load_examples(cfg, tok, "validation")[0]) == key(val)  # seeded
    assert key(load_examples(DataConfig(train=str(path), validation_fraction=0.25, seed=4), tok, "validation")[0]) != key(val)
    other = write_jsonl(tmp_path / "val.jsonl", qa_rows(3, seed=1))
    assert len(load_examples(DataConfig(train=str(path), validation=str(other)), tok, "validation")[0]) == 3
    assert load_examples(DataConfig(train=str(path)), tok, "validation") == ([], load_examples(
        DataConfig(train=str(path)), tok, "validation")[1])


# ---------------------------------------------------------------- batches


def docs_of(batch):
    """The documents of a batch: (row, tokens, targets, loss_mask, positions) per segment."""
    docs = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
            docs.append((r, *(batch[k][r, idx] for k in ("tokens", "targets", "loss_mask", "positions"))))
    return docs


@pytest.mark.parametrize("packing", [True, False])
def test_batches_layout_and_nothing_lost(tmp_path, tok, packing):
    examples, report = load(tmp_path, qa_rows(40), tok)
    by_tokens = {tuple(e.tokens): e for e in examples}
    assert len(by_tokens) == len(examples)
    b = Batches(examples, batch_size=3, seq_len=128, packing=packing, seed=0)
    seen, trained = [], 0.0
    for i in range(len(b)):
        batch = b.batch(i)
        assert all(v.shape == (3, 128) for v in batch.values())
        assert {k: v.dtype for k, v in batch.items()} == dict(
            tokens=np.int32, positions=np.int32, segment_ids=np.int32, targets=np.int32, loss_mask=np.float32)
        pad = batch["segment_ids"] == 0
        for k in batch:
            assert not batch[k][pad].any(), f"{k} is not zero at padding"
        for r in range(3):  # padding only at the end of a row
            assert np.array_equal(pad[r], np.sort(pad[r]))
        for _, tokens, targets, mask, positions in docs_of(batch):
            ex = by_tokens[tuple(tokens)]
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            np.testing.assert_array_equal(targets[:-1], tokens[1:])  # shifted within the document
            assert targets[-1] == 0 and mask[-1] == 0  # nothing across the boundary
            np.testing.assert_array_equal(mask[:-1], ex.loss_mask[1:])
            seen.append(tuple(tokens))
        if not packing:
            assert batch["segment_ids"].max() <= 1
        trained += batch["loss_mask"].sum()
    assert sorted(seen) == sorted(by_tokens)  # every example exactly once per epoch
    assert trained == report.target_tokens == sum(e.loss_mask.sum() for e in examples)
    if packing:
        assert len(b.rows) < len(examples) and max(len(r) for r in b.rows) > 1


def test_batches_are_deterministic_and_epochs_reshuffle(tmp_path, tok):
    examples, _ = load(tmp_path, qa_rows(30), tok)
    make = lambda seed=0: Batches(examples, batch_size=2, seq_len=128, packing=True, seed=seed)  # noqa: E731
    b = make()
    n = len(b)
    late = b.batch(n + 1)  # random access first, then in order: same arrays
    first = [b.batch(i) for i in range(n)]
    for i, batch in enumerate(first):
        for k, v in batch.items():
            np.testing.assert_array_equal(v, b.batch(i)[k])
            np.testing.assert_array_equal(v, make().batch(i)[k])
    for k, v in late.items():
        np.testing.assert_array_equal(v, make().batch(n + 1)[k])
    epoch = lambda e: [make().batch(e * n + i)["tokens"] for i in range(n)]  # noqa: E731
    e0, e1 = epoch(0), epoch(1)
    assert any(not np.array_equal(x, y) for x, y in zip(e0, e1))  # reshuffled
    assert sorted(map(bytes, np.concatenate(e0))) == sorted(map(bytes, np.concatenate(e1)))  # same rows
    assert not np.array_equal(make(1).batch(0)["tokens"], first[0]["tokens"])


def test_pack_best_fit():
    lengths = np.random.default_rng(0).integers(1, 100, 500).tolist()
    rows = pack(lengths, seq_len=128, seed=0)
    assert sorted(d for r in rows for d in r) == list(range(500))
    fill = [sum(lengths[d] for d in r) for r in rows]
    assert max(fill) <= 128
    assert sum(f <= 64 for f in fill) <= 1  # a new row only when no row has room: at most one half-empty
    assert len(rows) <= 1.05 * sum(lengths) / 128  # within 5% of the lower bound here
    assert pack(lengths, 128, seed=0) == rows and pack(lengths, 128, seed=1) != rows


def test_batches_refuse_overlong_examples():
    ex = Example(np.arange(20, dtype=np.int32), np.ones(20, bool))
    with pytest.raises(ValueError, match="seq_len=16"):
        Batches([ex], 1, 16, True, 0)


# ---------------------------------------------------------------- prepare


WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing loudly in an old oak "
         "tree near the quiet river bank and children play happily with bright red kites under warm "
         "afternoon sun before walking home for a simple dinner").split()


def shingle_jaccard(a, b):
    sa, sb = MinHasher().shingles(a), MinHasher().shingles(b)
    return len(sa & sb) / len(sa | sb)


def read_out(d):
    return {n: [json.loads(x) for x in (d / f"{n}.jsonl").read_text().splitlines()] for n in ("train", "validation")}


def test_prepare_cleans_dedupes_and_splits(tmp_path, capsys):
    base = " ".join(WORDS)
    near = " ".join(WORDS[:-2] + ["cheap"] + WORDS[-1:])  # one word of 44 changed
    assert len(WORDS) == 44 and shingle_jaccard(base, near) >= 0.8
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer number {i} is here."} for i in range(18)]
    rows += [
        {"prompt": "  Spaced \n\n\n\n\nout  ", "completion": "\tanswer\r\n\r\n\r\nend "},
        {"prompt": "Spaced \n\n out", "completion": "answer\n\n\nend"},  # exact dup after cleaning
        {"prompt": "Question 3?", "completion": "  Answer number 3 is here.  "},  # exact dup
        {"prompt": "q", "completion": "   "},  # empty
        {"prompt": " ", "completion": "\n"},  # empty
        {"prompt": "q", "completion": 3},  # bad
        {"prompt": "tell a story", "completion": base},
        {"prompt": "tell a story", "completion": near},  # near dup
    ]
    src = write_jsonl(tmp_path / "raw.jsonl", rows + ["{not json"])
    out = tmp_path / "out"
    counts = prepare([str(src)], str(out), validation_fraction=0.25, seed=0, near_dup_threshold=0.8)
    assert counts == dict(read=27, bad=2, empty=2, exact_dups=2, near_dups=1, train=15, validation=5)
    assert "exact_dups=2" in capsys.readouterr().out
    files = read_out(out)
    kept = files["train"] + files["validation"]
    assert {"prompt": "Spaced \n\nout", "completion": "answer\n\nend"} in kept  # cleaned, first kept
    assert {"prompt": "tell a story", "completion": base} in kept
    assert not any(r["completion"] == near for r in kept)
    assert sorted(os.listdir(out)) == ["train.jsonl", "validation.jsonl"]  # no temp files left
    again = tmp_path / "again"
    prepare([str(src)], str(again), validation_fraction=0.25, seed=0, near_dup_threshold=0.8)
    assert read_out(again) == files  # seeded
    other = tmp_path / "other"
    prepare([str(src)], str(other), validation_fraction=0.25, seed=1, near_dup_threshold=0.8)
    assert read_out(other)["validation"] != files["validation"]
    no_near = prepare([str(src)], str(tmp_path / "n"), validation_fraction=0.0, seed=0)
    assert (no_near["near_dups"], no_near["train"], no_near["validation"]) == (0, 21, 0)


def test_near_duplicates_by_similarity(tmp_path):
    base = " ".join(WORDS)
    middle = " ".join(WORDS[:20] + ["purple"] + WORDS[21:])  # 5 shingles change: Jaccard ≈ 0.78
    unrelated = "a completely different sentence about databases indexes queries and transactions " * 3
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": base}, {"text": middle}, {"text": unrelated}])
    loose = prepare([str(src)], str(tmp_path / "a"), validation_fraction=0, seed=0, near_dup_threshold=0.7)
    strict = prepare([str(src)], str(tmp_path / "b"), validation_fraction=0, seed=0, near_dup_threshold=0.9)
    assert 0.7 < shingle_jaccard(base, middle) < 0.9
    assert (loose["near_dups"], loose["train"], strict["near_dups"], strict["train"]) == (1, 2, 0, 3)


def test_prepare_reads_several_inputs_and_formats(tmp_path):
    rows = [{"instruction": f"Do {i}.", "input": "", "output": f"Done {i}."} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    src = write_jsonl(tmp_path / "b.jsonl", rows[:3] + [{"instruction": "x", "output": ""}, {"text": "other format"}])
    counts = prepare([str(tmp_path / "a.parquet"), str(src)], str(tmp_path / "o"), validation_fraction=0.5, seed=0)
    assert counts == dict(read=11, bad=1, empty=1, exact_dups=3, near_dups=0, train=3, validation=3)
    with pytest.raises(JaxftError, match="validation_fraction"):
        prepare([str(src)], str(tmp_path / "o"), validation_fraction=1.0, seed=0)


def test_prepare_writes_atomically(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(4)])
    out = tmp_path / "out"
    prepare([str(src)], str(out), validation_fraction=0.0, seed=0)
    before = (out / "train.jsonl").read_text()
    write_jsonl(src, [{"text": "new"}])

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        prepare([str(src)], str(out), validation_fraction=0.0, seed=0)
    assert (out / "train.jsonl").read_text() == before
    assert sorted(os.listdir(out)) == ["train.jsonl", "validation.jsonl"]
