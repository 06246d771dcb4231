"""Reward-model training throughput and peak memory: jaxft next to TRL's RewardTrainer + PEFT, same pairs and
settings, one run.

    python scripts/bench_reward.py [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--rank 16] [--alpha 32]
                                   [--lr 1e-4] [--only jaxft|trl] [--json OUT]

Model: the embedded example SmolLM2-135M-Instruct GGUF, fp32 on both sides, with a new scalar `score` head
(jaxft: ScoreModel; TRL: AutoModelForSequenceClassification, num_labels 1). Data: --batch pairs per step,
chosen and rejected each --seq seeded random token ids (no pad / EOS id inside, so no padding and the score
is read at the last token on both sides). Loss: −log σ(r_c − r_r), no margin, no centering. LoRA r / alpha,
dropout 0, on q,k,v,o,gate,up,down, the head trained in full (PEFT SEQ_CLS: modules_to_save score); AdamW,
constant lr, no weight decay, no clipping; gradient accumulation 1. TRL: gradient checkpointing off (its
default is on), dropout off (its default). jaxft: its default remat policy ("proj").

Each side runs in its own fresh subprocess (peak RSS is its own), with scripts/benchlib.py's harness;
jaxft's step is compiled ahead of time ("compile s"), then --warmup untimed and --steps timed steps.
tokens/s = 2 * batch * seq / step time (chosen and rejected tokens of the one forward pass).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchlib import (LORA_TARGETS, RssSampler, add_side_args, add_training_args, in_order, noise_lines, peak_rss_gb,
                      ratio_lines, rss_gb, run_sides, run_steps, serve_worker, step_stats, table,
                      trainer_step_times, write_json)

NAMES = {"jaxft": "jaxft reward", "trl": "TRL Reward+PEFT"}


def pair_ids(args) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) seeded random id lists for warmup + steps batches; ids ≥ 3 (no BOS / EOS / pad)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n = (args.warmup + args.steps) * args.batch
    return [(rng.integers(3, args.vocab, args.seq).tolist(), rng.integers(3, args.vocab, args.seq).tolist())
            for _ in range(n)]


def worker_jaxft(args) -> dict:
    import jax
    import numpy as np

    from jaxft.formats.hf import load_pretrained
    from jaxft import adapters
    from jaxft.config import LoraConfig, OptimConfig, RewardConfig
    from jaxft.data.encode import Example
    from jaxft.example import example_model
    from jaxft.formats.hf import load_tokenizer
    from jaxft.objectives.reward_model import make_loss
    from jaxft.data.pairs import PairBatches, PairExample
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    t0 = time.perf_counter()
    tok = load_tokenizer(example_model())
    model = load_pretrained(example_model(), head="score", pad_token_id=tok.pad_token_id, seed=args.seed)
    lcfg = LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0, target_modules=tuple(LORA_TARGETS))
    adapters.attach(model, lcfg, jax.random.key(args.seed))
    graphdef, params, frozen = adapters.split(model, lcfg)  # LoRA factors + the score head
    del model
    t_load, rss_load = time.perf_counter() - t0, rss_gb()

    def side(ids):
        return Example(np.asarray(ids, np.int32), np.ones(len(ids), bool))

    batches = PairBatches([PairExample(side(c), side(r)) for c, r in pair_ids(args)], args.batch, args.seq,
                          seed=args.seed)
    ocfg = OptimConfig(lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=None)
    total = args.warmup + args.steps
    tx = make_optimizer(ocfg, total, params)
    state = init_state(params, tx)
    del params
    step_fn = make_train_step(graphdef, tx, make_loss(RewardConfig()), seed=args.seed)
    n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    t1 = time.perf_counter()
    step_fn = step_fn.lower(state, frozen, {k: v[None] for k, v in batches.in_order(0).items()}).compile()
    compile_s = time.perf_counter() - t1
    accuracy = []

    def step(i):
        nonlocal state
        state, metrics = step_fn(state, frozen, {k: v[None] for k, v in batches.in_order(i).items()})
        metrics = jax.block_until_ready(metrics)
        assert int(metrics["targets"]) == args.batch and bool(metrics["finite"])
        accuracy.append(float(metrics["accuracy"]))
        return float(metrics["loss"])

    with RssSampler() as sampler:
        times, losses = run_steps(step, range(total), args.warmup)
    return dict(framework=NAMES["jaxft"], version=f"jax {jax.__version__}", threads=os.cpu_count(),
                n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load, compile_s=compile_s, times=times,
                losses=losses, accuracy=accuracy, train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from jaxft.example import example_model

    path = example_model()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(path.parent, gguf_file=path.name, num_labels=1,
                                                               dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantized to fp32 on load: a plain model to Trainer
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    t_load, rss_load = time.perf_counter() - t0, rss_gb()
    rows = [dict(chosen_ids=c, rejected_ids=r) for c, r in pair_ids(args)]  # pre-tokenized: TRL skips tokenizing
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = RewardConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                           max_steps=total, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                           weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", max_length=None,
                           logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                           dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, gradient_checkpointing=False)
        timer = trainer_step_times(args.warmup)
        trainer = in_order(RewardTrainer)(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, bias="none", task_type="SEQ_CLS"),
                          callbacks=[timer])
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        with RssSampler() as sampler:
            trainer.train()
    hist = trainer.state.log_history
    return dict(framework=NAMES["trl"], version=f"torch {torch.__version__}", threads=torch.get_num_threads(),
                n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load, compile_s=0.0, times=timer.times,
                losses=[float(h["loss"]) for h in hist if "loss" in h],
                accuracy=[float(h["accuracy"]) for h in hist if "accuracy" in h],
                train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


SIDES = {"jaxft": worker_jaxft, "trl": worker_trl}


def summarize(r: dict, args) -> dict:
    return step_stats(r, args.warmup, 2 * args.batch * args.seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per chosen / rejected sequence")
    add_training_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=49152, help="random token ids are drawn below this")
    add_side_args(ap, SIDES)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if serve_worker(args, SIDES):
        return
    busy, results = run_sides(args, SIDES, summarize, __file__)

    print(f"\nReward-model training, SmolLM2-135M-Instruct fp32 + score head: LoRA r={args.rank} alpha={args.alpha:g} "
          f"on q,k,v,o,gate,up,down + the head in full, {args.batch} pairs x 2 x {args.seq} tokens per step, "
          f"AdamW lr {args.lr:g}, {args.warmup} warmup + {args.steps} timed steps; cores {os.cpu_count()}")
    print("\n".join(table([("side", "<16", "framework"), ("tokens/s med", ">12.1f", "tokens_per_s_median"),
                          ("step s med", ">10.2f", "step_s_median"), ("peak RSS GB", ">11.2f", "peak_rss_gb"),
                          ("train RSS GB", ">12.2f", "train_peak_rss_gb"), ("first step s", ">12.2f", "first_step_s"),
                          ("compile s", ">9.1f", "compile_s"), ("trainable", ">10,", "n_trainable"),
                          ("loss 1st", ">8.4f", lambda r: r["losses"][0])], results.values())))
    print("\n".join(noise_lines(results.values())))
    ratios = {}
    if len(results) == 2:
        j, t = results["jaxft"], results["trl"]
        ratios = {"jaxft/trl throughput": j["tokens_per_s_median"] / t["tokens_per_s_median"],
                  "jaxft/trl peak RSS": j["peak_rss_gb"] / t["peak_rss_gb"]}
    for line in ratio_lines(ratios):
        print(line)
    write_json(args.json, settings=vars(args), busy=busy, results=results, ratios=ratios)


if __name__ == "__main__":
    main()
