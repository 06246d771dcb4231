"""Preference pairs: rows → chat template → (chosen, rejected) token ids and completion masks → batches.

    pairs, report = load_pairs(run.data, run.dpo, tokenizer, "train")   # list[PairExample], DataReport
    batches = PairBatches(pairs, batch_size=4, seq_len=run.data.max_length, seed=0)
    batch = batches.batch(step)   # tokens ... loss_mask [2B, S] (chosen rows, then rejected rows),
                                  # pair_mask, pair_index, margin [B]; ref_logps [2B] with a reference cache

Rows (TRL's preference formats): `prompt` / `chosen` / `rejected`, each a string or a list of chat
messages (explicit prompt), or `chosen` / `rejected` message lists whose shared leading turns are the
prompt (implicit prompt). Messages may hold tool calls and tool turns, and a `tools` column the tool
definitions, as in SFT (`jaxft.data.rows.parse_message`, `parse_tools`). Each side is encoded like an SFT prompt/completion row (`jaxft.data.encode.Encoder`):
chat template applied, the completion's tokens (content + end of turn) are the targets, EOS appended.

Length: a pair longer than data.max_length (its longer side) keeps the last tokens of its prompt
(`dpo.truncate_prompt`, TRL's keep_end) so that both sides fit; a pair whose completion alone does
not fit, or any over-length pair with truncate_prompt=false, is dropped and counted. `dpo.max_prompt_length`
also cuts longer prompts. Bad rows are skipped and counted as in SFT, or fatal under data.strict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxft.config import DataConfig, DpoConfig
from jaxft.data.encode import TOKENIZE_CHUNK, Batches, DataReport, Encoder, Example, split_records, bad_row, layout
from jaxft.data.rows import (ROLES, Chat, Pair, RowError, get_field, parse_messages, parse_tools, prompt_completion,
                             typename)
from jaxft.errors import JaxftError


@dataclass(eq=False)
class PairExample:
    """One preference pair: chosen and rejected sequences (prompt + completion, see `Example`)."""

    chosen: Example
    rejected: Example
    margin: float = 0.0  # the row's optional `margin` (the reward model's −log σ(r_c − r_r − margin))
    confidence: float | None = None  # the row's optional `confidence`: P(chosen is better), a soft label

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def parse_pair(row) -> tuple[Chat | Pair, Chat | Pair]:
    """A preference row → (prompt + chosen, prompt + rejected) as SFT prompt/completion rows, or RowError."""
    if not isinstance(row, dict):
        raise RowError("wrong type", f"row is a {typename(row)}, expected an object")
    chosen, rejected, prompt = get_field(row, "chosen"), get_field(row, "rejected"), row.get("prompt")
    tools = parse_tools(row)
    if prompt is None:  # implicit prompt: the shared leading turns
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RowError("missing field", "missing field 'prompt' (without one, 'chosen' and 'rejected' must be "
                                            "message lists sharing their leading turns)")
        c, r = parse_messages(chosen, "chosen", ROLES), parse_messages(rejected, "rejected", ROLES)
        n = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        if n == 0:
            raise RowError("no shared prompt", "'chosen' and 'rejected' share no leading turns (no implicit prompt)")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    return _side(prompt, chosen, "chosen", tools), _side(prompt, rejected, "rejected", tools)


def _side(prompt, completion, name: str, tools) -> Chat | Pair:
    try:
        return prompt_completion(prompt, completion, tools)
    except RowError as e:
        raise RowError(e.reason, f"{name}: {e}".replace("'completion'", f"'{name}'")) from None


def load_pairs(cfg: DataConfig, dpo: DpoConfig, tokenizer, split: str = "train") -> tuple[list[PairExample],
                                                                                           DataReport]:
    """The tokenized pairs of a split (like `jaxft.data.encode.load_examples`: same splits, report, strictness)."""
    source, records = split_records(cfg, split)
    report = DataReport(rows=len(records))
    if source is None:
        return [], report
    encoder = Encoder(tokenizer, False, cfg.system_prompt)
    rendered, margins, confidences = [], [], []
    for rec in records:
        try:
            if isinstance(rec.row, RowError):
                raise rec.row
            sides = [encoder.render(side, rec.where) for side in parse_pair(rec.row)]
            margin, confidence = _margin(rec.row), _confidence(rec.row)
            margins.append(margin)
            confidences.append((confidence, rec.where))
            rendered += sides
        except RowError as e:
            bad_row(cfg, report, rec.where, e)
    pairs = []
    for i in range(0, len(rendered), TOKENIZE_CHUNK):  # TOKENIZE_CHUNK is even: pairs stay together
        chunk = rendered[i:i + TOKENIZE_CHUNK]
        encoded = encoder.tokenize(chunk)
        for k, (doc, c, r) in enumerate(zip(chunk[::2], encoded[::2], encoded[1::2])):
            if isinstance(c, RowError) or isinstance(r, RowError):  # either side rejected: one bad row
                bad_row(cfg, report, doc.where, c if isinstance(c, RowError) else r)
            elif (pair := fit_pair(c, r, cfg.max_length, dpo, report)) is not None:
                pair.margin = margins[i // 2 + k]
                pair.confidence = confidences[i // 2 + k][0]
                pairs.append(pair)
    given = [c is not None for c, _ in confidences]
    if any(given) and not all(given):
        raise JaxftError(f"{confidences[given.index(not given[0])][1]}: 'confidence' is given on some rows only "
                         "(a soft label on every row, or on none)")
    report.examples = len(pairs)
    report.tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    report.target_tokens = int(sum(p.chosen.loss_mask.sum() + p.rejected.loss_mask.sum() for p in pairs))
    if not pairs:
        raise JaxftError(f"{source}: no usable preference pairs ({report.rows} rows, {report.skipped} bad, "
                         f"{report.dropped} longer than data.max_length={cfg.max_length})"
                         + (f"; first bad row: {report.first_errors[0]}" if report.first_errors else ""))
    return pairs, report


def _margin(row: dict) -> float:
    """The optional per-pair `margin` (TRL's reward-model column): a finite number, 0 when absent."""
    m = row.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m):
        raise RowError("bad margin", f"'margin' must be a finite number, got {str(m)[:40]!r}")
    return float(m)


