"""The extraction task (jaxft.data.task) and the generation metrics (jaxft.metrics)."""

import datetime as dt
import json

import pytest

from jaxft.metrics import exact_match, json_fields, parse_json_object, same_value, score
from jaxft.data.task import INSTRUCTION, KEYS, make_examples, prompt_and_answer, read_jsonl, write_task_files

REF = '{"name": "Priya Shah", "city": "Lisbon", "date": "2024-03-03", "amount": 12.5}'

# ---------------------------------------------------------------- task


def test_same_seed_same_rows_other_seed_other_rows():
    assert make_examples(50, seed=3) == make_examples(50, seed=3)
    assert make_examples(50, seed=3) != make_examples(50, seed=4)
    assert make_examples(20, seed=3) == make_examples(50, seed=3)[:20]  # a prefix: splits are stable
    assert make_examples(0, seed=3) == []


def test_seed_0_is_pinned():
    """The quickstart's data must not drift silently: a template change has to update this test."""
    rows = make_examples(2, seed=0)
    assert rows[0]["messages"][0]["content"] == (
        INSTRUCTION + "\nrefund note: Nov 26, 2021 / Erik Sato / 641.91 GBP / Madrid")
    assert rows[0]["messages"][1]["content"] == (
        '{"name": "Erik Sato", "city": "Madrid", "date": "2021-11-26", "amount": 641.91}')
    assert rows[1]["messages"][1]["content"] == (
        '{"name": "Aisha Kim", "city": "Glasgow", "date": "2025-04-11", "amount": 468.72}')


def test_rows_are_chat_rows_with_unique_user_messages():
    rows = make_examples(500, seed=0)
    users = [r["messages"][0]["content"] for r in rows]
    assert len(set(users)) == len(users)
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        msgs, answer = prompt_and_answer(r)
        assert msgs == r["messages"][:1] and answer == r["messages"][1]["content"]


def test_answers_are_compact_json_with_the_fixed_keys_in_order():
    for r in make_examples(500, seed=1):
        answer = r["messages"][1]["content"]
        obj = json.loads(answer)
        assert tuple(obj) == KEYS
        assert "\n" not in answer and answer == json.dumps(obj, ensure_ascii=False)
        assert isinstance(obj["name"], str) and isinstance(obj["city"], str)
        assert dt.date.fromisoformat(obj["date"]).isoformat() == obj["date"]
        assert isinstance(obj["amount"], (int, float)) and not isinstance(obj["amount"], bool)
        assert obj["amount"] > 0 and round(obj["amount"], 2) == obj["amount"]
        record = r["messages"][0]["content"]
        assert obj["name"].split()[-1] in record and obj["city"] in record  # answerable from the record


def test_records_vary():
    rows = make_examples(300, seed=0)
    records = [r["messages"][0]["content"].split("\n", 1)[1] for r in rows]
    assert sum("\n" in rec for rec in records) > 50  # labelled lines / emails
    assert sum("note:" in rec for rec in records) > 30  # terse notes
    assert sum(json.loads(r["messages"][1]["content"])["date"] not in rec
               for r, rec in zip(rows, records)) > 200  # dates mostly need normalizing
    assert any(isinstance(json.loads(r["messages"][1]["content"])["amount"], int) for r in rows)


def test_write_task_files_disjoint_splits(tmp_path):
    paths = write_task_files(tmp_path / "task", n_train=200, n_validation=30, n_test=40, seed=7)
    assert set(paths) == {"train", "validation", "test"}
    splits = {k: read_jsonl(p) for k, p in paths.items()}
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "validation": 30, "test": 40}
    users = {k: {r["messages"][0]["content"] for r in v} for k, v in splits.items()}
    assert not users["train"] & users["validation"]
    assert not users["train"] & users["test"]
    assert not users["validation"] & users["test"]
    assert splits["train"] + splits["validation"] + splits["test"] == make_examples(270, seed=7)
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["test.jsonl", "train.jsonl",
                                                                      "validation.jsonl"]  # no temp files left
    again = write_task_files(tmp_path / "task", n_train=200, n_validation=30, n_test=40, seed=7)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)


def test_prompt_and_answer_needs_an_answer():
    with pytest.raises(ValueError):
        prompt_and_answer({"messages": [{"role": "user", "content": "hi"}]})


# ---------------------------------------------------------------- metrics


def test_exact_match_strips_whitespace_only():
    assert exact_match("  " + REF + "\n", REF) == 1.0
    assert exact_match(REF.replace(": ", ":"), REF) == 0.0  # same object, other text
    assert exact_match("", REF) == 0.0
    assert exact_match(None, REF) == 0.0


