"""Before any model loads: does a data file have one usable row of the kind an objective reads?

    check_file("data/train.jsonl", "sft", fmt="auto", where="data.train")

A file whose columns are wrong for the objective (an SFT run pointed at preference pairs, a typo in a column
name) fails here, in a second, with the file and the first row's cause — not after the model (and its
tokenizer) loaded. Rows are read and parsed as the loaders do, without a tokenizer: what only tokenizing can
find (a row longer than max_length, a chat template that rejects it) is still the loaders' to report.
"""

from __future__ import annotations

from jaxft.data.pairs import parse_pair
from jaxft.data.prompts import parse_prompt
from jaxft.data.rows import RowError, parse_row, read_rows, row_format, rows_format
from jaxft.data.stream import records as stream_records
from jaxft.errors import JaxftError

KINDS = ("sft", "pairs", "prompts")  # what the SFT, preference (DPO, reward) and RL (GRPO, RLOO, PPO) loaders read


def check_file(path: str, kind: str, fmt: str = "auto", where: str = "", lazy: bool = False) -> None:
    """JaxftError '<where>: <path>: no usable rows (...)' when not one row of the file parses as `kind`.
    lazy (data.streaming): rows are read only up to the first usable one, each parsed as its own columns say."""
    records = (r for r, _ in stream_records(path)) if lazy else read_rows(path)
    if kind == "sft" and lazy:
        parse = lambda row: parse_row(row, row_format(row, fmt, None))  # noqa: E731
    elif kind == "sft":
        f = rows_format(records, fmt)
        parse = lambda row: parse_row(row, f)  # noqa: E731
    else:
        parse = parse_pair if kind == "pairs" else parse_prompt
    first, n = None, 0
    for rec in records:
        n += 1
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            parse(rec.row)
            return
        except RowError as e:
            first = first or f"{rec.where}: {e}"
    what = {"sft": "SFT rows", "pairs": "preference pairs", "prompts": "prompts"}[kind]
    cause = f"all {n} bad; first: {first}" if n else "no rows in the file"
    raise JaxftError(f"{where + ': ' if where else ''}{path}: no usable {what} ({cause})")
