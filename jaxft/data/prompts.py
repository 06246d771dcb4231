"""Prompt-only rows for on-policy objectives (GRPO, RLOO, PPO): rows → prompts, token ids, reward columns.

    prompts, report = load_prompts(run.data, tokenizer, "train")
    prompts[0].ids      # [5, 9, ...]: chat template with the generation prompt, or the plain text's tokens
    prompts[0].prompt   # what reward functions see: a string, or a list of {"role", "content"} messages
    prompts[0].columns  # every other column of the row, e.g. {"solution": '{"name": ...}'}

Row formats (TRL's, plus the project's chat files):
- `prompt`: a string (tokenized as plain text, with the tokenizer's special tokens, as TRL does) or a list
  of messages (conversational: chat template + generation prompt, with the row's `tools` column passed to
  the template as SFT passes it; messages may hold tool calls and tool turns);
- `messages`: a conversation; when it ends with an assistant turn, that turn is removed and its content
  becomes the `solution` column (the quickstart task's files work as they are, the answer is the reference).
  `prompt_completion` rows likewise: the completion becomes `solution`.

Every column other than prompt / messages / completion is passed to the reward functions as a keyword
argument (one value per completion). A prompt longer than data.max_length tokens is dropped and counted
(TRL never truncates prompts). Nothing here imports jax.

Held-out items for `jaxft eval`: `heldout` (prompt, reference) rows; `shot_pool` / `few_shot` / `with_shots`
build eval.few_shot's K-shot prompts from training rows, never one asking a held-out question.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from jaxft.config import DataConfig
from jaxft.data.encode import DataReport, bad_row, check_tool_use, split_records
from jaxft.data.pairs import parse_pair
from jaxft.data.rows import (ROLES, Chat, Pair, RowError, Text, parse_messages, parse_row, parse_tools, read_rows,
                             row_format, rows_format, typename)
from jaxft.errors import JaxftError

PROMPT_KEYS = ("prompt", "messages", "completion")
GENERAL_PROMPTS = Path(__file__).with_name("general_prompts.jsonl")  # 100 varied instructions written for jaxft


@dataclasses.dataclass
class Prompt:
    ids: list[int]  # token ids fed to the sampler
    prompt: str | list[dict]  # as reward functions receive it
    columns: dict[str, Any]  # the row's other columns (+ "solution" from a final assistant turn)
    where: str = "row"


def parse_prompt(row: Any) -> tuple[str | list[dict], dict[str, Any]]:
    """A row → (prompt string or message list, extra columns), or RowError."""
    if not isinstance(row, dict):
        raise RowError("wrong type", f"row is a {typename(row)}, expected an object")
    columns = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    if row.get("prompt") is not None:
        p = row["prompt"]
        if isinstance(p, list):
            p = parse_messages(p, "prompt", ROLES)
        elif not isinstance(p, str):
            raise RowError("wrong type", f"'prompt' is a {typename(p)}, expected a string or a list of messages")
        if isinstance(row.get("completion"), (str, list)) and "solution" not in columns:
            c = row["completion"]
            columns["solution"] = c if isinstance(c, str) else next(
                (m.get("content") for m in reversed(c) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    elif row.get("messages") is not None:
        p = parse_messages(row["messages"], "messages", ROLES)
        if p and p[-1]["role"] == "assistant":
            columns.setdefault("solution", p[-1]["content"])
            p = p[:-1]
        if not any(m["role"] == "user" for m in p):
            raise RowError("no user turn", "the conversation has no user turn to answer")
    else:
        raise RowError("missing field", f"no 'prompt' or 'messages' column (columns: {', '.join(row) or 'none'})")
    if (p if isinstance(p, str) else "".join(m["content"] for m in p)).strip() == "":
        raise RowError("empty prompt", "the prompt is empty")
    return p, columns


def encode_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None,
                  tools: tuple[dict, ...] | None = None) -> list[int]:
    """Token ids of a prompt: chat template with the generation prompt (and the row's `tools`, as SFT passes
    them), or the plain text's tokens. RowError when the template leaves out the prompt's tool use."""
    if isinstance(prompt, str):
        if tools:
            raise RowError("bad tools", "a 'tools' column needs a prompt of chat messages (a plain string prompt "
                                        "gets no chat template to show the tools)")
        return list(tokenizer(prompt)["input_ids"])
    shift = 0
    if system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt, shift = [{"role": "system", "content": system_prompt}] + prompt, 1

    def render(messages: list[dict], defs) -> str:
        return tokenizer.apply_chat_template(messages, tools=None if defs is None else list(defs), tokenize=False,
                                             add_generation_prompt=True)

    text = render(prompt, tools)
    check_tool_use(prompt, tools, render, shift)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(cfg: DataConfig, tokenizer, split: str = "train") -> tuple[list[Prompt], DataReport]:
    """The prompts of a split (data.train / data.validation / validation_fraction, as for SFT) and a
    report; bad rows are skipped and counted (data.strict: the first raises). No usable row: JaxftError."""
    source, records = split_records(cfg, split)
    report = DataReport(rows=len(records))
    if source is None:
        return [], report
    out = []
    for rec in records:
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            p, columns = parse_prompt(rec.row)
            try:
                ids = encode_prompt(tokenizer, p, cfg.system_prompt, parse_tools(rec.row))
            except RowError:
                raise
            except Exception as e:  # a chat template that rejects the conversation
                raise RowError("template error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            if not ids:
                raise RowError("empty prompt", "the prompt has no tokens")
            if len(ids) > cfg.max_length:
                report.dropped += 1
                continue
            out.append(Prompt(ids, p, columns, rec.where))
        except RowError as e:
            bad_row(cfg, report, rec.where, e)
    report.examples = len(out)
    report.tokens = sum(len(p.ids) for p in out)
    if not out:
        raise JaxftError(f"{source}: no usable prompts ({report.skipped} bad, {report.dropped} longer than "
                         f"data.max_length={cfg.max_length}" + (f"; first: {report.first_errors[0]}"
                                                                 if report.first_errors else "") + ")")
    return out, report


def prompt_answer(parsed: Chat | Pair | Text) -> tuple[list[dict], str] | None:
    """(prompt messages, answer) of a parsed row: its last trained assistant turn and everything before it, or
    a prompt/completion pair; None for a row with no answer (plain text, a conversation with nothing trained)."""
    if isinstance(parsed, Chat) and parsed.trained:
        i = parsed.trained[-1]
        return list(parsed.messages[:i]), parsed.messages[i]["content"]
    if isinstance(parsed, Pair):
        return [{"role": "user", "content": parsed.prompt}], parsed.completion
    return None


def heldout(path: str, fmt: str = "auto", limit: int = 0) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for each usable row: the last trained assistant turn is the
    reference, everything before it the prompt. Rows that cannot be parsed are skipped."""
    records = read_rows(path)
    file_format = rows_format(records, fmt)
    out = []
    for rec in records:
        if isinstance(rec.row, RowError):
            continue
        try:
            parsed = parse_row(rec.row, row_format(rec.row, fmt, file_format))
        except RowError:
            continue
        item = prompt_answer(parsed)
        if item is not None:
            out.append(item)
        if limit and len(out) >= limit:
            break
    if not out:
        raise JaxftError(f"{path}: no rows with a prompt and a reference answer to evaluate")
    return out


