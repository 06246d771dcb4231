"""`jaxft cai run CONFIG`: the Constitutional AI pipeline in one run directory, each stage resumable.

    <cai.out_dir>/revise/    sft.jsonl, trace.jsonl             jaxft.commands.cai.revise on the base model
                 sft/        a `jaxft train` run (objective sft) on revise/sft.jsonl; sft/merged/ = SL-CAI
                 label/      pairs.jsonl, trace.jsonl           jaxft.commands.cai.label: SL-CAI answers, judged
                 dpo/        a `jaxft train` run (objective dpo) from SL-CAI on label/pairs.jsonl = RL-CAI
                 (reward/    with cai.final=reward: a reward model on the pairs instead of DPO)
                 summary/    answers_<model>.jsonl, summary.json: base vs SL-CAI vs RL-CAI on cai.heldout

Each training stage is an ordinary run: its config is the CAI config with objective, model.path,
data.train and train.out_dir set, then `cai.sft` / `cai.dpo` key=value overrides (the stage's
`stage.yaml` is written next to it). A stage whose last checkpoint is train.steps is skipped; a
partial one resumes. The SL-CAI model is exported merged (fp32), so that the DPO reference
(dpo.reference=lora_base: the adapter switched off) is SL-CAI itself, as in the paper.

Extension point for RL: with cai.final=reward the pipeline stops after training the reward model
(`reward_stage`); a PPO / GRPO stage from SL-CAI against it is the next entry of STAGES once the RL
objectives exist (see `run_all`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from jaxft.commands.cai import draw_comparisons, judge, label, load_policy, revise, say_err
from jaxft.commands.export import export
from jaxft.commands.train import train
from jaxft.config import RunConfig, load_config
from jaxft.data.constitution import load_constitution
from jaxft.data.prompts import heldout
from jaxft.errors import JaxftError
from jaxft.files import write_json, write_jsonl, write_text
from jaxft.generate import Sampling
from jaxft.metrics import score
from jaxft.sharding import command_mesh


def stage_config(run: RunConfig, stage_dir: Path, objective: str, model: str, train_file: Path,
                 overrides: tuple[str, ...]) -> RunConfig:
    """The training run of one stage (written to <stage_dir>/stage.yaml, then loaded with the overrides)."""
    tree = run.to_dict()
    tree.pop("cai")
    tree["objective"], tree["model"]["path"] = objective, model
    tree["data"].update(train=str(train_file), validation=None)
    tree["train"]["out_dir"] = str(stage_dir)
    tree["eval"]["file"] = run.cai.heldout if objective != "reward" else None
    if objective == "reward":
        tree["eval"]["metric"] = "none"
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "stage.yaml"
    write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return load_config(path, list(overrides))


def _last_step(out_dir: Path) -> int:
    d = out_dir / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(steps, default=0)


def train_stage(run: RunConfig, say=say_err) -> None:
    """Train the stage's run, resuming a partial one; nothing when its last checkpoint is the last step."""
    out = Path(run.train.out_dir)
    done = _last_step(out)
    if done >= run.train.steps:
        say(f"{out}: trained ({done} steps), skipped")
        return
    train(run, resume=done > 0)


def merged_stage(run: RunConfig, say=say_err) -> Path:
    """The stage's newest checkpoint as a merged fp32 HF model in <out_dir>/merged (kept while current)."""
    out = Path(run.train.out_dir) / "merged"
    marker = out / "jaxft_step.txt"
    step = _last_step(Path(run.train.out_dir))
    if marker.is_file() and marker.read_text() == str(step):
        say(f"{out}: exported (step {step}), skipped")
        return out
    export(run, "merged", out, dtype="fp32", overwrite=True)
    write_text(marker, str(step))
    return out


