"""How training cost grows with the sequence length: jaxft next to transformers + PEFT, one run.

    python scripts/bench_context.py [--seqs 512,1024,2048,4096,8192] [--mode lora] [--rss-budget 20]
                                    [--attention auto] [--steps 2] [--warmup 1] [--full-seq 2048]
                                    [--plot docs/context.png] [--json OUT]

For every sequence length T, batch 1 (one document of T random tokens, loss on every next token), each side
runs scripts/bench_sft.py's worker in its own fresh process, one after the other: the example
SmolLM2-135M-Instruct in fp32, LoRA r 16 (alpha 32) on q,k,v,o,gate,up,down, AdamW; transformers with its
default attention (SDPA). A worker whose RSS passes --rss-budget GB is stopped and that T counts as not
trained within the budget, as does a worker that fails (the kernel's OOM killer); the longest T each side
trains within the budget is printed. Then the same for full fine-tuning at --full-seq (0 skips it).
Prints a table per T (step time, tokens/s, peak RSS, the ratio), the least-squares slope of peak RSS per
1k tokens, and writes a plot of both sides' curves (tokens/s and peak RSS against T).
"""

from __future__ import annotations

import argparse
import os
import sys

from benchlib import (NOISY, NOISY_SHARE, add_training_args, cpu_flags, others_share, run_worker, step_stats, table,
                      training_argv, warn_busy, write_json)

import bench_sft

SIDES = {"jaxft": "jaxft", "PEFT": "torch"}  # the label in the table: bench_sft.py's worker


def sweep(args, seqs: list[int], mode: str) -> list[dict]:
    """One row per (T, side): bench_sft's figures for batch 1 x T, or {"failed": why}."""
    rows = []
    for seq in seqs:
        for label, worker in SIDES.items():
            argv = ["--mode", mode, "--batch", "1", "--seq", str(seq), *training_argv(args)]
            if worker == "jaxft":
                argv += ["--attention", args.attention, "--remat", args.remat]
            r = run_worker(worker, argv, bench_sft.__file__, f"{label} T={seq}", rss_budget_gb=args.rss_budget)
            r = r if "failed" in r else step_stats(r, args.warmup, seq)
            rows.append(dict(r, side=label, seq=seq, mode=mode))
    return rows


def slope_gb_per_1k(rows: list[dict], side: str) -> float:
    """Least-squares slope of peak RSS (GB) against T (per 1k tokens), over the Ts the side trained."""
    pts = [(r["seq"] / 1000, r["peak_rss_gb"]) for r in rows if r["side"] == side and "failed" not in r]
    if len(pts) < 2:
        return float("nan")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def print_rows(rows: list[dict]) -> None:
    fmt = lambda key, spec: lambda r: "failed" if "failed" in r else format(r[key], spec)  # noqa: E731
    print("\n".join(table([("T", ">5", "seq"), ("side", "<5", "side"),
                           ("step s", ">8", fmt("step_s_median", ".2f")),
                           ("tokens/s", ">8", fmt("tokens_per_s_median", ".1f")),
                           ("peak RSS GB", ">11", fmt("peak_rss_gb", ".2f")),
                           ("compile s", ">9", lambda r: format(r.get("compile_s", float("nan")), ".1f")),
                           ("others", ">6", lambda r: "" if "failed" in r else f"{100 * others_share(r):.0f}%")],
                          rows)))
    for r in rows:
        if "failed" in r:
            print(f"T={r['seq']} {r['side']}: {r['failed']}")
        elif others_share(r) > NOISY_SHARE:
            print(f"T={r['seq']} {r['side']}:{NOISY}")
    by = {(r["seq"], r["side"]): r for r in rows if "failed" not in r}
    for seq in sorted({r["seq"] for r in rows}):
        j, p = by.get((seq, "jaxft")), by.get((seq, "PEFT"))
        if j and p:
            print(f"T={seq}: jaxft / PEFT tokens/s {j['tokens_per_s_median'] / p['tokens_per_s_median']:.2f}x, "
                  f"peak RSS {j['peak_rss_gb'] / p['peak_rss_gb']:.2f}x")


def longest(rows: list[dict], side: str) -> int:
    return max((r["seq"] for r in rows if r["side"] == side and "failed" not in r), default=0)


def plot(rows: list[dict], path: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("jaxft", "o-"), ("PEFT", "s--")):
        ok = [r for r in rows if r["side"] == side and "failed" not in r]
        a.plot([r["seq"] for r in ok], [r["tokens_per_s_median"] for r in ok], style, label=side)
        b.plot([r["seq"] for r in ok], [r["peak_rss_gb"] for r in ok], style, label=side)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (batch 1)")
        ax.grid(alpha=0.3)
        ax.legend()
    a.set_ylabel("tokens/s (median step)")
    b.set_ylabel("peak RSS (GB)")
    b.axhline(budget, color="grey", lw=0.8, ls=":")
    fig.suptitle("LoRA r 16 all-linear, SmolLM2-135M fp32: jaxft vs transformers + PEFT (SDPA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--full-seq", type=int, default=2048, help="also full fine-tuning at this T (0: skip)")
    ap.add_argument("--rss-budget", type=float, default=20.0, help="GB; a side passing it at a T did not train it")
    ap.add_argument("--attention", default="auto", help="jaxft's model.attention")
    ap.add_argument("--remat", default="proj", help="jaxft's model.remat")
    ap.add_argument("--plot", default="docs/context.png")
    ap.add_argument("--json", metavar="OUT")
    add_training_args(ap, steps=2, warmup=1)
    args = ap.parse_args()
    seqs = sorted(int(s) for s in args.seqs.split(","))
    busy = warn_busy()
    print(f"cores {os.cpu_count()}, CPU flags: {' '.join(cpu_flags()) or 'none of avx512f / avx512_bf16 / amx'}",
          file=sys.stderr)
    rows = sweep(args, seqs, args.mode)
    full = sweep(args, [args.full_seq], "full") if args.full_seq else []

    print(f"\nbatch 1 x T, {args.mode}, fp32, {args.warmup} warm-up + {args.steps} timed steps (medians); jaxft "
          f"attention={args.attention} remat={args.remat}; RSS budget {args.rss_budget:g} GB")
    print(f"cores {os.cpu_count()}; CPU flags: {' '.join(cpu_flags()) or 'none of avx512f / avx512_bf16 / amx'}")
    print_rows(rows)
    slopes = {side: slope_gb_per_1k(rows, side) for side in SIDES}
    print("peak RSS slope (least squares, GB per 1k tokens): "
          + ", ".join(f"{side} {v:.3f}" for side, v in slopes.items()))
    print("longest T trained within the budget (of those tried): "
          + ", ".join(f"{side} {longest(rows, side)}" for side in SIDES))
    if full:
        print(f"\nfull fine-tuning, batch 1 x {args.full_seq}:")
        print_rows(full)
    if busy:
        print(f"note: other busy processes at start: {'; '.join(busy)}")
    if args.plot:
        plot(rows, args.plot, args.rss_budget)
    write_json(args.json, settings=vars(args), cpu_flags=cpu_flags(), busy=busy, rows=rows, full=full, slopes=slopes)


if __name__ == "__main__":
    main()
