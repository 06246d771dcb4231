"""Base vs fine-tuned, side by side: validation loss / perplexity and a generation metric.

The base model is the run's own starting point (a fresh adapter has B = 0, so it is exactly the base
model); the tuned one is the newest checkpoint of the run. Predictions are written next to the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxft.config import RunConfig, check_files
from jaxft.errors import JaxftError
from jaxft.generate import Sampling, chat_prompt, eos_token_ids, generate
from jaxft.metrics import score
from jaxft.data.rows import Chat, Pair, RowError, parse_row, read_rows, rows_format, write_jsonl_atomic


def heldout(path: str, fmt: str = "auto", limit: int = 0) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for each usable row: the last trained assistant turn is the
    reference, everything before it the prompt. Rows that cannot be parsed are skipped."""
    records = read_rows(path)
    fmt = rows_format(records, fmt)
    out = []
    for rec in records:
        if isinstance(rec.row, RowError):
            continue
        try:
            parsed = parse_row(rec.row, fmt)
        except RowError:
            continue
        if isinstance(parsed, Chat) and parsed.trained:
            i = parsed.trained[-1]
            out.append((list(parsed.messages[:i]), parsed.messages[i]["content"]))
        elif isinstance(parsed, Pair):
            out.append(([{"role": "user", "content": parsed.prompt}], parsed.completion))
        if limit and len(out) >= limit:
            break
    if not out:
        raise JaxftError(f"{path}: no rows with a prompt and a reference answer to evaluate")
    return out


def generate_answers(graphdef, weights, tokenizer, prompts: list[list[dict]], *, eos: set[int], max_new_tokens: int,
                     batch_size: int, system_prompt: str | None = None, progress: str = "",
                     adapter_ids: list[int] | None = None) -> list[str]:
    """Greedy answers to chat prompts, in batches, from `nnx.merge(graphdef, *weights)`. adapter_ids: with an
    adapter bank, prompt i is answered by adapter adapter_ids[i] (-1: the base), in mixed batches."""
    import jax.numpy as jnp

    from jaxft.context import ON, Ctx
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [chat_prompt(tokenizer, _with_system(m, system_prompt)) for m in chunk]
        ctx = ON if adapter_ids is None else Ctx(adapter_ids=jnp.asarray(adapter_ids[i:i + batch_size], jnp.int32))
        out = generate(graphdef, weights, ids, eos_ids=eos, sampling=Sampling(max_new_tokens=max_new_tokens),
                       ctx=ctx).ids()
        answers += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
        if progress:
            print(f"\r{progress}: {len(answers)}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return answers


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}] + messages
    return messages


def evaluate(run: RunConfig, *, base_only: bool = False, progress: bool = True) -> dict:
    """Returns {"base": {...}, "tuned": {...}}: the objective's validation measurement (the same function
    and batches as training's evaluations) and the generation metric's scores."""
    from jaxft.checkpoint import restore_trainable
    from jaxft.objectives import make as objective
    from jaxft.setup import build

    check_files(run, training=False)
    out_dir = Path(run.train.out_dir)
    setup = build(run)
    variants = {"base": setup.params}
    if not base_only:
        variants["tuned"], meta = restore_trainable(out_dir, setup.params)
        print(f"tuned: {out_dir}/checkpoints/{meta['step']}", file=sys.stderr)
    results: dict[str, dict] = {k: {} for k in variants}
    obj = objective(run, setup, train=False)
    if obj.evaluate is not None:
        for k, params in variants.items():
            results[k].update(obj.evaluate(params, setup.frozen))

    file = run.eval.file or obj.heldout
    predictions = {}
    if run.eval.metric != "none" and file:
        items = heldout(file, run.data.format, run.eval.max_examples)
        prompts, refs = [p for p, _ in items], [r for _, r in items]
        eos = eos_token_ids(setup.tokenizer, setup.model_path)
        for k, params in variants.items():
            predictions[k] = generate_answers(setup.graphdef, (params, setup.frozen), setup.tokenizer, prompts, eos=eos,
                                              max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                              system_prompt=run.data.system_prompt,
                                              progress=f"generating ({k})" if progress else "")
            results[k].update(score(run.eval.metric, predictions[k], refs))
        eval_dir = out_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        rows = [dict(prompt=p[-1]["content"], reference=r, **{k: predictions[k][i] for k in predictions})
                for i, (p, r) in enumerate(items)]
        write_jsonl_atomic(eval_dir / "predictions.jsonl", rows)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval" / "summary.json").write_text(json.dumps(results, indent=1))
    return results


def format_table(results: dict) -> str:
    """Metrics as rows, base and tuned as columns."""
    names = list(results)
    keys = [k for k in dict.fromkeys(k for r in results.values() for k in r)]
    lines = [f"{'metric':<18}" + "".join(f"{n:>12}" for n in names)]
    for k in keys:
        cells = "".join(f"{results[n].get(k, float('nan')):>12.4f}" for n in names)
        lines.append(f"{k:<18}{cells}")
    return "\n".join(lines)
