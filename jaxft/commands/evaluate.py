"""`jaxft eval`: base vs fine-tuned side by side (validation loss / perplexity and a generation metric), or
the base and several adapters side by side (`--adapter`, one bank, mixed-adapter batches).

    results = evaluate(run)                                     # {"base": {...}, "tuned": {...}}
    results = compare(run, ["math=runs/math", "json=peft/json"])   # {"base": {...}, "math": {...}, ...}

evaluate: the base model is the run's own starting point (a fresh adapter has B = 0, so it is exactly the
base model); the tuned one is the newest checkpoint of the run. compare: every (prompt, variant) pair is one
row of the generation stream, so a batch of eval.batch_size rows holds prompts of several adapters (and the
base) at once; with an SFT validation split, each variant's validation loss comes from the same batches.
Outputs: <train.out_dir>/eval/{summary.json, predictions.jsonl, report.md[, compare.png]}; eval.few_shot adds
the column base_<K>shot (the base prompted with K training rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxft import objectives, runs
from jaxft.config import RunConfig, check_files
from jaxft.data.encode import Batches, load_examples
from jaxft.data.prompts import few_shot, heldout, shot_pool, with_shots
from jaxft.errors import JaxftError
from jaxft.checkpoint import require_checkpoint
from jaxft.files import atomic_path, staging_dir, write_json, write_jsonl
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.commands.eval_report import LM_EVAL, read_lm_eval, write_report
from jaxft.generate import answer_chats, chat_prompt, eos_token_ids, with_system
from jaxft.metrics import score
from jaxft.objective import make_eval_step, mean_over_batches, perplexity
from jaxft.objectives.multi import MixedBatches, Tagged, single_adapter_loss
from jaxft.runs import load_run
from jaxft.setup import resolve_model


def eval_dir(run: RunConfig, out=None, overwrite: bool = False) -> Path:
    """Where an evaluation writes (`out`, default <train.out_dir>/eval), checked before anything loads: a folder
    holding an earlier evaluation is replaced only with overwrite (as `jaxft export` replaces only with
    --overwrite). Not a new numbered folder: a user compares against the results they know the place of."""
    d = Path(out) if out else Path(run.train.out_dir) / "eval"
    # lm_eval.json alone is no earlier evaluation: `jaxft lm-eval --output` put it there for this one's report
    if d.exists() and (not d.is_dir() or any(p.name != LM_EVAL for p in d.iterdir())) and not overwrite:
        held = ", ".join(sorted(p.name for p in d.iterdir())[:4]) if d.is_dir() else "a file"
        raise JaxftError(f"{d}: holds an earlier evaluation ({held}); pass --overwrite to replace it, or --out DIR "
                         "to write this one elsewhere")
    return d


def evaluate(run: RunConfig, *, base_only: bool = False, progress: bool = True, out=None,
             overwrite: bool = False, lm_eval_file=None) -> dict:
    """Returns {"base": {...}, "tuned": {...}}: the objective's validation measurement (the same function
    and batches as training's evaluations) and the generation metric's scores, written to `eval_dir`."""
    check_files(run, training=False)
    where = eval_dir(run, out, overwrite)
    objectives.check_data(run, training=False)  # what can be refused is refused before the model loads
    check_few_shot(run)
    lm_eval = read_lm_eval(where, lm_eval_file)
    if not base_only:
        require_checkpoint(run.train.out_dir)
    out_dir = Path(run.train.out_dir)
    done = load_run(run, restore=not base_only)
    setup = done.setup
    variants = {"base": setup.params}
    if not base_only:
        variants["tuned"] = done.params
        print(f"tuned: {out_dir}/checkpoints/{done.step}", file=sys.stderr)
    results: dict[str, dict] = {k: {} for k in variants}
    obj = objectives.make(run, setup, train=False)
    if obj.evaluate is not None:
        for k, params in variants.items():
            results[k].update(obj.evaluate(params, setup.frozen))

    file = run.eval.file or obj.heldout
    predictions, rows = {}, None
    if run.eval.metric != "none" and file:
        items = heldout(file, run.data.format, run.eval.max_examples)
        prompts, refs = [p for p, _ in items], [r for _, r in items]
        eos = eos_token_ids(setup.tokenizer, setup.model_path)
        if run.eval.few_shot:  # built (and its length checked) before any generation
            context = nnx.merge(setup.graphdef, setup.params, setup.frozen).config.max_position_embeddings
            shots = shot_prompts(run, setup.tokenizer, file, prompts, context)
        for k, params in variants.items():
            predictions[k] = answer_chats(setup.graphdef, (params, setup.frozen), setup.tokenizer, prompts, eos=eos,
                                              max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                              system_prompt=run.data.system_prompt,
                                              progress=f"generating ({k})" if progress else "")
            results[k].update(score(run.eval.metric, predictions[k], refs))
        if run.eval.few_shot:  # fine-tune vs prompt: the base shown K training rows first
            k = shot_name(run.eval.few_shot)
            predictions[k] = answer_chats(setup.graphdef, (setup.params, setup.frozen), setup.tokenizer, shots, eos=eos,
                                          max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                          system_prompt=run.data.system_prompt,
                                          progress=f"generating ({k})" if progress else "")
            results = after_base(results, k, score(run.eval.metric, predictions[k], refs))
        rows = [dict(prompt=p[-1]["content"], reference=r, **{k: predictions[k][i] for k in predictions})
                for i, (p, r) in enumerate(items)]
    with staging_dir(where, overwrite=True) as tmp:  # one evaluation's files together, never half of two
        if rows is not None:
            write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "summary.json", results)
        write_report(tmp, results, where, Path(run.train.out_dir), lm_eval)
    print(f"report: {where / 'report.md'}", file=sys.stderr)
    return results


def shot_name(k: int) -> str:
    """The K-shot column's name in summary.json, predictions.jsonl and the table ("base, K-shot")."""
    return f"base_{k}shot"


