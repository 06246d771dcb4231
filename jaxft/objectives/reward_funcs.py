"""Reward functions for on-policy objectives, with TRL's signature and None semantics.

    funcs = load_reward_funcs(("json_fields", "regex:^\\{.*\\}$", "my_rewards:brevity"), tokenizer=tok)
    table = score_all(funcs, prompts, completions, completion_ids, columns)   # [N, K] float64, NaN = None

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, one value
per completion: prompts / completions are strings (plain prompts) or message lists (conversational prompts;
a completion is then [{"role": "assistant", "content": ...}]), completion_ids the token ids (EOS removed),
and every dataset column other than the prompt arrives as a keyword argument (one value per completion;
a final assistant turn of a `messages` row is the `solution` column). `None` means "cannot score this
one": a row every function returns None for gets reward NaN, is left out of the group statistics and has
advantage 0 (TRL). A function that raises, returns the wrong number of values, a non-number or NaN stops
the run with a one-line error naming it.

Specs (rollout.reward_funcs):
    json_fields        fraction of the `solution` JSON object's fields the completion gets right (0 when
                       it is not one JSON object): the quickstart task's score (jaxft.metrics.json_fields)
    json_valid         1 when the completion is one JSON object, else 0
    exact_match        1 when the completion equals `solution` (surrounding whitespace ignored)
    regex:PATTERN      1 when the whole completion (stripped) matches PATTERN (re.fullmatch, DOTALL)
    length_penalty     −(completion tokens) / rollout.max_completion_length
    overlong:CACHE     TRL's soft overlong punishment: 0 up to max − CACHE tokens, then linear to −1 at max
    reward_model:PATH  a jaxft reward run (objective reward) or a *ForSequenceClassification directory,
                       scoring prompt + completion (jaxft.scoring.Scorer)
    module:function    an importable function;   path/to/file.py:function   a function in a file
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxft.errors import JaxftError
from jaxft.metrics import exact_match as _exact, json_fields, parse_json_object
from jaxft.scoring import Scorer


def _text(c) -> str:
    """A completion as text (conversational completions are one assistant message)."""
    return c if isinstance(c, str) else "".join(m.get("content", "") for m in c)


def _solutions(solution, name: str) -> list:
    if solution is None:
        raise JaxftError(f"reward {name}: needs a 'solution' column (a final assistant turn of `messages` rows, "
                         f"the completion of prompt/completion rows, or a 'solution' field)")
    return solution


def json_fields_reward(prompts, completions, completion_ids, solution=None, **kw) -> list[float | None]:
    out = []
    for c, ref in zip(completions, _solutions(solution, "json_fields")):
        if ref is None or parse_json_object(ref) is None:
            out.append(None)  # no gold answer to compare with: unscorable, as TRL's accuracy_reward
        else:
            out.append(json_fields(_text(c), ref)["field_accuracy"])
    return out


def json_valid_reward(prompts, completions, completion_ids, **kw) -> list[float]:
    return [float(parse_json_object(_text(c)) is not None) for c in completions]


def exact_match_reward(prompts, completions, completion_ids, solution=None, **kw) -> list[float | None]:
    refs = _solutions(solution, "exact_match")
    return [None if r is None else _exact(_text(c), str(r)) for c, r in zip(completions, refs)]


def regex_reward(pattern: str) -> Callable:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise JaxftError(f"rollout.reward_funcs: regex:{pattern}: not a valid regular expression ({e})") from None

    def regex(prompts, completions, completion_ids, **kw):
        return [float(rx.fullmatch(_text(c).strip()) is not None) for c in completions]

    return regex


def length_penalty_reward(max_len: int) -> Callable:
    def length_penalty(prompts, completions, completion_ids, **kw):
        return [-len(ids) / max_len for ids in completion_ids]

    return length_penalty


def overlong_reward(max_len: int, cache: int) -> Callable:
    """TRL's get_soft_overlong_punishment(max_completion_len, soft_punish_cache)."""

    def overlong(prompts, completions, completion_ids, **kw):
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= max_len - cache else (max_len - cache - n) / cache if n <= max_len else -1.0)
        return out

    return overlong


