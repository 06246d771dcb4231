"""SFT training throughput and peak memory: jaxft next to transformers + PEFT, same settings, one run.

    python scripts/bench_sft.py [--mode lora|full] [--dtype fp32|bf16] [--batch 4] [--seq 256]
                                [--steps 5] [--warmup 2] [--rank 16] [--alpha 32] [--lr 1e-4]
                                [--remat none|proj|dots|full] [--attention auto|xla|blockwise]
                                [--json OUT]

Model: the embedded example SmolLM2-135M-Instruct GGUF, loaded to fp32 by both. Batch: --batch rows
of --seq real tokens (seeded random ids, no padding, one document per row), loss on every next
token (S-1 targets per row), grad accumulation 1. Optimizer: AdamW, constant lr, no weight decay,
no clipping. LoRA (default): r, alpha, dropout 0 on q,k,v,o,gate,up,down of every layer; full: every
weight trainable (PyTorch without PEFT). bf16: jaxft computes in bf16 (LoRA: bf16 base weights,
fp32 factors; full: fp32 master weights) next to PyTorch fp32 weights under bf16 autocast.

jaxft runs its real training path (lora.attach → lora.split → make_optimizer → init_state →
make_train_step, the jitted donated step) on [1, B, S] batches; PyTorch runs a plain
`loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()` loop.
Each framework runs in its own fresh subprocess (this file with --worker), one after the other,
so its peak RSS (ru_maxrss) is its own. jaxft's step is compiled ahead of time first ("compile s"),
then --warmup untimed steps run, then --steps timed steps; tokens/s = B*S / step time
(median and mean over the timed steps).
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import (LORA_TARGETS, NOISY, NOISY_SHARE, RssSampler, add_side_args, add_training_args, others_share,
                      peak_rss_gb, rss_gb, run_sides, run_steps, serve_worker, step_stats, table, write_json)


# ----------------------------------------------------------------------------------------------
# the batches both workers train on


def token_batches(n: int, batch: int, seq: int, vocab: int, seed: int):
    """n [B, S] int arrays of seeded random token ids (the same for both frameworks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(batch, seq), dtype=np.int64) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# the jaxft worker


def worker_jaxft(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxft.formats.hf import load_pretrained
    from jaxft import adapters
    from jaxft.config import LoraConfig, OptimConfig, QuantConfig
    from jaxft.example import example_model
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    path = example_model()
    t0 = time.perf_counter()
    # as jaxft.train.build_model does: LoRA stores the base in the compute dtype, full FT keeps fp32 masters
    compute = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    param_dtype = compute if args.mode == "lora" else jnp.float32
    quant = QuantConfig(base=args.quant)  # bench_qlora.py: NF4 / int8 base (QLoRA)
    model = load_pretrained(path, dtype=param_dtype, compute_dtype=compute, remat=args.remat, quant=quant,
                            attention=args.attention)
    method = getattr(args, "method", "lora")  # bench_peft_methods.py: dora | pissa | olora | ia3
    lcfg = LoraConfig(enabled=args.mode == "lora", r=args.rank, alpha=args.alpha, dropout=0.0,
                      target_modules=("all-linear",) if method == "ia3" else tuple(LORA_TARGETS),
                      use_dora=method == "dora", init=method if method in ("pissa", "olora") else "kaiming",
                      method="ia3" if method == "ia3" else "lora")
    if lcfg.enabled:
        adapters.attach(model, lcfg, jax.random.key(args.seed))
    graphdef, params, frozen = adapters.split(model, lcfg)
    del model
    jax.block_until_ready((params, frozen))
    t_load = time.perf_counter() - t0
    rss_load = rss_gb()

    total = args.warmup + args.steps
    ocfg = OptimConfig(lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=None)
    tx = make_optimizer(ocfg, total, params)
    state = init_state(params, tx)
    del params  # donated with the state on the first step
    step_fn = make_train_step(graphdef, tx, seed=args.seed, dropout=False)
    n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))

    B, S = args.batch, args.seq
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    loss_mask = np.ones((B, S), np.float32)
    loss_mask[:, -1] = 0.0  # the last token has no target

    def to_batch(ids):  # [B, S] → the [A=1, B, S] micro-batch dict of jaxft.data.encode.Batches
        tokens = ids.astype(np.int32)
        targets = np.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        b = dict(tokens=tokens, positions=positions, segment_ids=np.ones_like(tokens), targets=targets,
                 loss_mask=loss_mask)
        return {k: np.ascontiguousarray(v)[None] for k, v in b.items()}

    batches = [to_batch(ids) for ids in token_batches(total, B, S, args.vocab, args.seed)]

    t0 = time.perf_counter()  # compile ahead of time, so compile time is reported on its own
    step_fn = step_fn.lower(state, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    def step(batch):
        nonlocal state
        state, metrics = step_fn(state, frozen, batch)
        metrics = jax.block_until_ready(metrics)
        assert int(metrics["targets"]) == B * (S - 1) and bool(metrics["finite"])
        return float(metrics["loss"])

    with RssSampler() as sampler:
        times, losses = run_steps(step, batches, args.warmup)
    extra = {}
    if args.xla_memory:  # after timing: what XLA allocates for the step, and the weights on the device
        size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
        ma = step_fn.memory_analysis()  # step_fn is the ahead-of-time compiled step
        extra = dict(frozen_gb=size(frozen) / 1e9, state_gb=size(state) / 1e9,
                     xla_temp_gb=getattr(ma, "temp_size_in_bytes", float("nan")) / 1e9)
    return dict(framework="jaxft", version=f"jax {jax.__version__} ({jax.default_backend()})",
                threads=os.cpu_count(), n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load,
                compile_s=compile_s, times=times, losses=losses, train_peak_rss_gb=sampler.peak,
                peak_rss_gb=peak_rss_gb(), **extra)


# ----------------------------------------------------------------------------------------------
# the transformers (+ PEFT) worker


def worker_torch(args) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from jaxft.example import example_model

    path = example_model()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.quant == "nf4":  # bench_qlora.py: bitsandbytes NF4 + double quant (QLoRA), from an HF copy of the GGUF
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, quantization_config=bnb, dtype=torch.float32,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    method = getattr(args, "method", "lora")
    if args.mode == "lora" and method == "ia3":  # PEFT's IA3 defaults for Llama: k, v, down (input-scaled)
        from peft import IA3Config, get_peft_model

        model = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    elif args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        init = method if method in ("pissa", "olora") else True
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM",
                                                 use_dora=method == "dora", init_lora_weights=init))
    model.train()
    t_load = time.perf_counter() - t0
    rss_load = rss_gb()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" \
        else contextlib.nullcontext

    total = args.warmup + args.steps
    batches = [torch.from_numpy(ids) for ids in token_batches(total, args.batch, args.seq, args.vocab, args.seed)]

    def step(ids):
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    with RssSampler() as sampler:
        times, losses = run_steps(step, batches, args.warmup)
    return dict(framework="PyTorch" + ("+PEFT" if args.mode == "lora" else "") + ("+bnb" if args.quant == "nf4" else ""),
                version=f"torch {torch.__version__}", threads=torch.get_num_threads(),
                n_trainable=int(n_trainable), load_s=t_load, rss_load_gb=rss_load, times=times,
                losses=losses, train_peak_rss_gb=sampler.peak, peak_rss_gb=peak_rss_gb())


