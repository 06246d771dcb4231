"""Text data files as editors and exporters write them: byte-order marks (UTF-8, UTF-16, UTF-32), CRLF line
ends, blank and whitespace-only lines, no final newline. Every reader must count every valid row.

Each file is written by hand here (not by json.dump / to_csv), so the bytes are exactly the ones under test.
"""

import codecs
import csv
import io
import json

import pytest

from jaxft.config import DataConfig, DpoConfig
from jaxft.data.constitution import load_constitution
from jaxft.data.encode import load_examples
from jaxft.data.pairs import load_pairs
from jaxft.data.prepare import prepare
from jaxft.data.prompts import load_prompts
from jaxft.data.rows import read_rows
from jaxft.errors import JaxftError
from jaxft.example import example_model
from jaxft.formats.hf import load_tokenizer

ROWS = [
    {"prompt": "Wie spät ist es? 🕰", "completion": "Drei Uhr — café time ☕."},
    {"prompt": "Two lines:\nfirst\nsecond", "completion": "Read both."},
    {"prompt": "Quote \"this\", please", "completion": "\"this\""},
    {"prompt": "Tabs\tand spaces  ", "completion": "  kept as they are"},
    {"prompt": "Line separator\u2028inside", "completion": "still one row"},
    {"prompt": "Last", "completion": "row without a newline after it"},
]

# How each encoding's files start: its byte-order mark and how its text is encoded after it.
ENCODINGS = {
    "utf-8 + BOM": (codecs.BOM_UTF8, "utf-8"),
    "utf-16-le + BOM": (codecs.BOM_UTF16_LE, "utf-16-le"),
    "utf-16-be + BOM": (codecs.BOM_UTF16_BE, "utf-16-be"),
    "utf-32-le + BOM": (codecs.BOM_UTF32_LE, "utf-32-le"),
}


def lines_with_gaps(lines):
    """CRLF line ends, a blank line first, blank and whitespace-only lines between the rows, no final newline."""
    out = [""]
    for i, line in enumerate(lines):
        out.append(line)
        if i % 2 == 0:
            out += ["", " \t "]
    return "\r\n".join(out)


def as_jsonl(rows):
    return lines_with_gaps([json.dumps(r, ensure_ascii=False) for r in rows])


def as_json_array(rows):
    return "\r\n" + json.dumps(rows, ensure_ascii=False, indent=2).replace("\n", "\r\n") + "\r\n \r\n"


def as_csv(rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(rows[0]))
    lines = buf.getvalue().splitlines()
    for r in rows:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(list(r.values()))
        lines.append(buf.getvalue().removesuffix("\n"))
    return lines_with_gaps(lines)


WRITERS = {"a.jsonl": as_jsonl, "a.ndjson": as_jsonl, "lines.json": as_jsonl, "a.json": as_json_array, "a.csv": as_csv}


def write(path, text, encoding="utf-8 + BOM"):
    bom, codec = ENCODINGS[encoding]
    path.write_bytes(bom + text.encode(codec))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(example_model())


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", WRITERS)
def test_every_row_read_whatever_the_marks_and_line_ends(tmp_path, name, encoding):
    path = write(tmp_path / name, WRITERS[name](ROWS), encoding)
    records = read_rows(str(path))
    assert [r.row for r in records] == ROWS, name
    if name.endswith(("jsonl", "ndjson", "lines.json")):  # numbered by the line they are on (from 1)
        assert records[0].where == f"{path}:2" and records[1].where == f"{path}:5"


def test_a_bom_at_the_start_of_any_json_line(tmp_path):
    """`cat a.jsonl b.jsonl` of two files written with a BOM leaves one at the start of a middle line."""
    a, b = write(tmp_path / "a.jsonl", as_jsonl(ROWS[:3])), write(tmp_path / "b.jsonl", as_jsonl(ROWS[3:]))
    both = tmp_path / "both.jsonl"
    both.write_bytes(a.read_bytes() + b"\r\n" + b.read_bytes())
    assert [r.row for r in read_rows(str(both))] == ROWS


def test_the_issues_file_loses_no_row(tmp_path, tok):
    """issue 30: a JSONL file starting with a UTF-8 BOM lost its first row ("8 rows → 7 examples; 1 invalid JSON")."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(8)]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    examples, report = load_examples(DataConfig(train=str(path)), tok)
    assert (report.rows, report.examples, report.skipped) == (8, 8, 0), report.summary()


@pytest.mark.parametrize("encoding", ["utf-8 + BOM", "utf-16-le + BOM"])
def test_prompts_pairs_and_prepare_count_every_row(tmp_path, tok, encoding):
    prompts = write(tmp_path / "prompts.jsonl", as_jsonl([{"prompt": r["prompt"], "solution": "x"} for r in ROWS]),
                    encoding)
    got, report = load_prompts(DataConfig(train=str(prompts)), tok)
    assert (len(got), report.skipped) == (len(ROWS), 0)
    pairs = write(tmp_path / "pairs.json", as_json_array(
        [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "no"} for r in ROWS]), encoding)
    got, report = load_pairs(DataConfig(train=str(pairs)), DpoConfig(), tok)
    assert (len(got), report.skipped) == (len(ROWS), 0)
    for name, writer in WRITERS.items():
        src = write(tmp_path / f"raw-{name}", writer(ROWS), encoding)
        counts = prepare([str(src)], str(tmp_path / f"out-{name}"), validation_fraction=0, seed=0)
        assert (counts["read"], counts["bad"], counts["empty"], counts["train"]) == (6, 0, 0, 6), name


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("encoding", ["utf-8 + BOM", "utf-16-le + BOM"])
def test_constitutions_with_marks_and_crlf(tmp_path, suffix, encoding):
    principles = [{"name": "harm", "critique": "Point out harm.", "revision": "Remove it."},
                  {"name": "honesty", "compare": "Which reply is more honest?"}]
    if suffix == ".json":
        text = json.dumps({"name": "mine", "principles": principles}, indent=2).replace("\n", "\r\n")
    else:
        text = "name: mine\r\n\r\nprinciples:\r\n" + "".join(
            "  - " + "\r\n    ".join(f"{k}: {json.dumps(v)}" for k, v in p.items()) + "\r\n  \r\n" for p in principles)
    c = load_constitution(write(tmp_path / f"c{suffix}", text, encoding))
    assert c.name == "mine" and [p.name for p in c.principles] == ["harm", "honesty"]
    assert c.principles[0].revision == "Remove it."


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.csv"])
@pytest.mark.parametrize("codec,guess", [("utf-16-le", "UTF-16-LE"), ("utf-16-be", "UTF-16-BE"),
                                         ("utf-32-le", "UTF-32-LE")])
def test_utf16_without_a_mark_is_one_line_naming_it(tmp_path, name, codec, guess):
    path = tmp_path / name
    path.write_bytes(WRITERS[name](ROWS).lstrip().encode(codec))
    with pytest.raises(JaxftError, match=f"looks like {guess} text without a byte-order mark") as e:
        read_rows(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_undecodable_utf16_is_one_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(codecs.BOM_UTF16_LE + as_jsonl(ROWS).encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(JaxftError, match=r"a.jsonl: not valid UTF-16 text \(") as e:
        read_rows(str(path))
    assert "\n" not in str(e.value)
