"""`<eval dir>/report.md`: one page a user reads after `jaxft eval` (and `--adapter`), rendered from summary.json.

    text = render_report(summary, lm_eval=None, plots=[("compare", "compare.png")])   # pure: dicts -> markdown

Sections: the task table (every variant a column: base, base_<K>shot, tuned or each adapter; every metric
without a prefix a row, each explained in a line), the regression check (metrics `reg_*`), the export's cost
(metrics `exp_*`), lm-evaluation-harness results (`<eval dir>/lm_eval.json` as `jaxft lm-eval --output` writes
it, or `jaxft eval --lm-eval FILE`) and links to the plots. Numbers as `format_table` prints them (4 decimals).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxft.errors import JaxftError
from jaxft.files import read_json, write_json, write_text

LM_EVAL = "lm_eval.json"

# What each task metric is: one line per metric a variant's summary can hold (prefixes end with "/").
MEANINGS = {
    "eval_loss": "the objective's validation loss (SFT: mean token cross-entropy on the validation split)",
    "eval_ppl": "validation perplexity, exp(eval_loss)",
    "eval_tokens": "tokens the validation loss was measured on",
    "exact_match": "share of held-out answers equal to the reference (whitespace-trimmed)",
    "valid_json": "share of held-out answers that parse as JSON",
    "exact": "share of held-out answers whose JSON object equals the reference's",
    "field_accuracy": "share of the reference's JSON fields the answer gets right",
    "n": "held-out prompts the generation metric was measured on",
    "eval_accuracy": "share of validation pairs whose chosen answer scores above the rejected one",
    "eval_margin": "mean score of chosen minus rejected on the validation pairs",
    "eval_rewards/": "DPO's implicit rewards on the validation pairs",
    "eval_logps/": "log-probabilities of the validation pairs' answers",
}
# The regression check's and the export's figures (jaxft.divergence.summarize's names, after the prefix).
REGRESSION = {
    "kl_mean": "mean per-token KL(base || variant) on the base model's own greedy answers to the general prompts, "
               "nats: 0 is the base's distribution exactly.",
    "kl_p95": "95th percentile of that per-token KL: the worst tokens, where a change of behaviour shows first.",
    "ce_increase": "the variant's cross-entropy on those answers minus the base's, nats / token: how much less likely "
                   "it finds what the base would say; above 0 is forgetting.",
    "top1_agree": "share of answer tokens where the variant's top-1 token is the base's: 1 means the same greedy "
                  "choices.",
    "changed": "share of general prompts whose greedy answer would change (the variant's top-1 leaves the base's "
               "answer somewhere): how often a user would notice.",
    "tokens": "answer tokens compared.",
    "text_ce_increase": "cross-entropy change on the general text (eval.regression_text), nats / token.",
    "text_ppl_ratio": "perplexity on the general text over the base's (exp of the above).",
    "text_kl_mean": "mean per-token KL(base || variant) on the general text.",
}
EXPORT = {
    "kl_mean": "mean per-token KL(fp32 tuned || export) on the tuned model's answers to the held-out prompts, nats "
               "(llama.cpp's `--kl-divergence`): the quality the export costs.",
    "kl_p95": "95th percentile of that per-token KL.",
    "ce_increase": "the export's cross-entropy on the tuned model's answers minus the tuned model's, nats / token.",
    "top1_agree": "share of answer tokens where the export's top-1 token is the fp32 tuned model's.",
    "changed": "share of held-out prompts whose greedy answer the export would change.",
    "tokens": "answer tokens compared.",
}


def number(v) -> str:
    """A cell of the printed table and of report.md: 4 decimals; what is not a number as it is, a missing one as —."""
    if v is None:
        return "—"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        # 4 decimals; a figure below 0.001 (an export's KL) in 3 significant digits rather than as 0.0001
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def label(variant: str) -> str:
    """A column's heading: base_3shot reads "base, 3-shot"; other variants as summary.json names them."""
    m = re.fullmatch(r"base_(\d+)shot", variant)
    return f"base, {m.group(1)}-shot" if m else variant


def meaning(metric: str, rules=None) -> str | None:
    """A metric's one-line explanation: from MEANINGS, or from `rules` (REGRESSION / EXPORT, by the name after its
    prefix)."""
    if rules is not None:
        return rules.get(metric)
    return MEANINGS.get(metric) or next((t for k, t in MEANINGS.items() if k.endswith("/") and metric.startswith(k)),
                                        None)