# ----------------------------------------------------------------------------------------------
# the driver


SIDES = {"jaxft": worker_jaxft, "torch": worker_torch}


def summarize(r: dict, args) -> dict:
    return step_stats(r, args.warmup, args.batch * args.seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    add_training_args(ap)
    ap.add_argument("--remat", choices=["none", "proj", "dots", "full"], default="proj", help="jaxft only")
    ap.add_argument("--attention", choices=["auto", "xla", "blockwise", "cudnn", "splash"], default="auto",
                    help="jaxft's model.attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=49152, help="random token ids are drawn below this")
    add_side_args(ap, SIDES, repeat=False)
    ap.add_argument("--quant", choices=["none", "nf4", "int8"], default="none",
                    help="quantized frozen base (QLoRA); torch: nf4 only, via bitsandbytes (see bench_qlora.py)")
    ap.add_argument("--method", choices=["lora", "dora", "pissa", "olora", "ia3"], default="lora",
                    help="the PEFT method, both sides (bench_peft_methods.py runs each)")
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)  # torch + bitsandbytes loads this HF copy of the GGUF
    ap.add_argument("--xla-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if serve_worker(args, SIDES):
        return
    busy, results = run_sides(args, SIDES, summarize, __file__)
    results = list(results.values())

    from jaxft.example import example_model

    lora_s = f"LoRA r={args.rank} alpha={args.alpha:g} on q,k,v,o,gate,up,down" if args.mode == "lora" else "full FT"
    setting = (f"{lora_s} "
               f"{args.dtype}, batch {args.batch} x seq {args.seq} (all real tokens), AdamW lr {args.lr:g}, "
               f"{args.warmup} warmup + {args.steps} timed steps")
    print(f"\nSFT training, {example_model().name}: {setting}")
    print(f"cores: {os.cpu_count()}  " + "  ".join(f"{r['version']} (threads {r['threads']})" for r in results))
    print("\n".join(table([("framework", "<13", "framework"), ("tokens/s med", ">12.1f", "tokens_per_s_median"),
                          ("tokens/s mean", ">13.1f", "tokens_per_s_mean"), ("step s med", ">10.2f", "step_s_median"),
                          ("peak RSS GB", ">11.2f", "peak_rss_gb"), ("train RSS GB", ">12.2f", "train_peak_rss_gb"),
                          ("RSS after load", ">14.2f", "rss_load_gb"),
                          ("compile s", ">9.2f", lambda r: r.get("compile_s", float("nan"))),
                          ("trainable", ">11,", "n_trainable"), ("loss 1st", ">8.4f", lambda r: r["losses"][0])],
                         results)))
    print("(compile s = jaxft's ahead-of-time compile of the step; train RSS = highest RSS sampled during the steps; "
          "loss 1st = the first step's loss, before any update)")
    for r in results:  # the machine is shared: say how much CPU everything else took meanwhile
        print(f"{r['framework']}: worker {r['wall_s']:.0f} s wall, {r['own_cpu_s']:.0f} CPU s; other processes "
              f"{r['others_cpu_s']:.0f} CPU s ({100 * others_share(r):.0f}% of the machine)"
              + (NOISY if others_share(r) > NOISY_SHARE else ""))
    ratios = {}
    if len(results) == 2:
        j, t = results
        ratios = dict(throughput=j["tokens_per_s_median"] / t["tokens_per_s_median"],
                      peak_rss=j["peak_rss_gb"] / t["peak_rss_gb"],
                      train_rss=j["train_peak_rss_gb"] / t["train_peak_rss_gb"])
        print(f"jaxft / {t['framework']}: throughput {ratios['throughput']:.2f}x (median tokens/s), "
              f"peak RSS {ratios['peak_rss']:.2f}x, train-phase RSS {ratios['train_rss']:.2f}x")
    if busy:
        print(f"note: other busy processes at start: {'; '.join(busy)}")
    write_json(args.json, settings=vars(args), cores=os.cpu_count(), busy=busy, results=results, ratios=ratios)


if __name__ == "__main__":
    main()
