"""`jaxft` command line: train | eval | export | merge-adapters | score | plan | prepare | task-data | generate | chat | cai |
lm-eval | example-model.

Bad input ends in one line on stderr (`jaxft: error: ...`) and exit status 2, never a traceback; `jaxft eval`
exits 3 when a regression threshold (eval.max_kl, eval.max_ce_increase) is crossed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxft.errors import Interrupted, JaxftError

EXAMPLE = "example"


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("model", nargs="?", default=EXAMPLE,
                   help="HF model directory or .gguf file (default: the embedded example, SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and compute dtype")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (PEFT directory or jaxft run; a bare DIR: a PEFT multi-adapter folder or a "
                        "multi-adapter run, all its adapters); repeat for several, served from one bank")
    _add_mesh_arg(p)
    p.add_argument("--use", action="append", default=[], metavar="NAME",
                   help="the adapter (or base) that answers: once for every prompt, or once per --prompt "
                        "(generate: default every adapter answers every prompt; chat: the first, /use NAME switches)")


def _add_mesh_arg(p: argparse.ArgumentParser):
    p.add_argument("--mesh", action="append", default=[], metavar="KEY=VALUE",
                   help="device mesh / processes (mesh.KEY of a run config: data, fsdp, tensor, strategy, distributed, "
                        "coordinator_address, num_processes, process_id); repeat for several")


# A finished run's saved mesh says how it trained (devices, processes, a coordinator that is gone), not how a later
# command runs: commands that read a run start from one device and take the mesh from their own --mesh.
FRESH_MESH = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.distributed=false",
              "mesh.coordinator_address=null", "mesh.num_processes=null", "mesh.process_id=null")


def _mesh_overrides(args, fresh: bool = False) -> list[str]:
    """`--mesh KEY=VALUE` flags as `mesh.KEY=VALUE` overrides (after FRESH_MESH when `fresh`)."""
    for kv in args.mesh:
        if "=" not in kv:
            raise JaxftError(f"--mesh {kv}: expected KEY=VALUE (e.g. --mesh fsdp=-1)")
    return [*(FRESH_MESH if fresh else ()), *(f"mesh.{kv}" for kv in args.mesh)]


def _mesh_config(args):
    """The MeshConfig of a command that takes no run config: the defaults (one device) changed by --mesh."""
    from jaxft.config import load_config

    return load_config(None, _mesh_overrides(args)).mesh


INTERMIXED = ("train", "eval", "plan", "prepare", "cai")  # commands whose flags may come before, after or between
# their positional arguments (`jaxft train CFG --resume train.steps=10`): parsed by their own sub-parser's
# parse_intermixed_args, which argparse does not support on a parser with sub-commands.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune pretrained decoder LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer prompts (chat template applied) and print the answers")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="a user message; repeat for a batch")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    c = sub.add_parser("chat", help="interactive chat (reads lines from stdin when it is not a terminal)")
    _add_model_args(c)
    sub.add_parser("example-model", help="fetch the embedded example model once and print its path")

    t = sub.add_parser("train", help="fine-tune: jaxft train configs/sft_lora.yaml train.steps=10")
    t.add_argument("config", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint of train.out_dir that restores (damaged ones are "
                            "moved aside; when none restores this is an error, see --restart)")
    start.add_argument("--restart", action="store_true",
                       help="start over from step 0 in train.out_dir: its checkpoints directory is moved aside to "
                            "checkpoints.old-<time> (nothing is deleted)")
    _add_mesh_arg(t)
    e = sub.add_parser("eval", help="validation loss + generation metric, base and fine-tuned side by side")
    e.add_argument("config", help="YAML run config, or a run directory (its config.json)")
    e.add_argument("overrides", nargs="*", help="section.key=value")
    e.add_argument("--base-only", action="store_true", help="evaluate the base model only (no run needed)")
    e.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="score the base and each of these adapters side by side (mixed-adapter batches); repeatable")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="where summary.json and predictions.jsonl go (default: <train.out_dir>/eval)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in that folder (without it, one there is an error)")
    e.add_argument("--lm-eval", default=None, metavar="FILE.json",
                   help="lm-eval results (jaxft lm-eval --output) for report.md (default: <eval dir>/lm_eval.json "
                        "when there)")
    e.add_argument("--compare-export", default=None, metavar="PATH",
                   help="also judge an export of the run (merged HF directory, .gguf, PEFT adapter directory) against "
                        "the fp32 tuned model: KL, top-1 agreement and the task metric, as a column 'export'")
    _add_mesh_arg(e)
    pr = sub.add_parser("prepare", help="clean, deduplicate and split SFT data into train/validation JSONL")
    pr.add_argument("inputs", nargs="+", help="data files (JSONL, JSON, Parquet, CSV or datasets folders)")
    pr.add_argument("--out", required=True, metavar="DIR",
                    help="folder for train.jsonl and validation.jsonl (created; files there are replaced)")
    pr.add_argument("--validation-fraction", type=float, default=0.0,
                    help="share of the rows held out as validation.jsonl (default: 0.0, none)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the train / validation split (default: 0)")
    pr.add_argument("--near-dup-threshold", type=float, default=None,
                    help="also drop near-duplicates (MinHash Jaccard >= this, e.g. 0.8)")
    pr.add_argument("--format", default="auto",
                    help="row format: auto (from the columns), messages, prompt_completion, alpaca, sharegpt or "
                         "text (default: auto)")
    x = sub.add_parser("export", help="write a run's PEFT adapter, merged Hugging Face model or GGUF file")
    x.add_argument("run", help="run directory (train.out_dir)")
    x.add_argument("--format", choices=["peft", "merged", "gguf", "gguf-lora"], default="peft",
                   help="peft: adapter dir; merged: HF model dir; gguf: merged model as one llama.cpp GGUF file; "
                        "gguf-lora: the adapter as a llama.cpp --lora GGUF (default: peft)")
    x.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="tensor type of a --format gguf file's matrices (norms and 1-D tensors stay f32; "
                        "default: f16)")
    x.add_argument("--out", required=True, help="the folder (peft, merged) or file (gguf, gguf-lora) to write")
    x.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="merged weights dtype (--format merged; default: bf16)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    x.add_argument("--strict", action="store_true",
                   help="vLLM compatibility problems are errors, not warnings (default: warnings)")
    _add_mesh_arg(x)
    ma = sub.add_parser("merge-adapters", help="merge LoRA adapters (PEFT directories or jaxft runs) into one PEFT "
                                               "adapter, as PEFT's add_weighted_adapter")
    ma.add_argument("adapters", nargs="+", help="PEFT adapter directories and/or jaxft run directories")
    ma.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter (may be negative)")
    ma.add_argument("--method", required=True,
                    help="PEFT's combination_type: linear | cat | svd | ties | dare_linear | dare_ties | "
                         "magnitude_prune, or ties / dare_linear / dare_ties / magnitude_prune + _svd")
    ma.add_argument("--density", type=float, default=None, help="kept fraction for ties / dare / magnitude_prune")
    ma.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total",
                    help="TIES sign election (ties, dare_ties)")
    ma.add_argument("--svd-rank", type=int, default=None, help="rank of an svd merge (default: the largest input rank)")
    ma.add_argument("--seed", type=int, default=0,
                    help="dare masks: PEFT's (on CPU) after torch.manual_seed(SEED) and add_weighted_adapter")
    ma.add_argument("--out", required=True)
    ma.add_argument("--overwrite", action="store_true")
    ma.add_argument("--strict", action="store_true", help="vLLM compatibility problems are errors, not warnings")
    _add_mesh_arg(ma)
    sc = sub.add_parser("score", help="score preference pairs (and their accuracy) or completions with a reward model")
    sc.add_argument("model", help="a reward run directory (train.out_dir) or a *ForSequenceClassification model directory")
    sc.add_argument("--input", required=True, help="JSONL of pairs (chosen/rejected[/prompt]) or prompt/completion rows")
    sc.add_argument("--out", default=None, help="output JSONL (default: <input>.scores.jsonl)")
    sc.add_argument("--batch-size", type=int, default=8)
    sc.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: the run's)")
    _add_mesh_arg(sc)
    pl = sub.add_parser("plan", help="expected device memory of a training run (weights, adapter, optimizer, "
                                     "activations), from the model's shape only")
    pl.add_argument("config", nargs="?", default=None,
                    help="YAML run config (optional with --model: the defaults, changed by the overrides)")
    pl.add_argument("overrides", nargs="*", help="section.key=value")
    pl.add_argument("--model", help="an HF directory, a .gguf file or a preset (llama3-8b, llama3-70b); "
                                    "default: the config's model.path")
    td = sub.add_parser("task-data", help="write the quickstart's task dataset (train/validation/test JSONL)")
    td.add_argument("out")
    td.add_argument("--train", type=int, default=400)
    td.add_argument("--validation", type=int, default=32)
    td.add_argument("--test", type=int, default=48)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--pairs", action="store_true",
                    help="also write train_pairs.jsonl / validation_pairs.jsonl (chosen = correct, rejected = wrong)")
    ca = sub.add_parser("cai", help="Constitutional AI: revise (critique → revision SFT data), label (AI-feedback "
                                    "preference pairs), run (revise → SFT → label → DPO, with a summary table)")
    ca.add_argument("stage", choices=["revise", "label", "run"])
    ca.add_argument("config", help="YAML run config with a cai: section (e.g. configs/cai_task.yaml)")
    ca.add_argument("overrides", nargs="*", help="section.key=value")
    _add_mesh_arg(ca)
    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a model or a run (base and tuned with --base)")
    le.add_argument("model", help="HF model directory, .gguf file, 'example', or a jaxft run directory (its tuned "
                                  "weights)")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    le.add_argument("--include-path", default=None, metavar="DIR",
                    help="more task YAMLs (e.g. configs/lm_eval: the quickstart's task, offline)")
    le.add_argument("--num-fewshot", type=int, default=None)
    le.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction if < 1)")
    le.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    le.add_argument("--base", action="store_true", help="a run (or --use ADAPTER): its base model beside it")
    le.add_argument("--output", default=None, metavar="FILE.json", help="write the results dict (JSON)")
    le.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    le.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="adapters over MODEL (PEFT directories or jaxft runs), one bank; --use picks the one to run")
    le.add_argument("--use", default=None, metavar="NAME", help="the adapter to evaluate (default: the first)")
    le.add_argument("--batch-size", type=int, default=16, help="generation rows per call")
    le.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    le.add_argument("--seed", type=int, default=0)
    _add_mesh_arg(le)
    parser.commands = sub.choices  # name → sub-parser, for _parse
    return parser


def _sampling(args):
    from jaxft.generate import Sampling

    if args.max_new_tokens < 1:
        raise JaxftError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise JaxftError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)


def cmd_generate(args):
    from jaxft.commands.generate import generate_answers

    generate_answers(args.model, args.prompt, sampling=_sampling(args), system=args.system, raw=args.raw,
                     dtype=args.dtype, adapters=args.adapter, use=args.use, mesh=_mesh_config(args))


def cmd_chat(args):
    from jaxft.commands.generate import chat

    chat(args.model, sampling=_sampling(args), system=args.system, dtype=args.dtype, adapters=args.adapter,
         use=args.use, mesh=_mesh_config(args))


def cmd_example_model(args):
    from jaxft.example import example_model

    print(example_model())


def _run_config(path: str, overrides: list[str]):
    from jaxft.config import read_config

    return read_config(path, overrides)


def cmd_train(args):
    from jaxft.distributed import is_primary
    from jaxft.commands.train import train

    run = _run_config(args.config, [*args.overrides, *_mesh_overrides(args)])
    if args.restart:
        from jaxft.checkpoint import set_aside

        if (aside := set_aside(run.train.out_dir)) is not None:
            print(f"jaxft: --restart: moved the old checkpoints to {aside}; training from step 0", file=sys.stderr)
    last = train(run, resume=args.resume)
    if not is_primary():  # a multi-host run reports from process 0 only
        return
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    print(json.dumps(dict(step=last.get("step"), **shown)))


def cmd_eval(args):
    from jaxft.commands.evaluate import GATE_EXIT, eval_dir, evaluate, format_table, gate
    from jaxft.distributed import is_primary

    # a run directory's mesh is how it trained; a YAML's mesh section is this evaluation's
    run = _run_config(args.config, [*args.overrides, *_mesh_overrides(args, fresh=Path(args.config).is_dir())])
    where = eval_dir(run, args.out, args.overwrite)
    if run.adapters and not args.adapter:  # a multi-adapter run: its adapters next to the base
        args.adapter = [run.train.out_dir]
    if args.adapter:  # the base and every adapter side by side, mixed-adapter batches
        from jaxft.commands.evaluate import compare

        if args.compare_export:
            raise JaxftError("--compare-export: compares one run's export with its tuned model, not with --adapter")
        results = compare(run, args.adapter, out=where, overwrite=args.overwrite, lm_eval_file=args.lm_eval)
        print(format_table(results))
        print(f"outputs: {where}/ (summary.json, predictions.jsonl, compare.png)")
    else:
        results = evaluate(run, base_only=args.base_only, out=where, overwrite=args.overwrite,
                           compare_export=args.compare_export, lm_eval_file=args.lm_eval)
        if is_primary():  # process 0 reports (every process has the same figures, and so the same exit status)
            print(format_table(results))
            print(f"outputs: {where}/ (summary.json, predictions.jsonl)")
    failed = gate(run, results)
    if failed:  # the figures are written and shown; the exit status tells a script the model regressed
        if is_primary():
            print(f"jaxft: {failed}", file=sys.stderr)
        return GATE_EXIT
    return 0


def cmd_prepare(args):
    from jaxft.data.prepare import prepare

    prepare(args.inputs, args.out, validation_fraction=args.validation_fraction, seed=args.seed,
            near_dup_threshold=args.near_dup_threshold, fmt=args.format)


def cmd_export(args):
    from jaxft.commands.export import export
    from jaxft.distributed import is_primary

    run = _run_config(args.run, _mesh_overrides(args, fresh=True))
    out, step = export(run, args.format, args.out, dtype=args.dtype, gguf_type=args.gguf_type,
                       strict=args.strict, overwrite=args.overwrite)
    if is_primary():
        print(f"exported step {step} of {args.run} to {out} ({args.format})")


def cmd_merge_adapters(args):
    from jaxft.commands.merge_adapters import merge_adapters
    from jaxft.distributed import is_primary

    out = merge_adapters(args.adapters, args.weights, args.method, args.out, density=args.density,
                         sign_method=args.majority_sign_method, svd_rank=args.svd_rank, seed=args.seed,
                         overwrite=args.overwrite, strict=args.strict, mesh=_mesh_config(args))
    if is_primary():
        print(f"merged {len(args.adapters)} adapter(s) ({args.method}) into {out}")


def cmd_score(args):
    from jaxft.commands.score import score_file
    from jaxft.distributed import is_primary

    if args.batch_size < 1:
        raise JaxftError(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = score_file(args.model, args.input, args.out, batch_size=args.batch_size, max_length=args.max_length,
                         mesh=_mesh_config(args))
    if is_primary():
        print(json.dumps(summary))


def cmd_plan(args):
    from jaxft.commands.plan import format_plan, model_config, plan

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # `plan --model M key=value`: an
        config, overrides = None, [config, *overrides]                      # override, not a config file
    if config is None and not args.model:
        raise JaxftError("plan: give a run config, or --model (an HF directory, a .gguf file or a preset)")
    if config is None:
        from jaxft.config import load_config

        run = load_config(None, overrides)
    else:
        run = _run_config(config, overrides)
    name = args.model or run.model.path
    cfg = model_config(name)
    print(format_plan(plan(cfg, run), cfg, run, name))


def cmd_task_data(args):
    from jaxft.data.task import write_pair_files, write_task_files

    write = write_pair_files if args.pairs else write_task_files
    paths = write(args.out, args.train, args.validation, args.test, seed=args.seed)
    print(" ".join(f"{k}={v}" for k, v in paths.items()))


def cmd_cai(args):
    from jaxft.commands import cai

    run = _run_config(args.config, [*args.overrides, *_mesh_overrides(args)])
    if not run.cai.prompts:
        raise JaxftError("cai.prompts: no prompt file given")
    if args.stage == "run":
        from jaxft.commands.cai_run import run_all

        run_all(run)
        return
    summary = (cai.revise if args.stage == "revise" else cai.label)(run)
    if summary:  # process 0's (the others write and report nothing)
        print(json.dumps({k: v for k, v in summary.items() if k != "stats"}))


def cmd_lm_eval(args):
    try:
        from jaxft.commands.lm_eval import lm_eval_command
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise JaxftError("lm-eval is not installed: pip install 'jaxft[lm-eval]' (or pip install lm-eval==0.4.13)") \
            from None
    tasks = [t for t in args.tasks.split(",") if t]
    lm_eval_command(args.model, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                    limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                    apply_chat_template=args.apply_chat_template, base=args.base, output=args.output,
                    log_samples=args.log_samples, adapters=args.adapter, use=args.use, batch_size=args.batch_size,
                    dtype=args.dtype, seed=args.seed, mesh=_mesh_config(args))


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "example-model": cmd_example_model, "train": cmd_train,
            "eval": cmd_eval, "prepare": cmd_prepare, "task-data": cmd_task_data, "export": cmd_export,
            "plan": cmd_plan, "score": cmd_score, "merge-adapters": cmd_merge_adapters, "cai": cmd_cai,
            "lm-eval": cmd_lm_eval}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in INTERMIXED:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        status = COMMANDS[args.command](args)  # None: success; eval: GATE_EXIT when a regression gate is crossed
    except JaxftError as e:
        print(f"jaxft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; a training run says where it stopped and what it saved
        print(f"\njaxft: {e if isinstance(e, Interrupted) else 'stopped (Ctrl-C)'}", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
