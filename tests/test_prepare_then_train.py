"""Issue 30, what a new user hit (1 and 3): `jaxft prepare` over inputs of different formats, and `prepare`
then `train` on a handful of rows."""

import json
import re

import pytest

from jaxft.config import DataConfig, RunConfig, check_files
from jaxft.data.encode import load_examples
from jaxft.data.prepare import prepare
from jaxft.errors import JaxftError
from tiny import ROOT, example_tokenizer, run_cli


def chat(i):
    return [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]


INPUTS = {  # one file per format, 5 rows each, as the trial had them
    "a.jsonl": [{"messages": chat(i)} for i in range(5)],
    "b.jsonl": [{"instruction": f"Do task {i}.", "input": "", "output": f"Task {i} done."} for i in range(5)],
    "c.jsonl": [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}"}]}
                for i in range(5)],
    "d.jsonl": [{"text": f"Plain document number {i}."} for i in range(5)],
}


def write_inputs(tmp_path, extra_lines=()):
    paths = []
    for name, rows in INPUTS.items():
        lines = [json.dumps(r) for r in rows] + (list(extra_lines) if name == "b.jsonl" else [])
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        paths.append(str(tmp_path / name))
    return paths


def test_prepare_detects_each_files_format_and_says_why_rows_are_bad(tmp_path, capsys):
    """Trial 1: `prepare a.jsonl b.jsonl c.jsonl d.jsonl` printed read=20 bad=16 ... train=4 with no reason."""
    bad = ['{"instruction": "x", "output": ', json.dumps({"instruction": "x", "output": 5})]
    paths = write_inputs(tmp_path, bad)
    out = tmp_path / "o"
    counts = prepare(paths, str(out), validation_fraction=0, seed=0)
    assert counts == dict(read=22, bad=2, empty=0, exact_dups=0, near_dups=0, train=20, validation=0)
    printed = capsys.readouterr().out
    for name, fmt in zip(INPUTS, ("messages", "alpaca", "sharegpt", "text")):
        assert re.search(rf"{re.escape(str(tmp_path / name))}: \d+ rows, 5 {fmt}", printed), printed
    assert "2 rows skipped (1 invalid JSON, 1 wrong type)" in printed
    assert f"  {tmp_path / 'b.jsonl'}:6: invalid JSON (" in printed
    assert f"  {tmp_path / 'b.jsonl'}:7: 'output' is a number, expected a string" in printed
    # ... and training reads the prepared file, four formats in one, row by row: nothing lost
    examples, report = load_examples(DataConfig(train=str(out / "train.jsonl")), example_tokenizer())
    assert (report.rows, len(examples), report.skipped) == (20, 20, 0), report.summary()


def test_prepare_lists_the_first_five_bad_rows(tmp_path, capsys):
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(['{"text": "good"}'] + ["{"] * 6 + ['{"text": ["a list"]}']) + "\n")
    prepare([str(src)], str(tmp_path / "o"), validation_fraction=0, seed=0)
    printed = capsys.readouterr().out
    assert "7 rows skipped (6 invalid JSON, 1 wrong type); the first 5:\n" in printed
    assert [line.split(": ")[0] for line in printed.splitlines() if line.startswith("  ")] == [
        f"  {src}:{n}" for n in range(2, 7)]


def test_a_row_of_another_format_inside_one_file_still_names_its_missing_field(tmp_path):
    """Training's "auto" reads each row by its own columns; a row whose columns match no format is parsed as
    its file's format, so the error still names the field it lacks."""
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "q", "completion": "a"}, {"text": "doc"},
                                                       {"prompt": "no completion"}]) + "\n")
    examples, report = load_examples(DataConfig(train=str(path)), example_tokenizer())
    assert len(examples) == 2 and report.first_errors == [f"{path}:3: missing field 'completion'"]


def test_prepare_warns_when_validation_is_empty(tmp_path, capsys):
    """Trial 3: 5 rows at the default fraction gave validation=0 and an empty validation.jsonl, silently."""
    src = tmp_path / "five.jsonl"
    src.write_text("\n".join(json.dumps({"messages": chat(i)}) for i in range(5)) + "\n")
    prepare([str(src)], str(tmp_path / "o"), validation_fraction=0, seed=0)
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'o' / 'validation.jsonl'} is empty (--validation-fraction is 0)" in err
    assert "do not pass it as data.validation" in err and len(err.strip().splitlines()) == 1
    counts = prepare([str(src)], str(tmp_path / "p"), validation_fraction=0.2, seed=0)
    assert counts["validation"] == 1 and "warning" not in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"messages": chat(0)}))
    prepare([str(one)], str(tmp_path / "q"), validation_fraction=0.5, seed=0)
    assert "is empty (only 1 usable row: nothing to hold out)" in capsys.readouterr().err


@pytest.mark.parametrize("content,name", [(b"", "validation.jsonl"), (b"\xef\xbb\xbf\r\n  \n", "v.jsonl"),
                                          (b"[ ]\n", "v.json"), (b"prompt,completion\r\n", "v.csv"),
                                          (b"\xff\xfe" + "\n \n".encode("utf-16-le"), "v.ndjson")])
def test_an_empty_data_file_is_refused_before_loading(tmp_path, content, name):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": chat(0)}) + "\n")
    empty = tmp_path / name
    empty.write_bytes(content)
    with pytest.raises(JaxftError, match=rf"^data.validation: {re.escape(str(empty))}: the file has no rows;") as e:
        check_files(RunConfig(data=DataConfig(train=str(train), validation=str(empty))))
    assert "\n" not in str(e.value)
    with pytest.raises(JaxftError, match=rf"^data.train: {re.escape(str(empty))}: the file has no rows$"):
        check_files(RunConfig(data=DataConfig(train=str(empty))))
    check_files(RunConfig(data=DataConfig(train=str(train), validation=str(train))))  # a file with a row is fine


def test_prepare_then_train_fails_in_one_line_before_the_model_loads(tmp_path):
    """Trial 3: `jaxft train ... data.validation=o/validation.jsonl` failed only after loading the model. The
    model path here does not exist: the run must stop at the empty file, before anything reads the model."""
    src = tmp_path / "five.jsonl"
    src.write_text("\n".join(json.dumps({"messages": chat(i)}) for i in range(5)) + "\n")
    r = run_cli("prepare", src, "--out", tmp_path / "o")
    assert r.returncode == 0 and "warning" in r.stderr, r.stderr
    r = run_cli("train", ROOT / "configs" / "quickstart.yaml", f"model.path={tmp_path / 'no-model'}",
                f"data.train={tmp_path / 'o' / 'train.jsonl'}", f"data.validation={tmp_path / 'o' / 'validation.jsonl'}",
                f"train.out_dir={tmp_path / 'run'}", "eval.file=null")
    assert r.returncode == 2 and r.stderr.startswith(
        f"jaxft: error: data.validation: {tmp_path / 'o' / 'validation.jsonl'}: the file has no rows"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