def table(summary: dict, keep) -> tuple[list[str], list[str], list[str]]:
    """(markdown lines, variants shown, metrics shown) of the metrics `keep` accepts: variants as columns."""
    metrics = [k for k in dict.fromkeys(k for r in summary.values() for k in r) if keep(k)]
    variants = [v for v in summary if any(k in summary[v] for k in metrics)]
    if not metrics:
        return [], [], []
    lines = ["| metric | " + " | ".join(label(v) for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    lines += [f"| {k} | " + " | ".join(number(summary[v].get(k)) for v in variants) + " |" for k in metrics]
    return lines, variants, metrics


def explained(metrics: list[str], strip: str = "", rules=None) -> list[str]:
    out = []
    for k in metrics:
        text = meaning(k[len(strip):] if k.startswith(strip) else k, rules)
        if text:
            out.append(f"- `{k}`: {text}")
    return out


def is_task(k: str) -> bool:
    return not (k.startswith("reg_") or k.startswith("exp_"))


def render_report(summary: dict, lm_eval: dict | None = None, plots=()) -> str:
    """The markdown of report.md. summary: summary.json's dict ({variant: {metric: value}}); lm_eval: what
    `jaxft lm-eval --output` wrote (one simple_evaluate dict, or {variant: dict} with --base); plots:
    (title, relative path) pairs. Pure: the same inputs give the same text."""
    out = ["# Evaluation report", ""]
    lines, variants, metrics = table(summary, is_task)
    out += ["## Task", ""]
    if lines:
        shots = [v for v in variants if label(v) != v]
        out += lines + [""] + explained(metrics)
        for v in shots:
            out.append(f"- column `{label(v)}` ({v}): the base model prompted with {v[5:-4]} training examples as "
                       "earlier chat turns, no fine-tuning: does fine-tuning beat prompting on this task?")
        out.append("")
    else:
        out += ["No task metrics (no validation data and eval.metric none).", ""]
    lines, _, metrics = table(summary, lambda k: k.startswith("reg_"))
    if lines:
        out += ["## Regression against the base", "",
                "General prompts, not the task: how far each variant moved from the base model's behaviour.", ""]
        out += lines + [""] + explained(metrics, "reg_", REGRESSION) + [""]
    lines, _, metrics = table(summary, lambda k: k.startswith("exp_"))
    if lines:
        out += ["## What the export costs", ""] + lines + [""] + explained(metrics, "exp_", EXPORT) + [""]
    if lm_eval:
        out += ["## lm-evaluation-harness", ""] + lm_eval_table(lm_eval) + [""]
    if plots:
        out += ["## Plots", ""] + [f"- [{title}]({path})" for title, path in plots] + [""]
    return "\n".join(out)


def lm_eval_runs(data: dict) -> dict[str, dict]:
    """{variant: results} of an lm-eval output: one simple_evaluate dict (one column) or {variant: dict}."""
    if isinstance(data.get("results"), dict):
        return {"value": data["results"]}
    return {k: v["results"] for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("results"), dict)}


def lm_eval_table(data: dict) -> list[str]:
    """lm-eval's `results` as rows of task and metric ("acc,none" reads "acc"; a filter other than none in
    brackets), one column per variant, the standard error after ± when lm-eval gives one."""
    runs = lm_eval_runs(data)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for variant, results in runs.items():
        for task, metrics in results.items():
            for key, v in (metrics.items() if isinstance(metrics, dict) else ()):
                name, _, flt = key.partition(",")
                if key == "alias" or name.endswith("_stderr") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                err = metrics.get(f"{name}_stderr,{flt}" if flt else f"{name}_stderr")
                cell = number(v) + (f" ± {number(err)}" if isinstance(err, (int, float)) else "")
                rows.setdefault((task, name if flt in ("", "none") else f"{name} ({flt})"), {})[variant] = cell
    lines = ["| task | metric | " + " | ".join(runs) + " |", "|---|---|" + "---:|" * len(runs)]
    lines += [f"| {t} | {m} | " + " | ".join(cells.get(v, "—") for v in runs) + " |" for (t, m), cells in rows.items()]
    return lines


def read_lm_eval(where: Path, file=None) -> dict | None:
    """The lm-eval results for the report: `file` (jaxft eval --lm-eval), else <eval dir>/lm_eval.json when an
    earlier `jaxft lm-eval --output` put one there; None when neither. Read before the model loads."""
    path = Path(file) if file else Path(where) / LM_EVAL
    if not file and not path.is_file():
        return None
    if not path.is_file():
        raise JaxftError(f"--lm-eval {path}: no such file")
    data = read_json(path)
    if not isinstance(data, dict) or not lm_eval_runs(data):
        raise JaxftError(f"{path}: not lm-eval results (no 'results' object; write it with jaxft lm-eval --output)")
    return data


def write_report(tmp: Path, summary: dict, where: Path, run_dir: Path, lm_eval: dict | None = None) -> None:
    """report.md in the staging folder `tmp` of the evaluation that will be `where`, beside summary.json; the
    lm-eval results are kept there as lm_eval.json (the staged folder replaces the old one, and the report
    shows them). Plots: compare.png of this evaluation, the run's loss.png."""
    if lm_eval:
        write_json(tmp / LM_EVAL, lm_eval)
    plots = [("variants side by side", "compare.png")] if (tmp / "compare.png").is_file() else []
    if (run_dir / "loss.png").is_file():
        plots.append(("training loss", os.path.relpath(Path(run_dir).absolute() / "loss.png", Path(where).absolute())))
    write_text(tmp / "report.md", render_report(summary, lm_eval, plots))