def test_json_fields_exact_prediction():
    assert json_fields(REF, REF) == {"valid_json": 1.0, "exact": 1.0, "field_accuracy": 1.0}
    reordered = '{"amount": 12.50, "date": "2024-03-03", "city": "Lisbon", "name": "Priya Shah"}'
    assert json_fields(reordered, REF) == {"valid_json": 1.0, "exact": 1.0, "field_accuracy": 1.0}
    pretty = json.dumps(json.loads(REF), indent=2)
    assert json_fields(pretty, REF)["exact"] == 1.0


@pytest.mark.parametrize("fenced", [
    "```json\n" + REF + "\n```",
    "```\n" + REF + "\n```",
    "  ```json\n" + REF + "```\n",
    "```" + REF + "```",
    "```JSON\n" + json.dumps(json.loads(REF), indent=2) + "\n```",
])
def test_json_fields_accepts_one_code_fence(fenced):
    assert json_fields(fenced, REF) == {"valid_json": 1.0, "exact": 1.0, "field_accuracy": 1.0}


@pytest.mark.parametrize("garbage", [
    "", "   ", "I don't know", "{", "}", '{"name": "Priya Shah", ', "null", "12.5", '"a string"', "[1, 2]",
    "[" + REF + "]", "JSON:\n" + REF, REF + "\nHope this helps!", REF + REF, "```json\n" + REF,
    "```json\n" + REF + "\n```\nextra", '{"amount": NaN}', '{"amount": Infinity}', "[" * 100_000,
    "\x00\ufffd" * 50, "{'name': 'Priya Shah'}", None, 12.5,
])
def test_json_fields_garbage_is_invalid_and_never_raises(garbage):
    assert json_fields(garbage, REF) == {"valid_json": 0.0, "exact": 0.0, "field_accuracy": 0.0}
    assert exact_match(garbage, REF) == 0.0


def test_json_fields_types_must_match():
    as_string = REF.replace("12.5", '"12.5"')
    assert json_fields(as_string, REF) == {"valid_json": 1.0, "exact": 0.0, "field_accuracy": 0.75}
    assert json_fields(REF.replace("12.5", "12.50"), REF)["exact"] == 1.0  # same number
    whole = REF.replace("12.5", "40")
    assert json_fields(whole.replace("40", "40.0"), whole)["exact"] == 1.0  # int 40 == float 40.0
    assert not same_value(True, 1) and not same_value(1, True) and same_value(True, True)
    assert not same_value(None, "null") and not same_value("1", 1) and same_value([1, {"a": 2}], [1.0, {"a": 2}])


def test_json_fields_missing_and_extra_keys():
    missing = '{"name": "Priya Shah", "city": "Lisbon"}'
    assert json_fields(missing, REF) == {"valid_json": 1.0, "exact": 0.0, "field_accuracy": 0.5}
    extra = REF[:-1] + ', "currency": "EUR"}'
    assert json_fields(extra, REF) == {"valid_json": 1.0, "exact": 0.0, "field_accuracy": 1.0}
    wrong = '{"name": "Dr. Priya Shah", "city": "Lisbon, Portugal", "date": "March 3rd, 2024", "amount": 12.5}'
    assert json_fields(wrong, REF) == {"valid_json": 1.0, "exact": 0.0, "field_accuracy": 0.25}
    assert json_fields("{}", REF) == {"valid_json": 1.0, "exact": 0.0, "field_accuracy": 0.0}
    assert json_fields("{}", "{}") == {"valid_json": 1.0, "exact": 1.0, "field_accuracy": 1.0}


def test_json_fields_bad_reference_raises():
    with pytest.raises(ValueError, match="reference"):
        json_fields(REF, "not json")


def test_parse_json_object():
    assert parse_json_object("```json\n{\"a\": 1}\n```") == {"a": 1}
    assert parse_json_object('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_json_object("[1]") is None


def test_score_averages_per_example():
    preds = [REF, "```json\n" + REF + "\n```", REF.replace("12.5", '"12.5"'), "garbage"]
    refs = [REF] * 4
    assert score("exact_match", preds, refs) == {"exact_match": 0.25, "n": 4.0}
    s = score("json_fields", preds, refs)
    assert s == pytest.approx({"valid_json": 0.75, "exact": 0.5, "field_accuracy": (1 + 1 + 0.75 + 0) / 4,
                               "n": 4.0})


def test_score_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", [REF], [REF])
    with pytest.raises(ValueError, match="predictions"):
        score("exact_match", [REF, REF], [REF])
    with pytest.raises(ValueError, match="no examples"):
        score("json_fields", [], [])


def test_score_on_task_answers_is_perfect():
    refs = [prompt_and_answer(r)[1] for r in make_examples(100, seed=2)]
    assert score("exact_match", refs, refs) == {"exact_match": 1.0, "n": 100.0}
    assert score("json_fields", refs, refs) == {"valid_json": 1.0, "exact": 1.0, "field_accuracy": 1.0, "n": 100.0}