def check_few_shot(run: RunConfig) -> None:
    """eval.few_shot's refusals, before the model loads."""
    k = run.eval.few_shot
    if not k:
        return
    if run.objective == "reward":
        raise JaxftError(f"eval.few_shot={k}: a reward model does not answer prompts; set eval.few_shot=0")
    if run.eval.metric == "none":
        raise JaxftError(f"eval.few_shot={k}: needs a generation metric (eval.metric is none)")
    if not run.data.train:
        raise JaxftError(f"eval.few_shot={k}: needs data.train (the K examples are training rows)")
    if not (run.eval.file or run.data.validation):
        raise JaxftError(f"eval.few_shot={k}: needs held-out prompts to answer (eval.file or data.validation)")


def shot_prompts(run: RunConfig, tokenizer, file: str, prompts: list[list[dict]], context: int) -> list[list[dict]]:
    """The held-out prompts, each after the same eval.few_shot training rows (drawn by eval.few_shot_seed, none
    asking a question of the held-out `file`, past eval.max_examples too), checked to fit the model's context
    with eval.max_new_tokens."""
    k = run.eval.few_shot
    held = [p for p, _ in heldout(file, run.data.format)]
    shots = few_shot(shot_pool(run.data.train, run.data.format), k, run.eval.few_shot_seed, held, run.data.train)
    out = [with_shots(p, shots) for p in prompts]
    longest = max(len(chat_prompt(tokenizer, with_system(p, run.data.system_prompt))) for p in out)
    if longest + run.eval.max_new_tokens > context:
        raise JaxftError(f"eval.few_shot={k}: the longest {k}-shot prompt is {longest} tokens; with "
                         f"eval.max_new_tokens={run.eval.max_new_tokens} it passes the model's context of "
                         f"{context} tokens (lower eval.few_shot)")
    return out


def after_base(results: dict, name: str, metrics: dict) -> dict:
    """`results` with the column `name` right after "base" (base, K-shot, tuned: the table reads left to right)."""
    out = {}
    for k, v in results.items():
        out[k] = v
        if k == "base":
            out[name] = metrics
    return out


