"""Training tokens/s and peak memory of each PEFT method in jaxft next to PEFT's same method, one run.

    python scripts/bench_peft_methods.py [--methods lora,dora,pissa,ia3] [--batch 4] [--seq 256]
                                         [--steps 5] [--warmup 2] [--rank 16] [--alpha 32] [--json OUT]

Every side is scripts/bench_sft.py's worker (`--method M`) in its own fresh process, one after the
other: the example SmolLM2-135M-Instruct in fp32, --batch rows of --seq real random tokens, AdamW at
a constant lr, dropout 0 (bench_sft.py's docstring has the details). LoRA, DoRA and PiSSA: r, alpha on
q,k,v,o,gate,up,down; IA3: PEFT's Llama default (k_proj, v_proj scaled on their output, down_proj on
its input). PiSSA's SVD runs at load (its time is in "load s", not in the step).
"""

from __future__ import annotations

import argparse
import os

import bench_sft
from benchlib import NOISY_SHARE, add_training_args, others_share, run_worker, training_argv, warn_busy, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="lora,dora,pissa,ia3")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    add_training_args(ap)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    busy = warn_busy()
    common = ["--batch", str(args.batch), "--seq", str(args.seq), *training_argv(args)]
    ns = argparse.Namespace(batch=args.batch, seq=args.seq, warmup=args.warmup)
    rows = []
    for method in args.methods.split(","):
        pair = [bench_sft.summarize(run_worker(side, [*common, "--method", method], bench_sft.__file__,
                                               label=f"{method} {side}"), ns)
                for side in ("jaxft", "torch")]
        rows.append((method, *pair))
    print(f"\nSmolLM2-135M-Instruct fp32, batch {args.batch} x {args.seq} tokens, r={args.rank} alpha={args.alpha:g}, "
          f"{args.warmup} warmup + {args.steps} timed steps, {os.cpu_count()} cores")
    print("| method | trainable | jaxft tok/s | PEFT tok/s | ratio | jaxft peak RSS | PEFT peak RSS | memory | "
          "jaxft compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, j, t in rows:
        print(f"| {method} | {j['n_trainable']:,} | {j['tokens_per_s_median']:.1f} | {t['tokens_per_s_median']:.1f} | "
              f"{j['tokens_per_s_median'] / t['tokens_per_s_median']:.2f}x | {j['peak_rss_gb']:.2f} GB | "
              f"{t['peak_rss_gb']:.2f} GB | {j['peak_rss_gb'] / t['peak_rss_gb']:.2f}x | {j['compile_s']:.1f} |")
        if j["n_trainable"] != t["n_trainable"]:
            print(f"  note: {method}: trainable parameters differ (jaxft {j['n_trainable']:,}, "
                  f"PEFT {t['n_trainable']:,})")
    for method, j, t in rows:
        for r in (j, t):
            if others_share(r) > NOISY_SHARE:
                print(f"{method} {r['framework']}: other processes took {100 * others_share(r):.0f}% of the machine: "
                      "NOISY")
    write_json(args.json, settings=vars(args), busy=busy, rows=rows)


if __name__ == "__main__":
    main()
