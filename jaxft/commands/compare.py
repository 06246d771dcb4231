"""`jaxft eval CONFIG --adapter NAME=DIR ...`: the base and every adapter scored side by side on the same
held-out set, generating with mixed-adapter batches (one bank, one adapter id per row).

    results = compare(run, ["math=runs/math", "json=peft/json"])   # {"base": {...}, "math": {...}, ...}

Every (prompt, variant) pair is one row of the generation stream, so a batch of eval.batch_size rows
holds prompts of several adapters (and the base) at once. With an SFT validation split, the validation
loss of each variant comes from the same batches. Outputs: <train.out_dir>/eval/{summary.json,
predictions.jsonl, compare.png}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxft.adapters import bank
from jaxft.config import RunConfig, check_files
from jaxft.errors import JaxftError


def compare(run: RunConfig, specs: list[str], *, progress: bool = True) -> dict:
    """{"base": metrics, <adapter>: metrics, ...}: validation loss (SFT) and the generation metric."""
    from jaxft.commands.evaluate import generate_answers, heldout
    from jaxft.generate import eos_token_ids
    from jaxft.formats.hf import load_pretrained, load_tokenizer
    from jaxft.metrics import score
    from jaxft.data.rows import write_jsonl_atomic
    from jaxft.setup import resolve_model

    check_files(run, training=False)
    if run.objective != "sft":
        raise JaxftError(f"--adapter: side-by-side adapter evaluation supports objective sft, not {run.objective}")
    path = resolve_model(run.model.path)
    model = load_pretrained(path, dtype=jnp.bfloat16 if run.model.dtype == "bf16" else jnp.float32)
    tokenizer = load_tokenizer(path)
    names = bank.load(model, specs, base=str(path))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    variants = {"base": -1, **{n: i for i, n in enumerate(names)}}
    results: dict[str, dict] = {k: {} for k in variants}
    if run.data.validation:
        results = _validation(run, graphdef, params, frozen, tokenizer, variants, results)
    out_dir = Path(run.train.out_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    file = run.eval.file or run.data.validation or next((a.validation for a in run.adapters if a.validation), None)
    if run.eval.metric != "none" and file:
        items = heldout(file, run.data.format, run.eval.max_examples)
        prompts = [p for _ in variants for p, _ in items]
        rows = [v for v in variants.values() for _ in items]
        answers = generate_answers(graphdef, (params, frozen), tokenizer, prompts, adapter_ids=rows,
                                   eos=eos_token_ids(tokenizer, path), max_new_tokens=run.eval.max_new_tokens,
                                   batch_size=run.eval.batch_size, system_prompt=run.data.system_prompt,
                                   progress="generating (mixed adapters)" if progress else "")
        refs, n = [r for _, r in items], len(items)
        predictions = {k: answers[j * n:(j + 1) * n] for j, k in enumerate(variants)}
        for k in variants:
            results[k].update(score(run.eval.metric, predictions[k], refs))
        write_jsonl_atomic(out_dir / "predictions.jsonl",
                           [dict(prompt=p[-1]["content"], reference=r, **{k: predictions[k][i] for k in variants})
                            for i, (p, r) in enumerate(items)])
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "compare.png")
    return results


def _validation(run, graphdef, params, frozen, tokenizer, variants, results):
    """eval_loss / eval_ppl of every variant on the same SFT validation batches."""
    from jaxft.data.encode import Batches, load_examples
    from jaxft.objective import make_eval_step, mean_over_batches, perplexity
    from jaxft.objectives.multi import MixedBatches, _single, _Tagged

    examples, _ = load_examples(run.data, tokenizer, "validation")
    val = MixedBatches([Batches(examples, run.train.batch_size, run.data.max_length, run.data.packing, run.data.seed)])
    step = make_eval_step(graphdef, _single)
    for k, n in variants.items():
        r = mean_over_batches(step, params, frozen, _Tagged(val, n), run.train.eval_batches, "eval_tokens")
        results[k].update(eval_loss=r["eval_loss"], eval_ppl=perplexity(r["eval_loss"]), eval_tokens=r["eval_tokens"])
    return results


def plot(results: dict, out_png: Path) -> None:
    """One bar group per metric, one bar per variant (base first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in dict.fromkeys(k for r in results.values() for k in r) if k != "eval_tokens"]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys) + 1, 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        vals = [results[v].get(k, np.nan) for v in results]
        ax.bar(range(len(vals)), vals, color=["0.6"] + [f"C{i}" for i in range(len(vals) - 1)])
        ax.set_xticks(range(len(vals)), list(results), rotation=30)
        ax.set_title(k)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