def shot_key(prompt: list[dict]) -> str:
    """What makes two prompts the same question: the last user turn's text, whitespace collapsed (a training
    row asking a held-out question must never be a shot, whatever its system turn or spacing)."""
    text = next((m.get("content") or "" for m in reversed(prompt) if m["role"] == "user"), "")
    return " ".join(str(text).split())


def shot_pool(path: str, fmt: str = "auto") -> list[tuple[list[dict], str]]:
    """The (prompt, answer) rows of a training file that can be K-shot examples: chat / prompt-completion /
    alpaca rows (the last trained assistant turn is the answer) and preference rows (the chosen answer).
    Rows with neither (prompt-only RL rows, plain text) are skipped."""
    records = read_rows(path)
    file_format = rows_format(records, fmt)
    out = []
    for rec in records:
        try:
            if isinstance(rec.row, RowError):
                continue
            if isinstance(rec.row, dict) and "chosen" in rec.row:  # a preference pair: the chosen answer
                parsed = parse_pair(rec.row)[0]
            else:
                parsed = parse_row(rec.row, row_format(rec.row, fmt, file_format))
        except RowError:
            continue
        item = prompt_answer(parsed)
        if item is not None:
            out.append(item)
    return out


def few_shot(pool: list[tuple[list[dict], str]], k: int, seed: int, exclude: list[list[dict]],
             where: str = "data.train") -> list[dict]:
    """K examples as chat turns (each row's non-system turns, then its answer as an assistant turn): k distinct
    rows of `pool` drawn by `seed`, none asking a question of `exclude` (the held-out prompts, by `shot_key`).
    JaxftError when fewer than k rows qualify."""
    banned = {shot_key(p) for p in exclude}
    unique: dict[str, tuple[list[dict], str]] = {}
    for prompt, answer in pool:
        key = shot_key(prompt)
        if key and key not in banned:
            unique.setdefault(key, (prompt, answer))
    rows = list(unique.values())
    if k > len(rows):
        why = "" if pool else " (prompt-only rows, as GRPO's, have no answer to show)"
        raise JaxftError(f"eval.few_shot={k}: {where} has only {len(rows)} distinct rows with an answer whose "
                         f"prompt is not a held-out one{why}")
    turns = []
    for i in random.Random(seed).sample(range(len(rows)), k):
        prompt, answer = rows[i]
        turns += [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
    return turns


def with_shots(prompt: list[dict], shots: list[dict]) -> list[dict]:
    """`prompt` with the K-shot turns before its own: its system turns stay first."""
    return ([m for m in prompt if m["role"] == "system"] + shots + [m for m in prompt if m["role"] != "system"])


def general_prompts(path: str | None = None, limit: int = 0) -> list[list[dict]]:
    """The regression check's prompts as chat messages: `path` (rows with `prompt` — a string or messages — or
    `messages`; a final assistant turn is dropped), default the shipped GENERAL_PROMPTS; the first `limit`
    (0 = all). Bad rows are skipped; none usable is a JaxftError naming the file."""
    where = str(path or GENERAL_PROMPTS)
    out = []
    for rec in read_rows(where):
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            p, _ = parse_prompt(rec.row)
        except RowError:
            continue
        out.append([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
        if limit and len(out) >= limit:
            break
    if not out:
        raise JaxftError(f"{where}: no usable prompts (rows need a 'prompt' or 'messages' column)")
    return out
