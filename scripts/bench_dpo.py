"""DPO training throughput and peak memory: jaxft next to TRL's DPOTrainer + PEFT, same settings, one run;
plus jaxft SFT on the same 2×batch of sequences (what a DPO step's policy forward sees).

    python scripts/bench_dpo.py [--batch 4] [--prompt 128] [--completion 128] [--steps 5] [--warmup 2]
                                [--rank 16] [--alpha 32] [--lr 1e-4] [--beta 0.1] [--only jaxft|cache|sft|trl]
                                [--json OUT]

Model: the embedded example SmolLM2-135M-Instruct GGUF, fp32 on both sides. Data: --batch pairs per
step, each a prompt of --prompt and two completions of --completion seeded random token ids (the last
one EOS), so every sequence has S = prompt + completion real tokens and no padding. Loss: sigmoid DPO,
beta, completion tokens only. LoRA r / alpha, dropout 0, on q,k,v,o,gate,up,down; AdamW, constant lr,
no weight decay, no clipping; gradient accumulation 1.

Sides, each in its own fresh subprocess (peak RSS is its own), with scripts/benchlib.py's harness:
- jaxft        jaxft's DPO step (make_loss + make_train_step), the reference = the adapter switched off in
               the same weights, computed in the step (dpo.reference=lora_base)
- jaxft-cache  the same with the reference log-probs computed once before the steps (dpo.reference=cache):
               the step runs no reference forward
- jaxft-sft    jaxft's SFT step on 2*batch rows of S tokens (bench_sft's worker): the memory baseline
- trl          TRL's DPOTrainer with a PEFT LoRA (reference = adapter disabled, TRL's default with PEFT), the
               same token ids (pre-tokenized, TRL's own collator), timed per optimizer step with a callback
tokens/s = 2 * batch * S / step time (chosen and rejected tokens of the policy forward).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import bench_sft
from benchlib import (LORA_TARGETS, RssSampler, add_side_args, add_training_args, in_order, noise_lines, peak_rss_gb,
                      ratio_lines, rss_gb, run_sides, run_steps, serve_worker, step_stats, table,
                      trainer_step_times, write_json)

NAMES = {"jaxft": "jaxft DPO", "cache": "jaxft DPO+cache", "sft": "jaxft SFT 2xB", "trl": "TRL DPO+PEFT"}


def pair_ids(args):
    """n = warmup + steps batches of `batch` (prompt, chosen, rejected) seeded random token id lists."""
    import numpy as np

    from jaxft.example import example_model
    from jaxft.formats.hf import load_tokenizer

    eos = load_tokenizer(example_model()).eos_token_id
    rng = np.random.default_rng(args.seed)
    n = (args.warmup + args.steps) * args.batch

    def ids(k):
        return rng.integers(3, args.vocab, size=k).tolist()

    return [(ids(args.prompt), ids(args.completion - 1) + [eos], ids(args.completion - 1) + [eos]) for _ in range(n)]


def worker_jaxft(args, cache: bool) -> dict:
    import jax
    import numpy as np

    from jaxft.formats.hf import load_pretrained
    from jaxft import adapters
    from jaxft.config import DpoConfig, LoraConfig, OptimConfig
    from jaxft.data.encode import Example
    from jaxft.objectives.dpo import compute_reference_logps, make_loss
    from jaxft.example import example_model
    from jaxft.data.pairs import PairBatches, PairExample
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    t0 = time.perf_counter()
    model = load_pretrained(example_model())
    lcfg = LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0, target_modules=tuple(LORA_TARGETS))
    adapters.attach(model, lcfg, jax.random.key(args.seed))
    graphdef, params, frozen = adapters.split(model, lcfg)
    del model
    t_load, rss_load = time.perf_counter() - t0, rss_gb()

    def side(p, c):
        return Example(np.asarray(p + c, np.int32), np.asarray([False] * len(p) + [True] * len(c)))

    pairs = [PairExample(side(p, c), side(p, r)) for p, c, r in pair_ids(args)]
    S = args.prompt + args.completion
    t_ref = 0.0
    ref = None
    if cache:  # dpo.reference=cache: computed once, before training (jaxft.objectives.dpo.cached_reference)
        t1 = time.perf_counter()
        ref = compute_reference_logps(graphdef, params, frozen, pairs, args.batch, S)
        t_ref = time.perf_counter() - t1
    batches = PairBatches(pairs, args.batch, S, seed=args.seed, ref_logps=ref)

    ocfg = OptimConfig(lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=None)
    total = args.warmup + args.steps
    tx = make_optimizer(ocfg, total, params)
    state = init_state(params, tx)
    del params
    step_fn = make_train_step(graphdef, tx, make_loss(DpoConfig(beta=args.beta)), seed=args.seed)
    n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    t1 = time.perf_counter()  # compiled ahead of time, as in bench_sft: compile time on its own
    step_fn = step_fn.lower(state, frozen, {k: v[None] for k, v in batches.in_order(0).items()}).compile()
    compile_s = time.perf_counter() - t1

    logps = []

    def step(i):
        nonlocal state
        state, metrics = step_fn(state, frozen, {k: v[None] for k, v in batches.in_order(i).items()})
        metrics = jax.block_until_ready(metrics)
        assert int(metrics["targets"]) == args.batch and bool(metrics["finite"])
        logps.append(float(metrics["logps/chosen"]))
        return float(metrics["loss"])

    with RssSampler() as sampler:
        times, losses = run_steps(step, range(total), args.warmup)
    return dict(framework=NAMES["cache" if cache else "jaxft"], version=f"jax {jax.__version__}",
                threads=os.cpu_count(), n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load,
                reference_s=t_ref, compile_s=compile_s, times=times, losses=losses, logps_chosen=logps, train_peak_rss_gb=sampler.peak,
                peak_rss_gb=peak_rss_gb())


def worker_sft(args) -> dict:
    """bench_sft's jaxft worker on 2*batch rows of prompt + completion tokens."""
    sft_args = argparse.Namespace(mode="lora", dtype="fp32", remat="proj", rank=args.rank, alpha=args.alpha,
                                  seed=args.seed, warmup=args.warmup, steps=args.steps, lr=args.lr,
                                  batch=2 * args.batch, seq=args.prompt + args.completion, vocab=args.vocab,
                                  quant="none", xla_memory=False, attention="auto")
    return dict(bench_sft.worker_jaxft(sft_args), framework=NAMES["sft"], reference_s=0.0)


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from jaxft.example import example_model

    class Pretokenized(in_order(DPOTrainer)):
        def _prepare_dataset(self, dataset, *a, **k):  # the ids are given: skip TRL's tokenization
            return dataset

    path = example_model()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantized to fp32 on load: a plain model to Trainer
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.pad_token = tok.pad_token or tok.eos_token
    t_load, rss_load = time.perf_counter() - t0, rss_gb()
    rows = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in pair_ids(args)]
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                        max_steps=total, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", beta=args.beta,
                        loss_type=["sigmoid"], max_length=None, logging_steps=1, save_strategy="no",
                        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=args.seed,
                        remove_unused_columns=False, disable_tqdm=True, gradient_checkpointing=False)
        timer = trainer_step_times(args.warmup)
        trainer = Pretokenized(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS, bias="none",
                                                      task_type="CAUSAL_LM"),
                               callbacks=[timer])
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        with RssSampler() as sampler:
            trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    logps = [float(h["logps/chosen"]) for h in trainer.state.log_history if "logps/chosen" in h]
    return dict(framework=NAMES["trl"], version=f"torch {torch.__version__}", threads=torch.get_num_threads(),
                n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load, reference_s=0.0,
                times=timer.times, losses=losses, logps_chosen=logps, train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


SIDES = {"jaxft": lambda args: worker_jaxft(args, False), "cache": lambda args: worker_jaxft(args, True),
         "sft": worker_sft, "trl": worker_trl}


def summarize(r: dict, args) -> dict:
    return step_stats(r, args.warmup, 2 * args.batch * (args.prompt + args.completion))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    add_training_args(ap)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=49152, help="random token ids are drawn below this")
    add_side_args(ap, SIDES)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.completion < 2:
        ap.error("--warmup and --steps must be >= 1, --completion >= 2")
    if serve_worker(args, SIDES):
        return
    busy, results = run_sides(args, SIDES, summarize, __file__)

    S = args.prompt + args.completion
    print(f"\nDPO training, SmolLM2-135M-Instruct fp32: LoRA r={args.rank} alpha={args.alpha:g} on "
          f"q,k,v,o,gate,up,down, sigmoid beta {args.beta:g}, {args.batch} pairs x (prompt {args.prompt} + "
          f"completion {args.completion}) = {2 * args.batch} x {S} tokens per step, AdamW lr {args.lr:g}, "
          f"{args.warmup} warmup + {args.steps} timed steps; cores {os.cpu_count()}")
    print("\n".join(table([("side", "<16", "framework"), ("tokens/s med", ">12.1f", "tokens_per_s_median"),
                          ("step s med", ">10.2f", "step_s_median"), ("peak RSS GB", ">11.2f", "peak_rss_gb"),
                          ("train RSS GB", ">12.2f", "train_peak_rss_gb"), ("first step s", ">12.2f", "first_step_s"),
                          ("ref pass s", ">10.2f", "reference_s"), ("trainable", ">10,", "n_trainable"),
                          ("loss 1st", ">8.4f", lambda r: r["losses"][0]),
                          ("logps/chosen 1st", ">16.4f", lambda r: r.get("logps_chosen", [float("nan")])[0])],
                         results.values())))
    print("(loss 1st: DPO starts at ln 2 = 0.6931 on both sides; SFT's is a cross-entropy; logps/chosen 1st: the "
          "first batch's summed chosen log-prob, the same pairs on every side; ref pass: the cache's one reference "
          "pass over these pairs, before training)")
    print("\n".join(noise_lines(results.values())))
    ratios = {}
    if "jaxft" in results and "trl" in results:
        j, t = results["jaxft"], results["trl"]
        ratios["jaxft/trl throughput"] = j["tokens_per_s_median"] / t["tokens_per_s_median"]
        ratios["jaxft/trl peak RSS"] = j["peak_rss_gb"] / t["peak_rss_gb"]
    if "jaxft" in results and "sft" in results:
        ratios["DPO(lora_base)/SFT(2xB) train RSS"] = (results["jaxft"]["train_peak_rss_gb"]
                                                     / results["sft"]["train_peak_rss_gb"])
    for line in ratio_lines(ratios):
        print(line)
    write_json(args.json, settings=vars(args), busy=busy, results=results, ratios=ratios)


if __name__ == "__main__":
    main()
