"""Rows before the tokenizer: read data files, recognise SFT formats, clean, deduplicate, split.

Everything here works on plain rows (dicts) and needs no tokenizer; `jaxft.data.encode` turns the parsed
rows into token ids and loss masks.

    records = read_rows("train.jsonl")           # [Record(where="train.jsonl:1", row={...}), ...]
    parse_row(records[0].row, "messages")        # Chat(messages=(...), trained=(2,)) or RowError
    row_format(records[0].row, "auto", rows_format(records))   # "messages": the row's own columns
    prepare(["raw.jsonl"], "data/", validation_fraction=0.05, seed=0, near_dup_threshold=0.8)

Files: `.jsonl` / `.ndjson` are read line by line (an invalid line is one bad row, numbered from 1);
`.json` holds a top-level array (or JSON Lines); `.parquet` and `.csv` are read with Hugging Face
`datasets`, as are `save_to_disk` directories. Rows of those are numbered from 0 (`row N`).

Text files (JSON Lines, JSON, CSV) are UTF-8, or UTF-16 / UTF-32 when a byte-order mark says so; a UTF-8
byte-order mark is skipped (also one at the start of a JSON line, as `cat` of two such files leaves it),
line ends may be LF or CRLF, blank and whitespace-only lines are not rows, and the last line needs no
newline. UTF-16 / UTF-32 text without a byte-order mark is a one-line error naming the encoding it looks like.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


from jaxft.errors import JaxftError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant"}
_SUFFIXES = ".jsonl, .ndjson, .json, .parquet, .csv or a datasets save_to_disk directory"

# ---------------------------------------------------------------- rows and their parsed forms


class RowError(Exception):
    """A bad row. `reason` is the category counted in reports ("missing field"); str(self) the detail."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One row as read: where it came from ("train.jsonl:17", "train.parquet row 3") and its value.

    `row` is a RowError when the row could not even be decoded (an invalid JSON line).
    """

    where: str
    row: Any


@dataclass(frozen=True)
class Chat:
    """A conversation: messages {"role", "content"} (system/user/assistant/tool; see `parse_message` for the
    tool keys they may carry), the indices of the assistant messages that are training targets, and the
    row's tool definitions (`parse_tools`), passed to the chat template as transformers does."""

    messages: tuple[dict, ...]
    trained: tuple[int, ...]
    tools: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class Pair:
    """A plain prompt/completion pair of strings; the completion is the target."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Text:
    """Plain text, every token a target."""

    text: str


# ---------------------------------------------------------------- reading files


def read_rows(path: str, split: str | None = None) -> list[Record]:
    """Every row of a data file or `save_to_disk` directory, in order.

    `split` picks a split of a saved DatasetDict. A missing file, an unknown extension or a file that
    cannot be read at all is a one-line JaxftError; bad single rows come back as RowError records.
    """
    return [Record(r.where, check_value(r.row)) for r in _read_any(path, split)]


def _read_any(path: str, split: str | None) -> list[Record]:
    p = Path(path).expanduser()
    if not p.exists():
        raise JaxftError(f"{path}: no such file or directory")
    if p.is_dir():
        return _read_saved(p, path, split)
    suffix = p.suffix.lower()
    codec = text_encoding(p, path) if suffix in (".jsonl", ".ndjson", ".json", ".csv") else None
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _first_char(p, codec) != "["):
        return _read_jsonl(p, path, codec)
    if suffix == ".json":
        return _read_json_array(p, path, codec)
    if suffix in (".parquet", ".csv"):
        return _read_with_datasets(p, path, suffix[1:], codec)
    raise JaxftError(f"{path}: unknown data file type {suffix or '(no extension)'!r} (expected {_SUFFIXES})")


MAX_DEPTH = 64  # nesting levels a row may have; real rows have ~4 (messages → list → object → string)


def check_value(row: Any) -> Any:
    """`row`, or a RowError when it is nested deeper than MAX_DEPTH or holds a string (or key) that is
    not valid Unicode text (a lone surrogate such as JSON's "\\ud83d").

    Done once, as rows are read, so that everything after (cleaning, hashing, the chat template, the
    tokenizer's batch call) sees only rows it can process: a deep row would otherwise be a
    RecursionError there and a lone surrogate a TypeError that fails the tokenizer call of every row
    in its batch. Iterative, so a deep row cannot overflow the stack here either.
    """
    if isinstance(row, RowError):
        return row
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return RowError("invalid text", f"invalid text ({e.reason}: {value[e.start]!r} at character "
                                                f"{e.start} of a string)")
        elif isinstance(value, (list, dict)):
            if depth > MAX_DEPTH:
                return RowError("too deeply nested", f"nested more than {MAX_DEPTH} levels deep")
            items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return row


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"), (BOM, "utf-8-sig"))  # UTF-32-LE's mark starts like UTF-16-LE's: tried first
_NO_BOM = {(True, True, True, False): "UTF-32-BE", (False, True, True, True): "UTF-32-LE",
           (True, False, True, False): "UTF-16-BE", (False, True, False, True): "UTF-16-LE"}  # where the NULs are


def text_encoding(p: Path, name: str) -> str:
    """The codec of a text data file: "utf-8", or "utf-8-sig" / "utf-16" / "utf-32" when it starts with that
    byte-order mark (Python's codecs of those names skip the mark). Text whose first four bytes hold NULs
    where UTF-16 / UTF-32 puts them around ASCII characters but has no mark is a one-line JaxftError:
    its byte order is a guess, and read as UTF-8 every row would be bad."""
    with open(p, "rb") as f:
        head = f.read(4)
    for mark, codec in _BOMS:
        if head.startswith(mark):
            return codec
    guess = _NO_BOM.get(tuple(b == 0 for b in head)) if len(head) == 4 else None
    if guess:
        raise JaxftError(f"{name}: looks like {guess} text without a byte-order mark; save it as UTF-8 "
                         "(or as UTF-16 with a byte-order mark)")
    return "utf-8"


def _first_char(p: Path, codec: str) -> str:
    """The first non-whitespace character of a text file ('' when empty)."""
    if codec != "utf-8":
        with open(p, encoding=codec, errors="replace") as f:
            while chunk := f.read(4096):
                if stripped := chunk.lstrip():
                    return stripped[0]
        return ""
    with open(p, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def _lines(p: Path, name: str, codec: str):
    """(line number from 1, the line) of a text file: bytes for UTF-8 (decoded line by line, so that one
    line that is not UTF-8 is one bad row), str for UTF-16 / UTF-32 (decoded whole: a decoding error
    there is the file's, a one-line JaxftError). Lines end at "\\n" only (CRLF leaves a "\\r" that JSON
    reads as whitespace; U+2028 inside a string is not a line end)."""
    if codec in ("utf-8", "utf-8-sig"):
        with open(p, "rb") as f:
            yield from enumerate(f, 1)
        return
    try:
        text = p.read_bytes().decode(codec)
    except UnicodeDecodeError as e:
        raise JaxftError(f"{name}: not valid {codec.upper()} text ({e.reason} at byte {e.start})") from None
    yield from enumerate(text.split("\n"), 1)


def _read_jsonl(p: Path, name: str, codec: str = "utf-8") -> list[Record]:
    """JSON Lines, one Record per line that is not blank; an undecodable line becomes a RowError record."""
    records = []
    for lineno, raw in _lines(p, name, codec):
        line = line_text(raw)
        if line is not None:
            records.append(Record(f"{name}:{lineno}", line if isinstance(line, RowError) else decode_line(line)))
    return records


def line_text(raw: bytes | str) -> str | RowError | None:
    """One JSON Lines line without its byte-order mark and line end; None when blank, a RowError when its
    bytes are not UTF-8. Shared with the streaming reader (jaxft.data.stream), so both see the same rows."""
    if isinstance(raw, bytes):
        if raw.startswith(BOM):
            raw = raw[len(BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return RowError("invalid JSON", f"invalid JSON (not UTF-8: {e.reason} at byte {e.start})") if raw.strip() \
                else None
    else:
        line = raw.removeprefix("\ufeff")
    return line.rstrip("\r\n") if line.strip() else None


def decode_line(line: str) -> Any:
    """One JSON line's value, or a RowError saying why it cannot be decoded."""
    try:
        return json.loads(line)
    except RecursionError:  # json's decoder recurses once per nesting level
        return RowError("too deeply nested", "invalid JSON (nested too deeply to decode)")
    except json.JSONDecodeError as e:
        return RowError("invalid JSON", f"invalid JSON ({e})")
    except ValueError as e:  # e.g. an integer of more than 4300 digits (int_max_str_digits)
        return RowError("invalid JSON", f"invalid JSON ({str(e).splitlines()[0]})")


def _read_json_array(p: Path, name: str, codec: str = "utf-8") -> list[Record]:
    """A top-level JSON array of rows, decoded element by element: one row of the wrong type, nested too
    deeply to decode or holding an out-of-range number is one bad row; broken syntax fails the file."""
    try:
        text = p.read_bytes().decode(codec)
    except UnicodeDecodeError as e:
        raise JaxftError(f"{name}: invalid JSON (not {codec.upper().removesuffix('-SIG')}: {e.reason} at byte "
                         f"{e.start})") from None
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    records: list[Record] = []
    i = ws.match(text).end() + 1  # past the "[" (read_rows checked that it is there)
    i = ws.match(text, i).end()
    if text[i:i + 1] == "]":
        return _end_of_array(text, i + 1, name, ws, records)
    while True:
        where = f"{name} row {len(records)}"
        try:
            row, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise JaxftError(f"{name}: invalid JSON ({e})") from None
        except (RecursionError, ValueError) as e:  # too deep, or e.g. an integer of more than 4300 digits
            end = _value_end(text, i)
            if end is None:
                raise JaxftError(f"{name}: invalid JSON (unterminated value at char {i})") from None
            reason = "too deeply nested" if isinstance(e, RecursionError) else "invalid JSON"
            row = RowError(reason, "invalid JSON (nested too deeply to decode)" if isinstance(e, RecursionError)
                           else f"invalid JSON ({str(e).splitlines()[0]})")
            i = end
        records.append(Record(where, row))
        i = ws.match(text, i).end()
        if text[i:i + 1] == "]":
            return _end_of_array(text, i + 1, name, ws, records)
        if text[i:i + 1] != ",":
            raise JaxftError(f"{name}: invalid JSON (expecting ',' or ']' at char {i})")
        i = ws.match(text, i + 1).end()


def _end_of_array(text: str, i: int, name: str, ws, records: list[Record]) -> list[Record]:
    if ws.match(text, i).end() != len(text):
        raise JaxftError(f"{name}: invalid JSON (extra data after the array at char {i})")
    return records


def _value_end(text: str, i: int) -> int | None:
    """The index just past the JSON value starting at text[i], found by matching brackets outside
    strings (no recursion); None when it never closes. Only used to skip a value json cannot decode."""
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if depth == 0 and not in_string and j > i and c in ",]} \t\n\r":
            return j  # a scalar (a huge number) ends at the next separator
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
            if depth < 0:
                return None
    return None


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without its progress bars, restoring the caller's setting afterwards."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_with_datasets(p: Path, name: str, kind: str, codec: str | None = None) -> list[Record]:
    """Parquet or CSV (in `codec`: see text_encoding) through `datasets`, with a throw-away cache so nothing
    is left behind. pandas' CSV reader skips blank and whitespace-only lines and reads CRLF line ends."""
    import datasets

    reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_csv
    extra = {"encoding": codec} if codec and codec != "utf-8" else {}
    with tempfile.TemporaryDirectory(prefix="jaxft-data-") as cache, _quiet_datasets():
        try:
            rows = reader(str(p), cache_dir=cache, keep_in_memory=True, **extra).to_list()
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types; report one line
            raise JaxftError(f"{name}: cannot read as {kind} ({one_line(e)})") from None
    return [Record(f"{name} row {i}", row) for i, row in enumerate(rows)]


def _read_saved(p: Path, name: str, split: str | None) -> list[Record]:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory."""
    return [Record(f"{name} row {i}", row) for i, row in enumerate(open_saved(p, name, split).to_list())]


def open_saved(p: Path, name: str, split: str | None, keep_in_memory: bool = True):
    """The `datasets.Dataset` of a save_to_disk directory (of `split` for a DatasetDict); keep_in_memory=False
    leaves it memory-mapped, as the streaming reader wants."""
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_from_disk(str(p), keep_in_memory=keep_in_memory)
    except Exception as e:  # noqa: BLE001
        raise JaxftError(f"{name}: not a datasets save_to_disk directory ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split in ds:
            ds = ds[split]
        elif len(names) == 1:
            ds = ds[names[0]]
        else:
            raise JaxftError(f"{name}: holds splits {', '.join(names)}; none is named {split!r}")
    return ds


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------- recognising and parsing rows


def detect_format(row: Any) -> str | None:
    """The SFT format a row's columns indicate, or None."""
    if not isinstance(row, dict):
        return None
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def parse_row(row: Any, fmt: str | None) -> Chat | Pair | Text:
    """A row of format `fmt` → Chat / Pair / Text, or RowError naming the problem.

    Strings are taken as they are (no stripping); "empty" means nothing but whitespace. fmt None
    (no row's columns matched a format, see `rows_format`) makes every row bad.
    """
    if not isinstance(row, dict):
        raise RowError("wrong type", f"row is a {typename(row)}, expected an object")
    if fmt is None:
        raise RowError("unknown format", f"columns ({', '.join(row) or 'none'}) match no format: messages, "
                                         "prompt/completion, instruction/output, conversations or text")
    if fmt == "messages":
        return _chat(parse_messages(get_field(row, "messages"), "messages", ROLES), (), parse_tools(row))
    if fmt == "sharegpt":
        return _chat(parse_messages(get_field(row, "conversations"), "conversations", SHAREGPT_ROLES), (),
                     parse_tools(row))
    if fmt == "prompt_completion":
        return prompt_completion(get_field(row, "prompt"), get_field(row, "completion"), parse_tools(row))
    if fmt == "alpaca":
        return _alpaca(row)
    if fmt == "text":
        text = _string(row, "text")
        if not text.strip():
            raise RowError("empty text", "'text' is empty")
        return Text(text)
    raise JaxftError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")


def get_field(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise RowError("missing field", f"missing field {name!r}")
    return value


def _string(row: dict, name: str) -> str:
    value = get_field(row, name)
    if not isinstance(value, str):
        raise RowError("wrong type", f"{name!r} is a {typename(value)}, expected a string")
    return value


def typename(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def parse_messages(value: Any, name: str, roles: dict[str, str]) -> list[dict]:
    """A list of messages (`parse_message`) → [{"role", "content", ...}] with known roles."""
    if not isinstance(value, list):
        raise RowError("wrong type", f"{name!r} is a {typename(value)}, expected a list of messages")
    return [parse_message(m, f"{name}[{i}]", roles) for i, m in enumerate(value)]


def parse_message(m: Any, where: str, roles: dict[str, str]) -> dict:
    """One message → {"role", "content"} (+ "tool_calls" on an assistant turn that calls tools, + "name" /
    "tool_call_id" on a tool turn), in the layout transformers' chat templates read (OpenAI's, HF's).

    {role, content} or sharegpt's {from, value}. content: a string, or a list of parts of which only text
    parts ({"type": "text", "text": ...}) are taken, joined with "\\n" (as vLLM joins them for a text-only
    model); an image, audio or other part is a RowError (jaxft trains text-only models). An assistant turn
    with `tool_calls` may have no content (None: taken as ""). `where` names the message in errors.
    """
    if not isinstance(m, dict):
        raise RowError("wrong type", f"{where} is a {typename(m)}, expected an object")
    sharegpt = "from" in m or "value" in m
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role = m.get(role_key)
    if role is None:
        raise RowError("missing field", f"missing field '{where}.{role_key}'")
    if not isinstance(role, str):
        raise RowError("wrong type", f"'{where}.{role_key}' is a {typename(role)}, expected a string")
    if role not in roles:
        raise RowError("unknown role", f"unknown role {role!r} in {where}")
    out = {"role": roles[role]}
    calls = None if sharegpt else m.get("tool_calls")
    if calls is not None and calls != []:
        if out["role"] != "assistant":
            raise RowError("bad tool call", f"'{where}.tool_calls' on a {out['role']} turn (only assistant turns "
                                            "call tools)")
        calls = parse_tool_calls(calls, f"{where}.tool_calls")
    content = m.get(content_key)
    if content is None and not calls:
        raise RowError("missing field", f"missing field '{where}.{content_key}'")
    out["content"] = "" if content is None else _text(content, f"{where}.{content_key}")
    if calls:
        out["tool_calls"] = calls
    if out["role"] == "tool":
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise RowError("wrong type", f"'{where}.{key}' is a {typename(m[key])}, expected a string")
                out[key] = m[key]
    return out


def _text(content: Any, where: str) -> str:
    """A message's content as one string: a string as it is, a list of text parts joined with "\\n"."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError("wrong type", f"'{where}' is a {typename(content)}, expected a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise RowError("wrong type", f"'{where}[{i}]' is a {typename(part)}, expected a content part object")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise RowError("non-text content", f"'{where}[{i}]' is a content part of type {repr(kind)[:40]}; jaxft trains "
                                               "text-only models (text parts are joined; image, audio and other "
                                               "parts are refused)")
        text = part.get("text")
        if not isinstance(text, str):
            raise RowError("wrong type" if text is not None else "missing field",
                           f"'{where}[{i}].text' is {'missing' if text is None else 'a ' + typename(text)}, "
                           "expected a string")
        texts.append(text)
    return "\n".join(texts)


def parse_tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's tool calls → [{"type": "function", "function": {"name", "arguments": {...}}}] (+ "id"
    when given), the layout transformers documents for chat templates. Each call is OpenAI's
    {"type": "function", "function": {...}} or the bare {"name", "arguments"}; `arguments` an object or, as
    OpenAI's API writes it, a JSON string of one (decoded here: templates render it with `tojson`)."""
    if not isinstance(value, list):
        raise RowError("bad tool call", f"'{where}' is a {typename(value)}, expected a list of tool calls")
    calls = []
    for i, call in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise RowError("bad tool call", f"'{w}' is a {typename(call)}, expected an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise RowError("bad tool call", f"'{w}.function' is a {typename(fn)}, expected an object")
        name, args = fn.get("name"), fn.get("arguments", {})
        if not isinstance(name, str) or not name.strip():
            raise RowError("bad tool call", f"'{w}' has no function name")
        if isinstance(args, str):
            args = _json_value(args, f"'{w}' arguments", "bad tool call")
        if not isinstance(args, dict):
            raise RowError("bad tool call", f"'{w}' arguments are a {typename(args)}, expected an object")
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def parse_tools(row: dict) -> tuple[dict, ...] | None:
    """A row's `tools` column, as transformers' `apply_chat_template(tools=...)` takes it: a list of tool
    definitions (OpenAI's {"type": "function", "function": {"name", ...}} or a bare {"name", ...} schema),
    or that list as a JSON string (how many datasets store it). None (or []) when there are none."""
    value = row.get("tools")
    if isinstance(value, str):
        value = _json_value(value, "'tools'", "bad tools") if value.strip() else None
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowError("bad tools", f"'tools' is a {typename(value)}, expected a list of tool definitions")
    for i, tool in enumerate(value):
        if not isinstance(tool_name(tool), str) or not tool_name(tool).strip():
            raise RowError("bad tools", f"'tools[{i}]' is not a tool definition with a function name")
    return tuple(value)


def tool_name(tool: Any) -> Any:
    """The function name of a tool definition (OpenAI's nested layout or a bare schema); None if it has none."""
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function")
    return (fn if isinstance(fn, dict) else tool).get("name")


def _json_value(text: str, what: str, reason: str) -> Any:
    """A JSON string inside a row (tool arguments, a tools column), decoded and checked like a row."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise RowError(reason, f"{what}: a JSON string nested too deeply to decode") from None
    except ValueError as e:
        raise RowError(reason, f"{what}: a string that is not valid JSON ({str(e).splitlines()[0]})") from None
    checked = check_value(value)
    if isinstance(checked, RowError):
        raise RowError(reason, f"{what}: {checked}")
    return value


def _chat(messages: list[dict], context: tuple[int, ...], tools: tuple[dict, ...] | None = None) -> Chat:
    """Check a conversation; every assistant message not listed in `context` is trained."""
    roles = [m["role"] for m in messages]
    trained = tuple(i for i, r in enumerate(roles) if r == "assistant" and i not in context)
    if not trained:
        raise RowError("no assistant turn", "conversation has no assistant turn to train on")
    first = next(i for i, r in enumerate(roles) if r != "system")
    if roles[first] == "assistant":
        raise RowError("assistant before user", f"message {first} is an assistant turn before any user turn")
    for i in trained:
        if not messages[i]["content"].strip() and not messages[i].get("tool_calls"):
            raise RowError("empty assistant content", f"message {i}: empty assistant content")
    return Chat(tuple(messages), trained, tools)


def prompt_completion(prompt: Any, completion: Any, tools: tuple[dict, ...] | None = None) -> Chat | Pair:
    """Strings → Pair; chat-style lists (TRL's conversational prompt-completion) → Chat, as are strings that
    come with tool definitions (only a chat template can show them)."""
    for name, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, (str, list)):
            raise RowError("wrong type", f"{name!r} is a {typename(v)}, expected a string or a list of messages")
    if isinstance(prompt, str) and isinstance(completion, str) and tools is None:
        if not completion.strip():
            raise RowError("empty completion", "'completion' is empty")
        return Pair(prompt, completion)
    p = parse_messages(prompt, "prompt", ROLES) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    c = (parse_messages(completion, "completion", ROLES) if isinstance(completion, list)
         else [{"role": "assistant", "content": completion}])
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in c):
        raise RowError("empty completion", "'completion' has no non-empty assistant message")
    return _chat(p + c, context=tuple(range(len(p))), tools=tools)


def _alpaca(row: dict) -> Chat:
    """instruction (+ "\\n\\n" + input when non-empty) as the user turn, output as the assistant turn."""
    instruction, output = _string(row, "instruction"), _string(row, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("wrong type", f"'input' is a {typename(extra)}, expected a string")
    if not output.strip():
        raise RowError("empty completion", "'output' is empty")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Chat(({"role": "user", "content": user}, {"role": "assistant", "content": output}), (1,))


def rows_format(records: list[Record], fmt: str = "auto") -> str | None:
    """`fmt`, or for "auto" the format of the first row whose columns indicate one (None if none does):
    a file's format, what `row_format` falls back to."""
    if fmt != "auto":
        return fmt
    return next((f for r in records if (f := detect_format(r.row)) is not None), None)


def row_format(row: Any, fmt: str, file_format: str | None) -> str | None:
    """The format one row is parsed as: `fmt` when it names one; for "auto" the row's own columns' format,
    so that a file may mix formats (as `jaxft prepare` of several files writes them), else its file's
    (`rows_format`), so that a row missing a field is told which one ("missing field 'completion'")."""
    if fmt != "auto":
        return fmt
    return detect_format(row) or file_format


def holdout(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the seeded validation part of n rows (at least 1 and at most n-1 when
    fraction > 0 and n ≥ 2)."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, dtype=np.int64)
    k = min(max(round(n * fraction), 1), n - 1)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