def reward_model_reward(path: str) -> Callable:
    scorer = Scorer.load(path)

    def reward_model(prompts, completions, completion_ids, **kw):
        return [None if math.isnan(s) else s for s in scorer(list(prompts), list(completions))]

    return reward_model


BUILTIN = {"json_fields": json_fields_reward, "json_valid": json_valid_reward, "exact_match": exact_match_reward}


def _load_user(spec: str) -> Callable:
    target, _, fn = spec.rpartition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise JaxftError(f"rollout.reward_funcs: {spec}: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"jaxft_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise JaxftError(f"rollout.reward_funcs: {spec}: importing {path} failed ({type(e).__name__}: {e})") \
                from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise JaxftError(f"rollout.reward_funcs: {spec}: cannot import {target} ({type(e).__name__}: {e})") \
                from None
    f = getattr(module, fn, None)
    if not callable(f):
        raise JaxftError(f"rollout.reward_funcs: {spec}: {target} has no function {fn!r}")
    return f


def load_reward_funcs(specs, max_completion_length: int) -> list[tuple[str, Callable]]:
    """(name, function) per spec; the name is what the logs call it (rewards/<name>/mean)."""
    out = []
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if spec in BUILTIN:
            out.append((spec, BUILTIN[spec]))
        elif kind == "regex" and arg:
            out.append(("regex", regex_reward(arg)))
        elif spec == "length_penalty":
            out.append(("length_penalty", length_penalty_reward(max_completion_length)))
        elif kind == "overlong" and arg:
            if not arg.isdigit() or not 0 < int(arg) <= max_completion_length:
                raise JaxftError(f"rollout.reward_funcs: {spec}: the cache must be an integer in "
                                 f"[1, rollout.max_completion_length={max_completion_length}]")
            out.append(("overlong", overlong_reward(max_completion_length, int(arg))))
        elif kind == "reward_model" and arg:
            out.append(("reward_model", reward_model_reward(arg)))
        elif ":" in spec and arg:
            out.append((getattr(_load_user(spec), "__name__", arg), _load_user(spec)))
        else:
            raise JaxftError(f"rollout.reward_funcs: {spec!r} is not a built-in ({', '.join(BUILTIN)}, regex:PATTERN, "
                             f"length_penalty, overlong:CACHE, reward_model:PATH) nor module:function / "
                             f"file.py:function")
    names = [n for n, _ in out]
    return [(n if names.count(n) == 1 else f"{n}_{i}", f) for i, (n, f) in enumerate(out)]


def score_all(funcs, prompts: list, completions: list, completion_ids: list[list[int]],
              columns: dict[str, list]) -> np.ndarray:
    """Rewards [N, K] float64 of N completions under K functions (NaN where a function returned None)."""
    n = len(completions)
    table = np.full((n, len(funcs)), np.nan)
    for k, (name, f) in enumerate(funcs):
        try:
            got = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except JaxftError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise JaxftError(f"reward function {name}: raised {type(e).__name__}: {first}") from None
        try:
            got = list(got)
        except TypeError:
            raise JaxftError(f"reward function {name}: returned a {type(got).__name__}, expected a list of "
                             f"{n} numbers or None") from None
        if len(got) != n:
            raise JaxftError(f"reward function {name}: returned {len(got)} values for {n} completions")
        for i, v in enumerate(got):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise JaxftError(f"reward function {name}: value {i} is a {type(v).__name__} ({v!r:.40}), "
                                 f"expected a number or None")
            if not math.isfinite(float(v)):
                raise JaxftError(f"reward function {name}: value {i} is {float(v)} (return None for a completion "
                                 f"it cannot score)")
            table[i, k] = float(v)
    return table
