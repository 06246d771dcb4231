"""Supervised fine-tuning data: rows → chat template → token ids and loss masks → packed batches.

    examples, report = load_examples(run.data, tokenizer)         # list[Example], DataReport
    print(report.summary())
    batches = Batches(examples, batch_size=8, seq_len=run.data.max_length, packing=True, seed=0)
    batch = batches.batch(step)     # tokens, positions, segment_ids, targets, loss_mask: each [B, S]

Formats (`data.format`; "auto" picks each row's from its columns, so one file may mix them, and a row
whose columns match none is parsed as the file's format, that of the first row that has one): messages
(role/content), prompt_completion (strings, or TRL's chat-style lists), alpaca (instruction/input/output),
sharegpt (conversations of from/value) and text. Reading and row checks live in `jaxft.data.rows`; this
module needs the tokenizer.

Loss masks. A chat row is rendered once with `tokenizer.apply_chat_template(tokenize=False)` and
tokenized with character offsets. Each trained assistant turn k is located by rendering prefixes:
`messages[:k]` with the generation prompt ends where the reply starts, and `messages[:k+1]` ends
where it ends (trailing whitespace after the end-of-turn token excluded). Both renderings must be
prefixes of the full text, otherwise the template is refused. A token is a target when its first
character lies in such a span: the assistant content and the end-of-turn token are targets; the
role header and the newline after the end-of-turn token are not. The token ids are exactly those
of `apply_chat_template(tokenize=True)`.

Tool use (as TRL's assistant-only loss treats it): a row's `tools` column goes to the template as
`apply_chat_template(messages, tools=...)` does; an assistant turn that calls tools is trained like any
assistant turn (its rendered calls and end of turn); tool turns (results) are context, never targets. A
template that cannot show the tool use (it raises, or its text lacks a call, a tool turn or a tool
definition: `check_tool_use`) makes the row bad, with its file:line.

EOS: a chat rendering whose text ends (before trailing whitespace) with the EOS token is kept as
it is (ChatML's `<|im_end|>` closes the turn); otherwise an EOS target is appended, as it is for
text and plain prompt/completion rows. `Example.loss_mask[0]` is always False: nothing predicts
the first token.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from dataclasses import dataclass, field

import numpy as np
from jinja2 import TemplateError

from jaxft.config import DataConfig
from jaxft.data.rows import (Chat, Pair, Record, RowError, Text, holdout, one_line, parse_row, read_rows, row_format,
                             rows_format, tool_name)
from jaxft.errors import JaxftError

MAX_ERRORS = 5  # first bad rows kept in a report
TOKENIZE_CHUNK = 1024  # rendered rows per tokenizer call


@dataclass
class DataReport:
    """What loading did, for the user: rows read → examples kept, and why the others were not."""

    rows: int = 0  # rows read for this split
    examples: int = 0  # examples kept
    skipped: int = 0  # bad rows
    truncated: int = 0  # examples cut to max_length (and kept)
    dropped: int = 0  # longer than max_length under overlong=drop, or nothing to train on
    tokens: int = 0  # tokens in the kept examples
    target_tokens: int = 0  # trained targets in the kept examples (sum of loss masks)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)  # "train.jsonl:17: invalid JSON (...)"

    def add_bad(self, where: str, error: RowError) -> None:
        """Count a bad row under its reason; keep its location and cause if it is among the first."""
        self.skipped += 1
        self.skipped_by_reason[error.reason] = self.skipped_by_reason.get(error.reason, 0) + 1
        if len(self.first_errors) < MAX_ERRORS:
            self.first_errors.append(f"{where}: {error}")

    def summary(self) -> str:
        """One line of counts, and a second naming the first bad row when there is one."""
        line = (f"{self.rows:,} rows → {self.examples:,} examples, {self.tokens:,} tokens "
                f"({self.target_tokens:,} trained)")
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped_by_reason.items(), key=lambda x: -x[1]))
            line += f"; {self.skipped:,} bad rows skipped ({reasons})"
        if self.truncated or self.dropped:
            line += f"; {self.truncated:,} truncated, {self.dropped:,} dropped"
        if self.first_errors:
            line += f"\n  first bad row: {self.first_errors[0]}"
        return line


@dataclass(eq=False)
class Example:
    """One tokenized document.

    tokens:    int32 [n], chat template applied; ends with EOS (for a chat template that closes turns
               with EOS, e.g. ChatML, that EOS plus the template's trailing newline), unless truncated.
    loss_mask: bool [n]; loss_mask[i] ⇔ tokens[i] is a target, predicted from tokens[:i].
    """

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------- rows → token ids and masks


@dataclass
class Rendered:
    """A parsed row as text, before tokenization."""

    text: str
    spans: list[tuple[int, int]] | None  # trained character spans [begin, end); None = every token
    chat: bool  # a chat-template rendering (no special tokens added); else plain text (BOS if the tokenizer adds one)
    where: str = "row"  # the row it came from ("train.jsonl:17"), for errors


class Encoder:
    """Turns parsed rows (Chat / Pair / Text) into (token ids int32 [n], loss mask bool [n]).

    `render` works row by row; `tokenize` takes many rendered rows at once (one tokenizer call; a row
    the tokenizer rejects comes back as a RowError in its place, the others as usual).
    """

    def __init__(self, tokenizer, train_on_prompt: bool = False, system_prompt: str | None = None):
        if tokenizer.eos_token_id is None:
            raise JaxftError("tokenizer has no EOS token; set one before training")
        self.tok = tokenizer
        self.eos_id, self.eos = int(tokenizer.eos_token_id), tokenizer.eos_token
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.train_on_prompt, self.system_prompt = train_on_prompt, system_prompt

    def encode(self, parsed: Chat | Pair | Text, where: str = "row") -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss mask of one parsed row (RowError when the tokenizer rejects it)."""
        out = self.tokenize([self.render(parsed, where)])[0]
        if isinstance(out, RowError):
            raise out
        return out

    def render(self, parsed: Chat | Pair | Text, where: str) -> Rendered:
        """The row's text and trained spans (RowError for a row the chat template rejects)."""
        if isinstance(parsed, Text):
            return Rendered(parsed.text, None, chat=False, where=where)
        if isinstance(parsed, Pair) and not self.has_template:
            text = parsed.prompt + parsed.completion
            return Rendered(text, None if self.train_on_prompt else [(len(parsed.prompt), len(text))], chat=False,
                            where=where)
        if isinstance(parsed, Pair):
            parsed = Chat(({"role": "user", "content": parsed.prompt},
                           {"role": "assistant", "content": parsed.completion}), (1,))
        return self._render_chat(parsed, where)

    def _render_chat(self, chat: Chat, where: str) -> Rendered:
        """The chat template's rendering (with the row's tools); trained spans = the trained assistant turns.
        A conversation with tool use is refused (RowError) when the template leaves any of it out."""
        if not self.has_template:
            raise JaxftError(f"{where}: the tokenizer has no chat template, which chat rows need "
                             "(text rows and string prompt/completion rows work without one)")
        messages, trained, tools, shift = list(chat.messages), chat.trained, chat.tools, 0
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
            trained, shift = tuple(i + 1 for i in trained), 1
        text = self._apply(messages, False, tools)
        check_tool_use(messages, tools, lambda m, t: self._apply(m, False, t), shift)
        spans = None if self.train_on_prompt else self._spans(messages, trained, text, where, tools)
        return Rendered(text, spans, chat=True, where=where)

    def _spans(self, messages: list[dict], trained: tuple[int, ...], text: str, where: str, tools=None):
        """Character spans [begin, end) of the trained assistant turns in `text`, by prefix rendering."""
        spans = []
        for k in trained:
            head = self._apply(messages[:k], True, tools)
            upto = text if k + 1 == len(messages) else self._apply(messages[:k + 1], False, tools)
            if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
                raise JaxftError(
                    f"{where}: the chat template renders earlier turns differently once later turns follow "
                    f"(message {k} is not at the same place in the prefix and in the whole conversation), so the "
                    "assistant tokens cannot be located; set data.train_on_prompt=true or use another template")
            spans.append((len(head), len(upto.rstrip())))
        return spans

    def _apply(self, messages: list[dict], generation_prompt: bool, tools=None) -> str:
        try:
            return self.tok.apply_chat_template(messages, tools=None if tools is None else list(tools), tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise RowError("chat template error", f"chat template error: {e}") from None
        except Exception as e:  # noqa: BLE001 — a template's own Python errors (None + str, a bad filter input)
            raise RowError("chat template error", f"chat template error ({one_line(e)[:200]})") from None

    def tokenize(self, docs: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray] | RowError]:
        """Token ids int32 [n] and loss mask bool [n] of each rendered row, or a RowError for a row the
        tokenizer rejects: the batch call fails as a whole, so on failure each row is tokenized alone
        and only the rows that fail alone are bad."""
        out: list = [None] * len(docs)
        for chat in (True, False):
            idx = [i for i, d in enumerate(docs) if d.chat == chat]
            if not idx:
                continue
            try:
                encs = [(idx, self._call([docs[i].text for i in idx], chat))]
            except JaxftError:  # the tokenizer itself cannot be used: not a row's fault
                raise
            except Exception:  # noqa: BLE001 — some row is bad: find which, below
                encs = []
                for i in idx:
                    try:
                        encs.append(([i], self._call([docs[i].text], chat)))
                    except JaxftError:
                        raise
                    except Exception as e:  # noqa: BLE001 — tokenizers raise TypeError, ValueError, ...
                        out[i] = RowError("tokenizer error", f"tokenizer error ({one_line(e)[:200]})")
            for rows, enc in encs:
                for j, i in enumerate(rows):
                    starts = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)[:, 0]
                    out[i] = self._finish(docs[i], np.asarray(enc["input_ids"][j], dtype=np.int32), starts)
        return out

    def _call(self, texts: list[str], chat: bool):
        try:
            return self.tok(texts, add_special_tokens=not chat, return_offsets_mapping=True)
        except NotImplementedError:
            raise JaxftError(f"{type(self.tok).__name__} gives no character offsets; jaxft needs a fast "
                             "(tokenizers-backed) tokenizer to locate the trained tokens") from None

    def _finish(self, doc: Rendered, ids: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loss mask from the spans; EOS appended unless the text already ends with it."""
        if not doc.chat and len(ids) and ids[-1] == self.eos_id and not doc.text.endswith(self.eos):
            ids, starts = ids[:-1], starts[:-1]  # an EOS the tokenizer added itself: re-added below as a target
        mask = np.zeros(len(ids), bool) if doc.spans is not None else np.ones(len(ids), bool)
        for begin, end in doc.spans or ():
            mask |= (starts >= begin) & (starts < end)
        ends_with_eos = doc.text.rstrip().endswith(self.eos) if doc.chat else (len(ids) and ids[-1] == self.eos_id)
        if not ends_with_eos:
            ids, mask = np.append(ids, np.int32(self.eos_id)), np.append(mask, True)
        if len(mask):
            mask[0] = False  # nothing predicts the first token
        return ids.astype(np.int32), mask


# ---------------------------------------------------------------- tool use the template must show


def check_tool_use(messages: list[dict], tools, render, shift: int = 0) -> None:
    """RowError when the chat template leaves any of a conversation's tool use out of its text.

    A template without tool support raises (a RowError of `render`), or, worse, renders without a word:
    ignores `tools`, drops `tool_calls` (showing an empty assistant turn) or skips tool turns, and the model
    then learns to call tools it was never shown or to answer from results it never saw. So the conversation
    is rendered once more (`render(messages, tools) -> str`) with every tool's and tool call's function name
    and every tool turn's content replaced by a marker of its own, of letters and digits (which trimming,
    `tojson` and escaping leave as they are), and each marker must be in the text. `shift`: messages added before the
    row's own (a system prompt), left out of the message numbers in errors.
    """
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return
    wanted: list[tuple[str, str]] = []  # (marker, what it stands for); each marker unique, so that a call's
    # name found among the tool definitions does not pass for the call

    def mark(what: str) -> str:
        wanted.append((f"jaxftprobe{len(wanted)}x", what))
        return wanted[-1][0]

    probe_tools = None if tools is None else [
        _renamed(t, mark(f"the tools column's tools[{i}] ({repr(tool_name(t))[:60]})")) for i, t in enumerate(tools)]
    probe = []
    for i, m in enumerate(messages):
        m, n = dict(m), i - shift
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "name": mark(
                f"message {n}'s call of {repr(c['function']['name'])[:60]}")}} for c in m["tool_calls"]]
        if m["role"] == "tool" and m["content"].strip():
            m["content"] = mark(f"message {n} (a tool turn)")
        probe.append(m)
    text = render(probe, probe_tools)
    missing = next((what for marker, what in wanted if marker not in text), None)
    if missing is not None:
        raise RowError("template without tool support", f"the chat template leaves out {missing}: it cannot render "
                                                        "tool use (set a chat template that does)")


def _renamed(tool: dict, name: str) -> dict:
    """A tool definition with its function name replaced (OpenAI's nested layout or a bare schema)."""
    if isinstance(tool.get("function"), dict):
        return {**tool, "function": {**tool["function"], "name": name}}
    return {**tool, "name": name}


# ---------------------------------------------------------------- loading a split


def load_examples(cfg: DataConfig, tokenizer, split: str = "train") -> tuple[list[Example], DataReport]:
    """The tokenized examples of a split and a report of what was kept, skipped, cut and dropped.

    "train" reads cfg.train; "validation" reads cfg.validation, or, when that is None and
    cfg.validation_fraction > 0, the seeded held-out part of cfg.train (which "train" then excludes).
    With neither, "validation" is ([], an empty report). Bad rows are skipped and counted (under
    cfg.strict the first raises JaxftError with its file:line); no usable row is a JaxftError.
    """
    source, records = split_records(cfg, split)
    report = DataReport(rows=len(records))
    if source is None:
        return [], report
    encoder = Encoder(tokenizer, cfg.train_on_prompt, cfg.system_prompt)
    examples = encode_records(records, cfg, encoder, report, rows_format(records, cfg.format))
    if not examples:
        raise JaxftError(f"{source}: no usable rows ({why_none(report, cfg)})")
    return examples, report


def encode_records(records: list[Record], cfg: DataConfig, encoder: Encoder, report: DataReport,
                   fmt: str | None) -> list[Example]:
    """The examples of `records` in order, counting bad, cut and dropped rows and the kept examples and tokens
    into `report` (which `jaxft.data.stream` carries from one window of rows to the next). fmt: the file's
    format (rows_format), for rows whose own columns name none."""
    rendered = []
    for rec in records:
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            rendered.append(encoder.render(parse_row(rec.row, row_format(rec.row, cfg.format, fmt)), rec.where))
        except RowError as e:
            bad_row(cfg, report, rec.where, e)
    examples = []
    for i in range(0, len(rendered), TOKENIZE_CHUNK):
        chunk = rendered[i:i + TOKENIZE_CHUNK]
        for doc, encoded in zip(chunk, encoder.tokenize(chunk)):
            if isinstance(encoded, RowError):
                bad_row(cfg, report, doc.where, encoded)
            elif (example := _fit(*encoded, cfg, report)) is not None:
                examples.append(example)
    report.examples += len(examples)
    report.tokens += sum(len(e.tokens) for e in examples)
    report.target_tokens += int(sum(e.loss_mask.sum() for e in examples))
    return examples


def bad_row(cfg: DataConfig, report: DataReport, where: str, error: RowError) -> None:
    """Count a bad row, or under data.strict stop with its file:line and cause."""
    if cfg.strict:
        raise JaxftError(f"{where}: {error}")
    report.add_bad(where, error)


def split_records(cfg: DataConfig, split: str) -> tuple[str | None, list[Record]]:
    """(the file a split comes from, its records); (None, []) for an unconfigured validation split."""
    if split not in ("train", "validation"):
        raise JaxftError(f"split: {split!r} is not 'train' or 'validation'")
    if split == "validation" and cfg.validation is not None:
        return cfg.validation, read_rows(cfg.validation, "validation")
    held_out = cfg.validation is None and cfg.validation_fraction > 0
    if split == "validation" and not held_out:
        return None, []
    if not cfg.train:
        raise JaxftError("data.train: no training data file set")
    records = read_rows(cfg.train, "train")
    val = set(holdout(len(records), cfg.validation_fraction, cfg.seed).tolist()) if held_out else set()
    return cfg.train, [r for i, r in enumerate(records) if (i in val) == (split == "validation")]


def _fit(ids: np.ndarray, mask: np.ndarray, cfg: DataConfig, report: DataReport) -> Example | None:
    """Apply max_length / overlong; None (counted as dropped) when nothing is left to train on."""
    cut = len(ids) > cfg.max_length
    if cut and cfg.overlong == "drop":
        report.dropped += 1
        return None
    if cut:
        ids, mask = ids[:cfg.max_length], mask[:cfg.max_length]
    if not mask.any():
        report.dropped += 1
        return None
    report.truncated += cut
    return Example(ids, mask)


def why_none(report: DataReport, cfg: DataConfig) -> str:
    if report.rows == 0:
        return "no rows in the file"
    if report.dropped:
        return (f"{report.skipped} bad, {report.dropped} longer than max_length={cfg.max_length} "
                f"(overlong={cfg.overlong}) or with nothing to train on")
    return f"all {report.rows} bad; first: {report.first_errors[0]}"


# ---------------------------------------------------------------- batches


class Batches:
    """Deterministic batches for resumable training: batch(i) depends only on (examples, seed, i).

    Rows: with packing, examples are placed best-fit (in an order shuffled with `seed`) into rows of
    `seq_len` tokens, once; without it each example is its own row. Each epoch visits every row once
    in an order shuffled with (seed, epoch); the last batch of an epoch is topped up with empty rows.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, packing: bool, seed: int):
        if not examples:
            raise ValueError("Batches: no examples")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"Batches: batch_size={batch_size} and seq_len={seq_len} must be ≥ 1 and ≥ 2")
        longest = max(len(e) for e in examples)
        if longest > seq_len:
            raise ValueError(f"Batches: an example has {longest} tokens, more than seq_len={seq_len}")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed = seed % 2**32
        lengths = [len(e) for e in examples]
        self.rows = pack(lengths, seq_len, self.seed) if packing else [[i] for i in range(len(examples))]
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    def batch(self, i: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Global step i → {tokens, positions, segment_ids, targets (int32), loss_mask (float32)}, each
        [batch_size, seq_len]. Epoch i // len(self), position i % len(self) in that epoch's order.
        rows: only these rows of the batch (a process's share of a global batch) are assembled."""
        if i < 0:
            raise ValueError(f"Batches.batch: step {i} < 0")
        epoch, j = divmod(i, len(self))
        order = list(self._epoch_order(epoch)[j * self.batch_size:(j + 1) * self.batch_size])
        order += [None] * (self.batch_size - len(order))  # the epoch's last batch: topped up with empty rows
        return self._assemble([[] if r is None else self.rows[r] for r in order[rows]])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's row order (the last one is cached; safe to call from a prefetch thread)."""
        cached = self._order
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch + 1]).permutation(len(self.rows)))
            self._order = cached
        return cached[1]

    def _assemble(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        return layout([[self.examples[d] for d in doc_ids] for doc_ids in rows], len(rows), self.seq_len)


def layout(rows: list[list[Example]], n_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Lay each row's documents out left to right; unused rows and positions stay 0 (padding).

    Returns tokens, positions, segment_ids, targets (int32) and loss_mask (float32), each [n_rows, seq_len].
    """
    shape = (n_rows, seq_len)
    out = {k: np.zeros(shape, np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
    out["loss_mask"] = np.zeros(shape, np.float32)
    for r, docs in enumerate(rows):
        offset = 0
        for seg, ex in enumerate(docs, 1):
            n, end = len(ex.tokens), offset + len(ex.tokens)
            out["tokens"][r, offset:end] = ex.tokens
            out["positions"][r, offset:end] = np.arange(n)
            out["segment_ids"][r, offset:end] = seg
            out["targets"][r, offset:end - 1] = ex.tokens[1:]  # the last token has no target
            out["loss_mask"][r, offset:end - 1] = ex.loss_mask[1:]
            offset = end
    return out


def pack(lengths: list[int], seq_len: int, seed: int) -> list[list[int]]:
    """Best-fit packing of documents (visited in a seeded shuffled order) into rows of seq_len.

    Returns rows as lists of document indices; each document goes to the row whose free space is
    the smallest that still fits it, or to a new row.
    """
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    rows: list[list[int]] = []
    for d in np.random.default_rng([seed]).permutation(len(lengths)).tolist():
        n = lengths[d]
        k = bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(d)
        if space - n > 0:
            insort(free, (space - n, r))
    return rows