def run_all(run: RunConfig, say=say_err) -> dict:
    """revise → SFT → label → DPO (or reward model) → summary; returns the summary table's rows."""
    cfg = run.cai
    root = Path(cfg.out_dir)
    load_constitution(cfg.constitution)  # a bad file fails before any model loads
    mesh = command_mesh(run.mesh)
    base = load_policy(run, mesh=mesh)
    say("== revise (base model: answer, critique, revise)")
    revise(run, root / "revise", base, say)
    sft = stage_config(run, root / "sft", "sft", run.model.path, root / "revise" / "sft.jsonl", cfg.sft)
    say("== sft (SL-CAI)")
    train_stage(sft, say)
    sl_path = str(merged_stage(sft, say))
    sl = load_policy(run, sl_path, mesh=mesh)
    judge_policy = load_policy(run, cfg.feedback_model, mesh=mesh) if cfg.feedback_model else None
    say("== label (SL-CAI answers, AI feedback)")
    label(run, root / "label", sl, judge_policy or sl, say)
    final_dir = root / cfg.final
    final = stage_config(run, final_dir, cfg.final, sl_path, root / "label" / "pairs.jsonl", cfg.dpo)
    say(f"== {cfg.final} ({'RL-CAI' if cfg.final == 'dpo' else 'preference model'})")
    train_stage(final, say)
    # RL extension point: with cai.final=reward, a PPO / GRPO stage from `sl_path` against the reward model
    # in `final_dir` goes here (stage_config(run, root / "ppo", "ppo", sl_path, ...)), then joins the summary.
    models = {"base": base, "sl-cai": sl}
    if cfg.final == "dpo":
        models["rl-cai"] = load_policy(run, run_dir=final_dir, mesh=mesh)
    if not cfg.heldout:
        say("no cai.heldout: no summary table")
        return {}
    judge_policy = judge_policy or base  # one fixed judge for every column
    rows = summarize(run, root / "summary", models, judge_policy, say)
    say(format_summary(rows))
    return rows


def summarize(run: RunConfig, out: Path, models: dict, judge_policy, say=say_err) -> dict:
    """Greedy answers of each model on cai.heldout: the task metric (eval.metric, vs the references) and
    `judge_win` — the judge's mean P(this model's answer is better than the base model's), over
    cai.principles_per_pair drawn comparison principles per prompt, in both orders when cai.both_orders
    (0.5 for the base itself; a proxy for what the constitution asks, from a judge that may be weak)."""
    cfg = run.cai
    items = heldout(cfg.heldout, run.data.format, run.eval.max_examples)
    prompts, refs = [p for p, _ in items], [r for _, r in items]
    comparers = load_constitution(cfg.feedback_constitution or cfg.constitution).comparers()
    out.mkdir(parents=True, exist_ok=True)
    greedy = Sampling(max_new_tokens=run.eval.max_new_tokens)
    answers, rows = {}, {}
    for name, policy in models.items():
        got = []
        for k in range(0, len(prompts), run.eval.batch_size):
            got += [a["text"] for a in policy.answer(prompts[k:k + run.eval.batch_size], greedy)]
        answers[name] = got
        write_jsonl(out / f"answers_{name}.jsonl",
                           [dict(prompt=p, reference=r, answer=a) for p, r, a in zip(prompts, refs, got)])
        rows[name] = score(run.eval.metric, got, refs) if run.eval.metric != "none" else {}
        if name == "base":
            rows[name]["judge_win"] = 0.5
            continue
        qs = [[comparers[q] for q in draw_comparisons(cfg.seed, i, cfg.principles_per_pair, len(comparers))]
              for i in range(len(prompts))]
        verdicts = judge(judge_policy, prompts, list(zip(got, answers["base"])), qs, cfg)
        same = [a == b for a, b in zip(got, answers["base"])]
        rows[name]["judge_win"] = float(np.mean([0.5 if s else v["p"] for s, v in zip(same, verdicts)]))
        say(f"summary: {name} done")
    write_json(out / "summary.json", rows)
    return rows


def format_summary(rows: dict) -> str:
    """Models as columns, metrics as rows."""
    if not rows:
        raise JaxftError("no summary rows")
    names = list(rows)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r if k != "n"))
    lines = [f"{'metric':<16}" + "".join(f"{n:>10}" for n in names)]
    lines += [f"{k:<16}" + "".join(f"{rows[n].get(k, float('nan')):>10.3f}" for n in names) for k in keys]
    return "\n".join(lines)