def compare(run: RunConfig, specs: list[str], *, progress: bool = True, out=None, overwrite: bool = False,
            lm_eval_file=None) -> dict:
    """{"base": metrics, <adapter>: metrics, ...}: validation loss (SFT) and the generation metric."""
    check_files(run, training=False)
    if run.objective != "sft":
        raise JaxftError(f"--adapter: side-by-side adapter evaluation supports objective sft, not {run.objective}")
    where = eval_dir(run, out, overwrite)
    objectives.check_data(run, training=False)
    check_few_shot(run)
    lm_eval = read_lm_eval(where, lm_eval_file)
    sources = runs.expand(specs)  # names and folders, read before the model loads
    path = resolve_model(run.model.path)
    model = load_pretrained(path, dtype=jnp.bfloat16 if run.model.dtype == "bf16" else jnp.float32)
    tokenizer = load_tokenizer(path)
    names = runs.load_bank(model, specs, base=str(path), sources=sources)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    variants = {"base": -1, **{n: i for i, n in enumerate(names)}}
    results: dict[str, dict] = {k: {} for k in variants}
    if run.data.validation:
        results = _validation(run, graphdef, params, frozen, tokenizer, variants, results)
    file = run.eval.file or run.data.validation or next((a.validation for a in run.adapters if a.validation), None)
    rows = None
    if run.eval.metric != "none" and file:
        items = heldout(file, run.data.format, run.eval.max_examples)
        prompts = [p for _ in variants for p, _ in items]
        rows = [v for v in variants.values() for _ in items]
        names = list(variants)
        if run.eval.few_shot:  # the base's K-shot prompts ride in the same mixed batches
            names.append(shot_name(run.eval.few_shot))
            prompts += shot_prompts(run, tokenizer, file, [p for p, _ in items], model.config.max_position_embeddings)
            rows += [-1] * len(items)
        answers = answer_chats(graphdef, (params, frozen), tokenizer, prompts, adapter_ids=rows,
                                   eos=eos_token_ids(tokenizer, path), max_new_tokens=run.eval.max_new_tokens,
                                   batch_size=run.eval.batch_size, system_prompt=run.data.system_prompt,
                                   progress="generating (mixed adapters)" if progress else "")
        refs, n = [r for _, r in items], len(items)
        predictions = {k: answers[j * n:(j + 1) * n] for j, k in enumerate(names)}
        for k in variants:
            results[k].update(score(run.eval.metric, predictions[k], refs))
        if run.eval.few_shot:
            results = after_base(results, names[-1], score(run.eval.metric, predictions[names[-1]], refs))
        rows = [dict(prompt=p[-1]["content"], reference=r, **{k: predictions[k][i] for k in names})
                for i, (p, r) in enumerate(items)]
    with staging_dir(where, overwrite=True) as tmp:
        if rows is not None:
            write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "summary.json", results)
        plot(results, tmp / "compare.png")
        write_report(tmp, results, where, Path(run.train.out_dir), lm_eval)
    print(f"report: {where / 'report.md'}", file=sys.stderr)
    return results


def _validation(run, graphdef, params, frozen, tokenizer, variants, results):
    """eval_loss / eval_ppl of every variant on the same SFT validation batches."""
    examples, _ = load_examples(run.data, tokenizer, "validation")
    val = MixedBatches([Batches(examples, run.train.batch_size, run.data.max_length, run.data.packing, run.data.seed)])
    step = make_eval_step(graphdef, single_adapter_loss)
    for k, n in variants.items():
        r = mean_over_batches(step, params, frozen, Tagged(val, n), run.train.eval_batches, "eval_tokens")
        results[k].update(eval_loss=r["eval_loss"], eval_ppl=perplexity(r["eval_loss"]), eval_tokens=r["eval_tokens"])
    return results


def format_table(results: dict) -> str:
    """Metrics as rows, base and tuned (or each adapter) as columns, each as wide as its longest entry."""
    names = list(results)
    keys = [k for k in dict.fromkeys(k for r in results.values() for k in r)]
    first = max([16, *map(len, keys)]) + 2  # 18 wide, as before, unless a name is longer
    cells = {n: [f"{results[n].get(k, float('nan')):.4f}" for k in keys] for n in names}
    width = {n: max([10, len(n), *map(len, cells[n])]) + 2 for n in names}
    lines = [f"{'metric':<{first}}" + "".join(f"{n:>{width[n]}}" for n in names)]
    for i, k in enumerate(keys):
        lines.append(f"{k:<{first}}" + "".join(f"{cells[n][i]:>{width[n]}}" for n in names))
    return "\n".join(lines)


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
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
