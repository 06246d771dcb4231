"""The performance benchmark: jaxft next to transformers + PEFT on this machine, with MFU, in one run.

    python scripts/bench.py [--settings lora,full,bf16] [--steps 5] [--warmup 2] [--batch 4] [--seq 256]

1. Measures this machine's matmul ceiling with XLA (fp32, and bf16 inputs with fp32 accumulation):
   the best GFLOP/s over a few large GEMM shapes, in a fresh subprocess.
2. Runs scripts/bench_sft.py (each framework in its own fresh subprocess) for every setting:
   lora = LoRA r=16 on q,k,v,o,gate,up,down, fp32; full = full fine-tuning, fp32; bf16 = LoRA with
   bf16 compute (PyTorch: bf16 autocast); dpo = sigmoid DPO with LoRA, the reference = the adapter
   switched off, next to TRL's DPOTrainer + PEFT (scripts/bench_dpo.py: batch pairs of a seq/2 prompt
   and seq/2 completions, i.e. 2 x batch rows of seq). Model: the example SmolLM2-135M-Instruct, batch 4 x 256.
3. Prints tokens/s of both, their ratio, jaxft's MFU, peak host RSS of both and their ratio, and
   jaxft's first-step compile time, next to the issue's targets.

MFU = model FLOPs per token x jaxft tokens/s / ceiling (same dtype, same run). Model FLOPs per token
(printed with the figures): P = matmul weights (every q,k,v,o,gate,up,down of every layer, plus
the LM head), A = 12 · L · S · N · H (attention scores and values, forward + backward, full S x S);
full fine-tuning: 6 · P + A; LoRA: 4 · P (forward + input gradients; no weight gradients for the
frozen base) + 6 · P_lora + A.
"""

from __future__ import annotations

import argparse
import os

import bench_dpo  # the DPO workers
import bench_sft  # the SFT workers
from benchlib import NOISY_SHARE, others_share, run_worker, serve_worker, table, timed, warn_busy, write_json

SETTINGS = {  # name → (script, its arguments, the two sides, dtype of the ceiling that applies)
    "lora": ("bench_sft.py", ["--mode", "lora", "--dtype", "fp32"], ("jaxft", "torch"), "fp32"),
    "full": ("bench_sft.py", ["--mode", "full", "--dtype", "fp32"], ("jaxft", "torch"), "fp32"),
    "bf16": ("bench_sft.py", ["--mode", "lora", "--dtype", "bf16"], ("jaxft", "torch"), "bf16"),
    "dpo": ("bench_dpo.py", [], ("jaxft", "trl"), "fp32"),
}
TARGETS = "fp32 LoRA targets: >= 2.0x PyTorch tokens/s, MFU >= 55%, peak RSS <= 0.75x PyTorch, compile <= 30 s"
GEMMS = [(2048, 2048, 2048), (4096, 1024, 4096), (1024, 576, 1536)]  # (M, K, N); the last = a SmolLM2 MLP GEMM


