"""`jaxft score MODEL_OR_RUN --input FILE`: a reward model's scores for every row of a file.

    summary = score_file("runs/reward", "pairs.jsonl")   # {"scored": N, "bad": k, "out": ..., "accuracy": ...}

On a mesh (over processes too) the model is read into its shards, each batch's rows split over it; process 0
writes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxft import sharding
from jaxft.config import MeshConfig
from jaxft.data.pairs import parse_pair
from jaxft.data.rows import RowError, prompt_completion, read_rows
from jaxft.distributed import is_primary
from jaxft.files import write_jsonl
from jaxft.scoring import Scorer


def score_file(model_or_run: str, input_path: str, out_path: str | None = None, *, batch_size: int = 8,
               max_length: int | None = None, mesh: MeshConfig = MeshConfig()) -> dict:
    """Score every row of a JSONL: preference pairs (chosen_score, rejected_score; accuracy overall) or
    prompt/completion rows (score; `messages` rows: the last message is the completion). Bad rows are
    skipped and counted. Writes `out_path` (default <input>.scores.jsonl) atomically; returns the summary."""
    kw = {} if max_length is None else {"max_length": max_length}
    scorer = Scorer.load(model_or_run, mesh=sharding.command_mesh(mesh), batch_size=batch_size, **kw)
    records = read_rows(input_path)
    kinds, parsed, bad = [], [], 0
    for rec in records:
        try:
            row = rec.row
            if isinstance(row, RowError):
                raise row
            if isinstance(row, dict) and "chosen" in row:
                parsed += list(parse_pair(row))
                kinds.append((rec.where, 2))
            elif isinstance(row, dict) and "messages" in row and "prompt" not in row:
                parsed.append(prompt_completion(row["messages"][:-1], row["messages"][-1:]))
                kinds.append((rec.where, 1))
            else:
                parsed.append(prompt_completion(row.get("prompt") if isinstance(row, dict) else row,
                                                 row.get("completion") if isinstance(row, dict) else None))
                kinds.append((rec.where, 1))
        except (RowError, TypeError):
            bad += 1
    scores = scorer.score_parsed(parsed)
    rows, k, right, n_pairs = [], 0, 0, 0
    for where, n in kinds:
        s = scores[k:k + n]
        k += n
        if np.isnan(s).any():
            bad += 1
        elif n == 2:
            rows.append(dict(row=where, chosen_score=float(s[0]), rejected_score=float(s[1])))
            right, n_pairs = right + int(s[0] > s[1]), n_pairs + 1
        else:
            rows.append(dict(row=where, score=float(s[0])))
    out = Path(out_path or Path(input_path).with_suffix(".scores.jsonl"))
    if is_primary():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out, rows)
    summary = dict(scored=len(rows), bad=bad, out=str(out))
    if n_pairs:
        summary.update(pairs=n_pairs, accuracy=right / n_pairs)
    return summary
