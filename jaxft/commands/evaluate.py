"""`jaxft eval`: base vs fine-tuned side by side (validation loss / perplexity and a generation metric), or
the base and several adapters side by side (`--adapter`, one bank, mixed-adapter batches).

    results = evaluate(run)                                     # {"base": {...}, "tuned": {...}}
    results = compare(run, ["math=runs/math", "json=peft/json"])   # {"base": {...}, "math": {...}, ...}

evaluate: the base model is the run's own starting point (a fresh adapter has B = 0, so it is exactly the
base model); the tuned one is the newest checkpoint of the run. compare: every (prompt, variant) pair is one
row of the generation stream, so a batch of eval.batch_size rows holds prompts of several adapters (and the
base) at once; with an SFT validation split, each variant's validation loss comes from the same batches.
Regression check (eval.regression, jaxft.regression): every non-base variant also gets reg_* figures against the
base on the base's greedy answers to general prompts; eval.max_kl / eval.max_ce_increase make them a gate
(`gate`). compare_export: an exported artifact against the fp32 tuned model, as one more variant "export".
Outputs: <train.out_dir>/eval/{summary.json, predictions.jsonl, report.md[, compare.png]}; eval.few_shot adds
the column base_<K>shot (the base prompted with K training rows).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import objectives, runs, sharding
from jaxft.config import RunConfig, check_files
from jaxft.config.objectives import head_of
from jaxft.data.encode import Batches, load_examples
from jaxft.data.prompts import few_shot, general_prompts, heldout, shot_pool, with_shots
from jaxft.distributed import is_primary
from jaxft.errors import JaxftError
from jaxft.checkpoint import require_checkpoint
from jaxft.files import atomic_path, staging_dir, write_json, write_jsonl
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.commands.eval_report import LM_EVAL, number, read_lm_eval, write_report
from jaxft.formats.peft import load_adapter
from jaxft.generate import answer_chats, chat_prompt, eos_token_ids, with_system
from jaxft.metrics import score
from jaxft.objective import make_eval_step, mean_over_batches, perplexity
from jaxft.objectives.multi import MixedBatches, Tagged, single_adapter_loss
from jaxft.regression import Variant, answer_batches, divergences, greedy_answers, text_windows
from jaxft.runs import load_run
from jaxft.setup import resolve_model

GATE_EXIT = 3  # `jaxft eval`'s exit status when a regression threshold is crossed (2: bad input)


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
             overwrite: bool = False, compare_export=None, lm_eval_file=None) -> dict:
    """Returns {"base": {...}, "tuned": {...}}: the objective's validation measurement (the same function
    and batches as training's evaluations), the generation metric's scores and (eval.regression) the tuned
    model's reg_* figures against the base, written to `eval_dir`. compare_export: an exported artifact (merged
    HF directory, .gguf, PEFT adapter directory) judged against the tuned model: a variant "export".
    On run.mesh (over processes too): the weights read into their shards, validation batches and generation
    rows split over the mesh, every figure gathered; process 0 writes and prints."""
    check_files(run, training=False)
    where = eval_dir(run, out, overwrite)
    if compare_export is not None and base_only:
        raise JaxftError("--compare-export compares an export with the tuned model: not with --base-only")
    if compare_export is not None and head_of(run) == "score":
        raise JaxftError(f"--compare-export: objective {run.objective} trains a reward model, which has no next-token "
                         "distribution to compare")
    export_path = Path(compare_export).expanduser() if compare_export is not None else None
    if export_path is not None and not export_path.exists():
        raise JaxftError(f"--compare-export: {export_path}: no such file or directory")
    objectives.check_data(run, training=False)  # what can be refused is refused before the model loads
    check_few_shot(run)
    lm_eval = read_lm_eval(where, lm_eval_file)
    if not base_only:
        require_checkpoint(run.train.out_dir)
    if compare_export is not None and run.mesh.distributed:
        raise JaxftError("--compare-export: runs on one process (the export is read whole); leave out "
                         "mesh.distributed")
    mesh = sharding.command_mesh(run.mesh)
    progress = progress and is_primary()
    out_dir = Path(run.train.out_dir)
    done = load_run(run, mesh=mesh, restore=not base_only)
    setup = done.setup
    variants = {"base": setup.params}
    if not base_only:
        variants["tuned"] = done.params
        if progress:
            print(f"tuned: {out_dir}/checkpoints/{done.step}", file=sys.stderr)
    results: dict[str, dict] = {k: {} for k in variants}
    obj = objectives.make(run, setup, train=False, wrap=lambda b: sharding.ShardedBatches(b, mesh))
    if obj.evaluate is not None:
        with jax.set_mesh(mesh):  # as training's evaluations run (sums and counts over the whole mesh)
            for k, params in variants.items():
                results[k].update(obj.evaluate(params, setup.frozen))

    file = run.eval.file or obj.heldout
    predictions, items = {}, None
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
                                              progress=f"generating ({k})" if progress else "", mesh=mesh)
            results[k].update(score(run.eval.metric, predictions[k], refs))
        if run.eval.few_shot:  # fine-tune vs prompt: the base shown K training rows first
            k = shot_name(run.eval.few_shot)
            predictions[k] = answer_chats(setup.graphdef, (setup.params, setup.frozen), setup.tokenizer, shots, eos=eos,
                                          max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                          system_prompt=run.data.system_prompt,
                                          progress=f"generating ({k})" if progress else "", mesh=mesh)
            results = after_base(results, k, score(run.eval.metric, predictions[k], refs))
    if run.eval.regression and not base_only and head_of(run) != "score":  # a reward model has no next token
        base = Variant(setup.graphdef, (setup.params, setup.frozen))
        tuned = {k: Variant(setup.graphdef, (p, setup.frozen)) for k, p in variants.items() if k != "base"}
        for k, figures in regression(run, setup.tokenizer, setup.model_path, base, tuned, progress).items():
            results[k].update(figures)
    if export_path is not None:
        results["export"], exported = compare_export_to(run, done, export_path, items, progress)
        if exported is not None:
            predictions["export"] = exported
    if not is_primary():
        return results
    with staging_dir(where, overwrite=True) as tmp:  # one evaluation's files together, never half of two
        if items is not None:
            write_jsonl(tmp / "predictions.jsonl", [
                dict(prompt=p[-1]["content"], reference=r, **{k: predictions[k][i] for k in predictions})
                for i, (p, r) in enumerate(items)])
        write_json(tmp / "summary.json", results)
        write_report(tmp, results, where, Path(run.train.out_dir), lm_eval)
    print(f"report: {where / 'report.md'}", file=sys.stderr)
    return results


def regression(run: RunConfig, tokenizer, model_path, base: Variant, others: dict[str, Variant],
               progress: bool = True) -> dict[str, dict]:
    """{variant: reg_* figures}: each of `others` against `base`, teacher-forced on the base's greedy answers
    (eval.regression_new_tokens long) to the general prompts (eval.regression_file, default the shipped set)."""
    chats = general_prompts(run.eval.regression_file, run.eval.regression_prompts)
    if progress:
        print(f"regression check: {len(chats)} general prompts, the base's answers", file=sys.stderr)
    prompts, answers = greedy_answers(base, tokenizer, chats, eos=eos_token_ids(tokenizer, model_path),
                                      max_new_tokens=run.eval.regression_new_tokens,
                                      batch_size=run.eval.batch_size, system_prompt=run.data.system_prompt)
    batches = answer_batches(prompts, answers, run.eval.batch_size, run.eval.regression_new_tokens)
    out = divergences(base, others, batches, prefix="reg_")
    if run.eval.regression_text:  # cross-entropy change on plain general text (PEFT's forgetting measure)
        windows = text_windows(read_text_ids(run.eval.regression_text, tokenizer), run.eval.regression_new_tokens,
                               run.eval.regression_prompts)
        text = answer_batches(*windows, run.eval.batch_size, run.eval.regression_new_tokens)
        for k, f in divergences(base, others, text, prefix="reg_text_").items():
            out[k].update(reg_text_ce_increase=f["reg_text_ce_increase"],
                          reg_text_ppl_ratio=math.exp(f["reg_text_ce_increase"]), reg_text_kl_mean=f["reg_text_kl_mean"])
    return out


def read_text_ids(path: str, tokenizer) -> list[int]:
    """The token ids of a UTF-8 text file (eval.regression_text); one-line errors naming it."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxftError(f"eval.regression_text: {path}: cannot be read as UTF-8 text ({type(e).__name__})") from None
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise JaxftError(f"eval.regression_text: {path}: needs at least two tokens of text")
    return ids