def _confidence(row: dict) -> float | None:
    """The optional per-pair `confidence` (P(chosen is better), e.g. from `jaxft cai label`): in [0, 1]."""
    c = row.get("confidence")
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
        raise RowError("bad confidence", f"'confidence' must be a number in [0, 1], got {str(c)[:40]!r}")
    return float(c)


def fit_pair(chosen, rejected, max_length: int, dpo: DpoConfig, report: DataReport) -> PairExample | None:
    """Cut the prompts (keeping their last tokens) to max_prompt_length and so that both sides fit
    max_length; None (counted as dropped) when that is impossible or not allowed."""
    sides = []
    for ids, mask in (chosen, rejected):
        start = int(np.argmax(mask))  # the first target: where the completion starts
        sides.append((ids[:start], ids[start:], mask[start:]))
    longest_completion = max(len(c) for _, c, _ in sides)
    keep = max_length - longest_completion
    if dpo.max_prompt_length is not None:
        keep = min(keep, dpo.max_prompt_length)
    overlong = any(len(p) + len(c) > max_length for p, c, _ in sides)
    if keep < 1 or (overlong and not dpo.truncate_prompt):
        report.dropped += 1
        return None
    cut = any(len(p) > keep for p, _, _ in sides)
    report.truncated += cut
    out = [Example(np.concatenate([p[-keep:], c]), np.concatenate([np.zeros(len(p[-keep:]), bool), m]))
           for p, c, m in sides]
    return PairExample(*out)


class PairBatches(Batches):
    """Deterministic batches of pairs (see `jaxft.data.encode.Batches`; never packed): batch(i) is
    tokens, positions, segment_ids, targets, loss_mask [2B, S] with the B chosen sequences first and
    their rejected ones in the same order after them; pair_mask [B] (0 for the empty rows that top up
    an epoch's last batch), pair_index [B] (-1 there) and margin [B] (the rows' `margin`, 0 without).
    With soft labels (every row's `confidence` c), also confidence [B] = c and smoothing [B] = 1 − c, the
    latter taken in float64 before the cast so that c = 1 − ε gives exactly the constant-ε weights. With
    `ref_logps` [N, 2] (the reference's chosen / rejected log-probs of every pair), also ref_logps [2B]."""

    row_subsets = False  # batch(i) is always whole: jaxft.sharding.ShardedBatches slices it per device

    def __init__(self, pairs: list[PairExample], batch_size: int, seq_len: int, seed: int,
                 ref_logps: np.ndarray | None = None):
        super().__init__(pairs, batch_size, seq_len, packing=False, seed=seed)
        self.ref_logps = ref_logps

    def in_order(self, i: int) -> dict[str, np.ndarray]:
        """Batch i of the pairs in file order (i < len(self)): for computing per-pair values once."""
        return self._assemble([[j] for j in range(i * self.batch_size, min((i + 1) * self.batch_size,
                                                                            len(self.examples)))])

    def _assemble(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        B = self.batch_size
        idx = np.full(B, -1, np.int32)
        idx[:len(rows)] = [r[0] if r else -1 for r in rows]  # [] tops up an epoch's last batch
        pairs = [self.examples[i] if i >= 0 else None for i in idx]
        out = layout([[p.chosen] if p else [] for p in pairs] + [[p.rejected] if p else [] for p in pairs],
                     2 * B, self.seq_len)
        out["pair_mask"], out["pair_index"] = (idx >= 0).astype(np.float32), idx
        out["margin"] = np.array([p.margin if p else 0.0 for p in pairs], np.float32)  # [B]
        if self.examples[0].confidence is not None:  # every pair has one (load_pairs checks)
            c = np.array([p.confidence if p else 1.0 for p in pairs], np.float64)
            out["confidence"], out["smoothing"] = c.astype(np.float32), (1.0 - c).astype(np.float32)  # [B]
        if self.ref_logps is not None:
            ref = np.where(idx[:, None] >= 0, self.ref_logps[np.maximum(idx, 0)], 0.0)  # [B, 2]
            out["ref_logps"] = np.concatenate([ref[:, 0], ref[:, 1]]).astype(np.float32)
        return out