def ceiling(_args=None) -> dict:
    """Best GFLOP/s of an XLA GEMM, fp32 and bf16 x bf16 → fp32, over GEMMS (median of 7 per shape)."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        best = {}
        for m, k, n in GEMMS:
            a = jax.random.normal(jax.random.key(0), (m, k)).astype(dt)
            b = jax.random.normal(jax.random.key(1), (k, n)).astype(dt)
            f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
            jax.block_until_ready(f(a, b))
            t, _ = timed(lambda: jax.block_until_ready(f(a, b)), 7)
            best[f"{m}x{k}x{n}"] = 2 * m * k * n / t / 1e9
        out[name] = dict(gflops=max(best.values()), shapes=best)
    return out


def flops_per_token(mode: str, seq: int, rank: int) -> tuple[float, str]:
    """Model FLOPs per trained token for the example model, and the formula with its numbers."""
    from jaxft.formats.hf import open_checkpoint
    from jaxft.example import example_model

    _, c = open_checkpoint(example_model())
    D, F, L, N, K, H = c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
    shapes = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D)]
    P = L * sum(i * o for i, o in shapes) + D * c.vocab_size  # + LM head
    P_lora = L * sum(rank * (i + o) for i, o in shapes)
    A = 12 * L * seq * N * H
    if mode == "full":
        return 6 * P + A, f"6*P + A = 6*{P / 1e6:.1f}M + {A / 1e6:.1f}M"
    if mode == "dpo":  # the policy's LoRA step + the reference's forward (2*P + A/3), per policy token
        return 6 * P + 6 * P_lora + A + A // 3, (f"(4*P + 6*P_lora + A) + (2*P + A/3) = 6*{P / 1e6:.1f}M + "
                                                  f"6*{P_lora / 1e6:.2f}M + {A / 1e6:.1f}M + {A / 3e6:.1f}M")
    return 4 * P + 6 * P_lora + A, f"4*P + 6*P_lora + A = 4*{P / 1e6:.1f}M + 6*{P_lora / 1e6:.2f}M + {A / 1e6:.1f}M"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="lora,full,bf16,dpo", help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--worker", choices=["ceiling"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if serve_worker(args, {"ceiling": ceiling}):
        return
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown {unknown[0]!r} (known: {', '.join(SETTINGS)})")

    busy = warn_busy()
    ceil = run_worker("ceiling", [], __file__)

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank)]
    sft_shape = ["--batch", str(args.batch), "--seq", str(args.seq)]
    half = str(args.seq // 2)  # DPO: batch pairs of a seq/2 prompt + seq/2 completions = 2*batch rows of seq
    dpo_shape = ["--batch", str(args.batch), "--prompt", half, "--completion", half]
    rows = []
    for name in names:
        script, extra, sides, dt = SETTINGS[name]
        mod, shape = (bench_dpo, dpo_shape) if script == "bench_dpo.py" else (bench_sft, sft_shape)
        sub = argparse.Namespace(warmup=args.warmup, batch=args.batch, seq=args.seq, prompt=args.seq // 2,
                                 completion=args.seq // 2)
        j, t = (mod.summarize(run_worker(side, extra + common + shape, mod.__file__), sub) for side in sides)
        mode = {"full": "full", "dpo": "dpo"}.get(name, "lora")
        fpt, formula = flops_per_token(mode, args.seq, args.rank)
        mfu = fpt * j["tokens_per_s_median"] / (ceil[dt]["gflops"] * 1e9)
        rows.append(dict(setting=name, jaxft=j, torch=t, flops_per_token=fpt, formula=formula, mfu=mfu,
                         ceiling_dtype=dt))

    print(f"\nmatmul ceiling (XLA, best of {', '.join(ceil['fp32']['shapes'])}): fp32 {ceil['fp32']['gflops']:.0f} "
          f"GFLOP/s, bf16 x bf16 -> fp32 {ceil['bf16']['gflops']:.0f} GFLOP/s")
    for dt in ("fp32", "bf16"):
        print(f"  {dt}: " + ", ".join(f"{s} {g:.0f}" for s, g in ceil[dt]["shapes"].items()))
    print(f"example SmolLM2-135M, batch {args.batch} x seq {args.seq}, AdamW, {args.warmup} warmup + "
          f"{args.steps} timed steps, medians; cores: {os.cpu_count()}")
    print("\n".join(table([
        ("setting", "<8", "setting"), ("jaxft tok/s", ">11.1f", lambda r: r["jaxft"]["tokens_per_s_median"]),
        ("PyTorch tok/s", ">13.1f", lambda r: r["torch"]["tokens_per_s_median"]),
        ("ratio", ">6", lambda r: f"{r['jaxft']['tokens_per_s_median'] / r['torch']['tokens_per_s_median']:.2f}x"),
        ("MFU", ">6", lambda r: f"{100 * r['mfu']:.1f}%"),
        ("jaxft RSS GB", ">12.2f", lambda r: r["jaxft"]["peak_rss_gb"]),
        ("PyTorch RSS GB", ">14.2f", lambda r: r["torch"]["peak_rss_gb"]),
        ("RSS ratio", ">9", lambda r: f"{r['jaxft']['peak_rss_gb'] / r['torch']['peak_rss_gb']:.2f}x"),
        ("compile s", ">9.1f", lambda r: r["jaxft"]["compile_s"])], rows)))
    for r in rows:
        print(f"{r['setting']}: model FLOPs/token {r['formula']} = {r['flops_per_token'] / 1e6:.1f} MFLOP; "
              f"MFU against the {r['ceiling_dtype']} ceiling")
    print(TARGETS)
    for r in rows:
        for side in ("jaxft", "torch"):
            if others_share(r[side]) > NOISY_SHARE:
                print(f"NOISY: {r['setting']} {side}: other processes took {100 * others_share(r[side]):.0f}% of "
                      "the machine")
    write_json(args.json, settings=vars(args), ceiling=ceil, rows=rows, busy=busy)


if __name__ == "__main__":
    main()