def gate(run: RunConfig, results: dict) -> str | None:
    """The first regression threshold a variant crosses, as one line (None: every figure within its bound)."""
    bounds = (("reg_kl_mean", run.eval.max_kl, "eval.max_kl"),
              ("reg_ce_increase", run.eval.max_ce_increase, "eval.max_ce_increase"))
    for name, r in results.items():
        for key, bound, knob in bounds:
            if bound is not None and key in r and r[key] > bound:
                return f"regression gate: {name}: {key} {r[key]:.6g} > {knob} {bound:g}"
    return None


def exported_model(run: RunConfig, path: Path):
    """The exported artifact as a model: a merged HF directory or a .gguf (read as it is), or a PEFT adapter
    directory over the run's base (quantized as the run's, e.g. NF4 for QLoRA)."""
    if (path / "adapter_config.json").is_file():
        model = load_pretrained(resolve_model(run.model.path), quant=run.quant, attention=run.model.attention)
        load_adapter(model, path)
        return model
    return load_pretrained(path, attention=run.model.attention)


def compare_export_to(run: RunConfig, done, path: Path, items, progress: bool = True) -> tuple[dict, list | None]:
    """(exp_* figures and the task metric, its answers to the held-out prompts or None) of the exported artifact
    at `path` against the fp32 tuned model (a quantized run's base re-read unquantized), teacher-forced on the
    tuned model's greedy answers to the held-out prompts (`items`; none: the general prompts)."""
    if run.quant.base != "none":
        done = load_run(run, unquantized=True)
    setup = done.setup
    ref = Variant(setup.graphdef, (done.params, setup.frozen))
    model = exported_model(run, path)
    want = done.model().config.vocab_size
    if model.config.vocab_size != want:
        raise JaxftError(f"--compare-export: {path}: a vocabulary of {model.config.vocab_size} tokens, the run's "
                         f"model has {want}: not an export of this run")
    graphdef, state = nnx.split(model)
    exp = Variant(graphdef, (state,))
    chats = [p for p, _ in items] if items else general_prompts(run.eval.regression_file, run.eval.regression_prompts)
    eos = eos_token_ids(setup.tokenizer, setup.model_path)
    n_new = run.eval.max_new_tokens if items else run.eval.regression_new_tokens
    if progress:
        print(f"--compare-export {path}: {len(chats)} prompts, the tuned model's answers", file=sys.stderr)
    prompts, answers = greedy_answers(ref, setup.tokenizer, chats, eos=eos, max_new_tokens=n_new,
                                      batch_size=run.eval.batch_size, system_prompt=run.data.system_prompt)
    figures = divergences(ref, {"export": exp}, answer_batches(prompts, answers, run.eval.batch_size, n_new),
                          prefix="exp_")["export"]
    exported = None
    if items and run.eval.metric != "none":
        exported = answer_chats(graphdef, (state,), setup.tokenizer, chats, eos=eos,
                                max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                system_prompt=run.data.system_prompt, progress="generating (export)" if progress else "")
        figures.update(score(run.eval.metric, exported, [r for _, r in items]))
    return figures, exported


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
    if run.mesh.distributed:
        raise JaxftError("--adapter: side-by-side adapter evaluation runs on one process; leave out mesh.distributed")
    where = eval_dir(run, out, overwrite)
    objectives.check_data(run, training=False)
    check_few_shot(run)
    lm_eval = read_lm_eval(where, lm_eval_file)
    sources = runs.expand(specs)  # names and folders, read before the model loads
    path = resolve_model(run.model.path)
    model = load_pretrained(path, dtype=jnp.bfloat16 if run.model.dtype == "bf16" else jnp.float32,
                            attention=run.model.attention)
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
    if run.eval.regression:  # each adapter against the base: rows of the one bank with adapter id -1 / i
        others = {k: Variant(graphdef, (params, frozen), i) for k, i in variants.items() if k != "base"}
        base = Variant(graphdef, (params, frozen), -1)
        for k, figures in regression(run, tokenizer, path, base, others, progress).items():
            results[k].update(figures)
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
    cells = {n: [number(results[n].get(k)) for k in keys] for n in names}  # — where a column has no such figure
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
