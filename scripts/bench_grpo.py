"""GRPO step time split into rollout / reference (+ rewards) / train, tokens/s and peak memory: jaxft next to
TRL's GRPOTrainer + PEFT on the same prompts and settings, one run.

    python scripts/bench_grpo.py [--prompts 2] [--G 4] [--completion 32] [--beta 0.04] [--steps 3] [--warmup 1]
                                 [--rank 16] [--alpha 32] [--lr 1e-5] [--only jaxft|trl] [--json OUT]

Model: the embedded example SmolLM2-135M-Instruct GGUF, fp32 on both sides. Prompts: the quickstart task's
chat prompts (jaxft.data.task, seed 0; 130-180 tokens with the chat template); reward: the json_fields score
(jaxft.objectives.reward_funcs.json_fields_reward, the same Python function on both sides). Per step one
generation batch of --prompts × --G completions of at most --completion new tokens (temperature 1, no top-k /
top-p), loss dapo, k3 KL against the adapters-off base when --beta > 0 (both sides: LoRA off, no second copy),
LoRA r / alpha on q,k,v,o,gate,up,down, dropout 0, AdamW constant lr, one micro-batch per step. TRL: gradient
checkpointing off (its default is on). jaxft: its default remat policy ("proj").

Split: jaxft's `time/rollout` (sampling + decoding + rewards) and `time/score` (advantages + the reference
forward) are measured by the rollout source, the train phase around the jitted step (block_until_ready).
TRL: `_generate_single_turn` (sampling) and the rest of `_generate_and_score_completions` (rewards, reference,
advantages) are timed by wrapping them; train = step − both. tokens/s = (prompt + completion tokens of the
step's completions) / step time. The samples differ (each side's own RNG), so completion lengths can differ;
both are printed. Each side runs in a fresh subprocess (peak RSS is its own).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (LORA_TARGETS, RssSampler, add_side_args, add_training_args, noise_lines, peak_rss_gb, run_sides,
                      serve_worker, table, write_json)

NAMES = {"jaxft": "jaxft grpo", "trl": "TRL GRPO+PEFT"}


def task_files(tmp: str, args) -> dict:
    from jaxft.data.task import write_task_files

    return write_task_files(Path(tmp) / "data", args.prompts * (args.warmup + args.steps) * 2, 4, 4, seed=0)


def worker_jaxft(args) -> dict:
    import jax

    from jaxft.config import load_config
    from jaxft.objectives import make as objective
    from jaxft.setup import build
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    with tempfile.TemporaryDirectory() as tmp:
        paths = task_files(tmp, args)
        n = args.prompts * args.G
        run = load_config(None, [
            "objective=grpo", "model.path=example", f"data.train={paths['train']}", "data.max_length=256",
            f"rollout.num_generations={args.G}", f"rollout.max_completion_length={args.completion}",
            "rollout.reward_funcs=[json_fields]", f"grpo.beta={args.beta}", f"train.batch_size={n}",
            f"lora.r={args.rank}", f"lora.alpha={args.alpha}", f"lora.target_modules=[{','.join(LORA_TARGETS)}]",
            f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.clip_norm=null",
            f"train.out_dir={tmp}/run", f"train.steps={args.warmup + args.steps}"])
        t0 = time.perf_counter()
        setup = build(run)
        obj = objective(run, setup)
        tx = make_optimizer(run.optim, run.train.steps, setup.params)
        state = init_state(setup.params, tx)
        step_fn = make_train_step(setup.graphdef, tx, obj.loss_fn)
        t_load = time.perf_counter() - t0
        # Prompts are padded to multiples of 32, so a step that meets a new prompt bucket compiles the sampler
        # and the step again; the XLA compile seconds of each step are recorded so that the summary can leave
        # those steps out (TRL has no such cost, and a long run pays it once per bucket).
        compile_s = [0.0]
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, secs, **kw: compile_s.__setitem__(0, compile_s[0] + secs)
            if event == "/jax/core/compile/backend_compile_duration" else None)
        rows = []
        with RssSampler() as sampler:
            for step in range(1, run.train.steps + 1):
                compile_s[0] = 0.0
                t0 = time.perf_counter()
                batch = obj.train(step, state["params"])
                t1 = time.perf_counter()
                state, m = step_fn(state, setup.frozen, batch)
                m = jax.block_until_ready(m)
                t2 = time.perf_counter()
                h = obj.train.host_metrics(step)
                rows.append(dict(step_s=t2 - t0, rollout_s=h["time/rollout"], ref_s=h["time/score"], train_s=t2 - t1,
                                 tokens=int(m["tokens"]), completion_len=h["completions/mean_length"],
                                 reward=h["reward"], loss=float(m["loss"]), compile_s=compile_s[0]))
                print(f"  step {step}: {rows[-1]}", file=sys.stderr, flush=True)
    return dict(framework=NAMES["jaxft"], version=f"jax {jax.__version__}", load_s=t_load, rows=rows,
                train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxft.example import example_model
    from jaxft.objectives.reward_funcs import json_fields_reward
    from jaxft.data.prompts import load_prompts

    path = example_model()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    t_load = time.perf_counter() - t0

    def json_fields(prompts, completions, completion_ids, **kw):
        return json_fields_reward(prompts, completions, completion_ids, **kw)

    rows, phase = [], {}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phase.clear()
            phase["t0"] = time.perf_counter()

        def on_step_end(self, state, *a, **k):
            step_s = time.perf_counter() - phase["t0"]
            rows.append(dict(step_s=step_s, rollout_s=phase.get("gen", 0.0), ref_s=phase.get("score", 0.0),
                             train_s=step_s - phase.get("gen", 0.0) - phase.get("score", 0.0)))
            print(f"  step {len(rows)}: {rows[-1]}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        from jaxft.config import DataConfig

        prompts, _ = load_prompts(DataConfig(train=task_files(tmp, args)["train"], max_length=256), tok)
        ds = Dataset.from_list([dict(prompt=p.prompt, solution=p.columns["solution"]) for p in prompts])
        n = args.prompts * args.G
        cfg = GRPOConfig(output_dir=f"{tmp}/out", per_device_train_batch_size=n, num_generations=args.G,
                         max_completion_length=args.completion, beta=args.beta, loss_type="dapo", temperature=1.0,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=0.0, max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=args.seed,
                         shuffle_dataset=False, disable_tqdm=True)
        tr = GRPOTrainer(model=model, reward_funcs=[json_fields], args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"),
                         callbacks=[StepTimes()])
        gen, score = tr._generate_single_turn, tr._generate_and_score_completions

        def timed_gen(*a, **k):
            t = time.perf_counter()
            out = gen(*a, **k)
            phase["gen"] = phase.get("gen", 0.0) + time.perf_counter() - t
            return out

        def timed_score(*a, **k):
            t = time.perf_counter()
            out = score(*a, **k)
            phase["score"] = phase.get("score", 0.0) + time.perf_counter() - t - phase.get("gen", 0.0)
            return out

        tr._generate_single_turn, tr._generate_and_score_completions = timed_gen, timed_score
        with RssSampler() as sampler:
            tr.train()
    hist = [h for h in tr.state.log_history if "loss" in h]
    last = 0
    for r, h in zip(rows, hist):
        r.update(tokens=int(h["num_tokens"] - last), completion_len=h["completions/mean_length"], reward=h["reward"],
                 loss=h["loss"])
        last = h["num_tokens"]
    return dict(framework=NAMES["trl"], version=f"torch {torch.__version__}", load_s=t_load, rows=rows,
                train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


SIDES = {"jaxft": worker_jaxft, "trl": worker_trl}


def summarize(r: dict, args) -> dict:
    # Steps after the warm-up that compiled (a new prompt bucket; jaxft only) are left out of the medians.
    timed = [x for x in r["rows"][args.warmup:] if x.get("compile_s", 0.0) < 1.0] or r["rows"][args.warmup:]
    r["compiled_steps"] = sum(x.get("compile_s", 0.0) >= 1.0 for x in r["rows"][args.warmup:])
    med = lambda k: statistics.median(x[k] for x in timed)  # noqa: E731
    return dict(r, step_s=med("step_s"), rollout_s=med("rollout_s"), ref_s=med("ref_s"), train_s=med("train_s"),
                tokens_per_s=statistics.median(x["tokens"] / x["step_s"] for x in timed),
                completion_len=statistics.mean(x["completion_len"] for x in timed), first_step_s=r["rows"][0]["step_s"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per generation batch")
    ap.add_argument("--G", type=int, default=4, help="completions per prompt")
    ap.add_argument("--completion", type=int, default=32, help="max new tokens per completion")
    ap.add_argument("--beta", type=float, default=0.04)
    add_training_args(ap, steps=3, warmup=1, lr=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    add_side_args(ap, SIDES)
    args = ap.parse_args()
    if serve_worker(args, SIDES):
        return
    busy, results = run_sides(args, SIDES, summarize, __file__)
    print(f"\nGRPO step, SmolLM2-135M-Instruct fp32, LoRA r={args.rank} on q,k,v,o,gate,up,down: {args.prompts} "
          f"prompts "
          f"x G={args.G}, <= {args.completion} new tokens, beta {args.beta:g}, dapo; {args.warmup} warmup + "
          f"{args.steps} timed steps (medians); cores {os.cpu_count()}")
    lines = table([("side", "<14", "framework"), ("step s", ">7.2f", "step_s"), ("rollout s", ">9.2f", "rollout_s"),
                   ("ref+adv s", ">9.2f", "ref_s"), ("train s", ">7.2f", "train_s"),
                   ("tokens/s", ">8.1f", "tokens_per_s"), ("compl len", ">9.1f", "completion_len"),
                   ("peak RSS GB", ">11.2f", "peak_rss_gb"), ("first step s", ">12.1f", "first_step_s")],
                  results.values())
    for i, r in enumerate(results.values(), 2):  # after the header and its rule
        if r["compiled_steps"]:
            lines[i] += f"  ({r['compiled_steps']} timed step(s) that compiled a new prompt bucket left out)"
    print("\n".join(lines))
    print("\n".join(noise_lines(results.values())))
    if len(results) == 2:
        j, t = results["jaxft"], results["trl"]
        print(f"jaxft/trl step speed: {t['step_s'] / j['step_s']:.2f}x; tokens/s: "
              f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x")
    write_json(args.json, settings=vars(args), busy=busy, results=results)


if __name__ == "__main__":
    main()
