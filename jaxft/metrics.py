"""Generation metrics: plain functions of (prediction, reference) strings, averaged by `score`.

    score("json_fields", predictions, references)
    → {"valid_json": 0.9, "exact": 0.75, "field_accuracy": 0.93, "n": 64.0}

Predictions are model output and never make these functions raise; references are the task's own
answers and must be valid JSON objects (a bad reference is a ValueError: it is a bug in the data).

What `json_fields` accepts as a prediction:
- one JSON object, with whitespace around it, optionally inside ONE Markdown code fence
  (```json ... ``` or ``` ... ```): chat models fence JSON by habit and the object is still usable;
- nothing else: prose before or after the object, two objects, a list, a string, NaN/Infinity
  (not JSON) all count as invalid. The task asks for only a JSON object, so extra text is an error.

Values compare by JSON type and value: 12.5 == 12.5 and 40 == 40.0 (both JSON numbers), but
"12.5" != 12.5 and true != 1; objects compare regardless of key order, lists in order.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

_FENCE = re.compile(r"\A```[A-Za-z0-9_+-]*(.*?)```\Z", re.DOTALL)  # ```json\n{...}\n``` or ```{...}```
_MISSING = object()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two strings are equal after stripping surrounding whitespace, else 0.0."""
    if not isinstance(prediction, str):
        return 0.0
    return float(prediction.strip() == reference.strip())


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_object(text: str) -> dict | None:
    """The JSON object in `text` (optionally inside one code fence), or None when there is none."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
        return None
    return obj if isinstance(obj, dict) else None


def same_value(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (int 40 == float 40.0), bool apart from numbers, no str/number mixing."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b and not (isinstance(a, float) and math.isnan(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # str, None


def json_fields(prediction: str, reference: str) -> dict[str, float]:
    """valid_json (the prediction is a JSON object), exact (same object as the reference, extra keys
    included), field_accuracy (fraction of the reference's keys whose value the prediction matches).

    >>> json_fields('```json\\n{"a": 1, "b": "2"}\\n```', '{"a": 1.0, "b": 2}')
    {'valid_json': 1.0, 'exact': 0.0, 'field_accuracy': 0.5}
    """
    ref = parse_json_object(reference)
    if ref is None:
        raise ValueError(f"the reference is not a JSON object: {reference!r}")
    pred = parse_json_object(prediction)
    if pred is None:
        return {"valid_json": 0.0, "exact": 0.0, "field_accuracy": 0.0}
    exact = same_value(pred, ref)
    hits = sum(same_value(pred.get(k, _MISSING), v) for k, v in ref.items())
    return {"valid_json": 1.0, "exact": float(exact),
            "field_accuracy": hits / len(ref) if ref else float(exact)}


METRICS = ("exact_match", "json_fields")


def score(metric_name: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The per-example metric averaged over the examples, plus n (the number of examples).

    exact_match → {"exact_match", "n"}; json_fields → {"valid_json", "exact", "field_accuracy", "n"}.
    """
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric {metric_name!r}; choose one of {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    if metric_name == "exact_match":
        per = [{"exact_match": exact_match(p, r)} for p, r in zip(predictions, references)]
    else:
        per = [json_fields(p, r) for p, r in zip(predictions, references)]
    out = {k: sum(row[k] for row in per) / len(per) for k in per[0]}
    out["n"] = float(len(per))
    return out
