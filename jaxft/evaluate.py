"""Base vs fine-tuned, side by side: validation loss / perplexity and a generation metric.

The base model is the run's own starting point (a fresh adapter has B = 0, so it is exactly the base
model); the tuned one is the newest checkpoint of the run. Predictions are written next to the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from flax import nnx

from jaxft.config import RunConfig, check_files
from jaxft.errors import JaxftError
from jaxft.generate import Generator, Sampling, chat_prompt, eos_token_ids
from jaxft.metrics import score
from jaxft.prepare import Chat, Pair, RowError, parse_row, read_rows, rows_format, write_jsonl_atomic


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


def generate_answers(model, tokenizer, prompts: list[list[dict]], *, eos: set[int], max_new_tokens: int,
                     batch_size: int, system_prompt: str | None = None, progress: str = "") -> list[str]:
    """Greedy answers to chat prompts, in batches."""
    gen = Generator(model)
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [chat_prompt(tokenizer, _with_system(m, system_prompt)) for m in chunk]
        out = gen(ids, eos_ids=eos, sampling=Sampling(max_new_tokens=max_new_tokens))
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


def restore_params(run: RunConfig, setup, out_dir: Path):
    """The trainable params of the newest restorable checkpoint of a run."""
    from jaxft.checkpoint import Checkpoints
    from jaxft.train import init_state, make_optimizer

    tx = make_optimizer(run.optim, run.train.steps, setup.params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh or hosts trained it
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            jax.eval_shape(lambda p: init_state(p, tx), setup.params))
    ckpts = Checkpoints(out_dir, run.train.keep)
    try:
        restored = ckpts.restore_latest(abstract)
    finally:
        ckpts.close()
    if restored is None:
        raise JaxftError(f"{out_dir}: no checkpoint to evaluate (train first)")
    state, meta = restored
    return state["params"], meta


def evaluate(run: RunConfig, *, base_only: bool = False, progress: bool = True) -> dict:
    """Returns {"base": {...}, "tuned": {...}} with eval_loss / eval_ppl and the metric's scores."""
    from jaxft.data import Batches, load_examples
    from jaxft.train import build_model, evaluate_loss, make_eval_step

    check_files(run, training=False)
    out_dir = Path(run.train.out_dir)
    setup = build_model(run)
    variants = {"base": setup.params}
    if not base_only:
        variants["tuned"], meta = restore_params(run, setup, out_dir)
        print(f"tuned: {out_dir}/checkpoints/{meta['step']}", file=sys.stderr)
    results: dict[str, dict] = {k: {} for k in variants}

    has_val = run.data.validation is not None or run.data.validation_fraction > 0
    if has_val and run.objective == "dpo":  # validation pairs: eval_loss and eval_rewards/...
        from jaxft.dpo import evaluate_variants

        for k, r in evaluate_variants(run, setup, variants).items():
            results[k].update(r)
    elif has_val:
        val, _ = load_examples(run.data, setup.tokenizer, "validation")
        batches = Batches(val, run.eval.batch_size, run.data.max_length, run.data.packing, run.data.seed)
        eval_step = make_eval_step(setup.graphdef)
        for k, params in variants.items():
            results[k].update(evaluate_loss(eval_step, params, setup.frozen, batches, 0))

    file = run.eval.file or (run.data.validation if run.objective == "sft" else None)  # not preference pairs
    predictions = {}
    if run.eval.metric != "none" and file:
        items = heldout(file, run.data.format, run.eval.max_examples)
        prompts, refs = [p for p, _ in items], [r for _, r in items]
        eos = eos_token_ids(setup.tokenizer, setup.model_path)
        for k, params in variants.items():
            model = nnx.merge(setup.graphdef, params, setup.frozen)
            predictions[k] = generate_answers(model, setup.tokenizer, prompts, eos=eos,
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
