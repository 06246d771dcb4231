"""`jaxft prepare FILE... --out DIR`: SFT rows cleaned, deduplicated (exactly, and near-duplicates by MinHash)
and split into DIR/train.jsonl and DIR/validation.jsonl.

    counts = prepare(["a.jsonl", "b.csv"], "data/", validation_fraction=0.05, seed=0)

Rows are read and checked by jaxft.data.rows (the same readers and parsers training uses).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from jaxft.data.encode import DataReport
from jaxft.data.rows import FORMATS, Record, RowError, holdout, parse_row, read_rows, rows_format
from jaxft.errors import JaxftError
from jaxft.files import write_jsonl


def map_strings(value: Any, fn) -> Any:
    """`value` with fn applied to every string inside it (lists and dicts rebuilt, the rest kept)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    return value


def clean(row: Any) -> Any:
    """Strip every string's surrounding whitespace, normalise newlines, collapse 3+ newlines to 2."""
    return map_strings(row, lambda s: re.sub(r"\n{3,}", "\n\n", s.replace("\r\n", "\n").replace("\r", "\n")).strip())


def row_key(row: Any) -> str:
    """A hash of the normalised row (whitespace runs as one space, canonical JSON): equal ⇔ exact dup."""
    canonical = json.dumps(map_strings(row, lambda s: " ".join(s.split())), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(canonical.encode()).hexdigest()


def drop_exact_duplicates(rows: list[Any]) -> list[Any]:
    """The rows without repeats of an earlier row's `row_key`, in order."""
    seen: set[str] = set()
    return [row for row in rows if not ((key := row_key(row)) in seen or seen.add(key))]


def _strings(value: Any) -> list[str]:
    """Every string of a row's content, dict keys in sorted order (role names left out)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k in sorted(value) if k not in ("role", "from") for s in _strings(value[k])]
    return []


class MinHasher:
    """MinHash signatures over word 5-shingles (128 permutations) and LSH banding (32 bands × 4 rows).

    A permutation is h(x) = (a·x + b) mod p with p = 2³¹ − 1 and x a shingle's 32-bit BLAKE2 hash,
    so every product fits in uint64. Two rows' estimated Jaccard similarity is the fraction of equal
    signature entries.
    """

    P = (1 << 31) - 1

    def __init__(self, num_perm: int = 128, bands: int = 32, shingle: int = 5, seed: int = 1):
        assert num_perm % bands == 0
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.P, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self.P, num_perm, dtype=np.uint64)
        self.bands, self.shingle = bands, shingle

    def shingles(self, text: str) -> set[str]:
        """Lower-cased word k-shingles (the whole text as one shingle when shorter than k words)."""
        words = re.findall(r"\w+", text.lower())
        k = min(self.shingle, len(words))
        return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)} if words else set()

    def signature(self, text: str) -> np.ndarray | None:
        """uint64 [num_perm], or None for a text without words."""
        sh = self.shingles(text)
        if not sh:
            return None
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
                      for s in sh], dtype=np.uint64) % np.uint64(self.P)
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % np.uint64(self.P)).min(axis=1)

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        """One bucket key per band."""
        return [bytes([i]) + band.tobytes() for i, band in enumerate(sig.reshape(self.bands, -1))]


def drop_near_duplicates(rows: list[Any], threshold: float) -> tuple[list[Any], int]:
    """Keep the first of every group of rows whose estimated Jaccard similarity is ≥ threshold."""
    mh, buckets, sigs, kept = MinHasher(), {}, [], []
    for row in rows:
        sig = mh.signature(" ".join(_strings(row)))
        if sig is not None:
            keys = mh.band_keys(sig)
            candidates = {j for key in keys for j in buckets.get(key, ())}
            if any(np.mean(sig == sigs[j]) >= threshold for j in sorted(candidates)):
                continue
            for key in keys:
                buckets.setdefault(key, []).append(len(sigs))
            sigs.append(sig)
        kept.append(row)
    return kept, len(rows) - len(kept)


def _clean_rows(inputs: list[str], fmt: str, counts: dict, report: DataReport) -> list[Any]:
    """Read, clean and check every row against its file's format (for "auto", found in that file, not in
    the first input; a row of another format inside one file is bad); count the bad and empty ones in
    `counts` and by reason (with the file:line and cause of the first few) in `report`. Prints one line
    per file."""
    good = []
    for path in inputs:
        records = read_rows(path)
        counts["read"] += len(records)
        cleaned = [Record(r.where, r.row if isinstance(r.row, RowError) else clean(r.row)) for r in records]
        file_format = rows_format(cleaned, fmt)
        kinds: Counter = Counter()
        for r in cleaned:
            try:
                if isinstance(r.row, RowError):
                    raise r.row
                if not any(s for s in _strings(r.row)):
                    raise RowError("empty row")
                parse_row(r.row, file_format)
            except RowError as e:
                kind = "empty" if e.reason.startswith("empty") else "bad"
                counts[kind] += 1
                kinds[kind] += 1
                report.add_bad(r.where, e)
                continue
            kinds[file_format] += 1
            good.append(r.row)
        print(f"{path}: {len(records)} rows" + "".join(f", {n} {k}" for k, n in kinds.most_common()))
    return good


def _report_bad(report: DataReport) -> None:
    """The bad and empty rows by reason, and the file:line and cause of the first few (as training reports them)."""
    if not report.skipped:
        return
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped_by_reason.items(), key=lambda x: -x[1]))
    rows = "1 row" if report.skipped == 1 else f"{report.skipped} rows"
    first = f"; the first {len(report.first_errors)}" if report.skipped > len(report.first_errors) else ""
    print(f"{rows} skipped ({reasons}){first}:")
    for line in report.first_errors:
        print(f"  {line}")


def prepare(inputs: list[str], out_dir: str, *, validation_fraction: float, seed: int,
            near_dup_threshold: float | None = None, fmt: str = "auto") -> dict:
    """Clean, deduplicate and split SFT rows into `out_dir`/train.jsonl and validation.jsonl.

    Rows keep their own columns (cleaned); each input's format is detected on its own (fmt "auto"), so
    train.jsonl may mix formats, which training's data.format=auto reads row by row. Returns (and prints) the
    counts: read, bad, empty, exact_dups, near_dups, train, validation; prints a line per input, the bad
    rows by reason with the file:line of the first few, and a warning when validation.jsonl is empty.
    Both files are always written (validation may be empty), each atomically.
    """
    if not inputs:
        raise JaxftError("prepare: no input files")
    if not 0 <= validation_fraction < 1:
        raise JaxftError(f"validation_fraction: {validation_fraction} must be in [0, 1)")
    if near_dup_threshold is not None and not 0 < near_dup_threshold <= 1:
        raise JaxftError(f"near_dup_threshold: {near_dup_threshold} must be in (0, 1]")
    if fmt != "auto" and fmt not in FORMATS:
        raise JaxftError(f"format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    counts = dict.fromkeys(("read", "bad", "empty", "exact_dups", "near_dups", "train", "validation"), 0)
    report = DataReport()
    rows = _clean_rows(inputs, fmt, counts, report)
    unique = drop_exact_duplicates(rows)
    counts["exact_dups"] = len(rows) - len(unique)
    if near_dup_threshold is not None:
        unique, counts["near_dups"] = drop_near_duplicates(unique, near_dup_threshold)
    val = set(holdout(len(unique), validation_fraction, seed).tolist())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [r for i, r in enumerate(unique) if i not in val])
    write_jsonl(out / "validation.jsonl", [r for i, r in enumerate(unique) if i in val])
    counts["train"], counts["validation"] = len(unique) - len(val), len(val)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    _report_bad(report)
    if not val:
        why = (f"--validation-fraction is {validation_fraction:g}" if validation_fraction <= 0 else
               f"only {len(unique)} usable row{'s' if len(unique) != 1 else ''}: nothing to hold out")
        print(f"jaxft: warning: {out / 'validation.jsonl'} is empty ({why}): do not pass it as data.validation; "
              "rerun with --validation-fraction (e.g. 0.1), or let training hold out data.validation_fraction of "
              "train.jsonl", file=sys.stderr)
    return counts
