"""QLoRA training: peak memory and tokens/s of LoRA on an NF4 / int8 / full-precision base, next to
PyTorch + PEFT (and PEFT + bitsandbytes NF4), one run; then `jaxft plan`'s figures for Llama 3 8B / 70B.

    python scripts/bench_qlora.py [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--rank 16]
                                  [--dtype fp32|bf16] [--remat none|full|dots] [--sides ...] [--json OUT]

Every side runs scripts/bench_sft.py's worker in its own fresh process, one after the other (same
model, batch, LoRA and AdamW settings as bench_sft.py, whose docstring describes them):

    jaxft-none   LoRA, base in the compute dtype            torch        PyTorch + PEFT, fp32 base
    jaxft-nf4    QLoRA: NF4 + double-quantized scales       torch-bnb    PyTorch + PEFT + bitsandbytes NF4
    jaxft-int8   LoRA on an int8 per-channel base                         (double quant, fp32 compute)

The bitsandbytes side loads an HF safetensors copy of the example GGUF that this script writes to a
temporary directory first (transformers cannot quantize while reading a GGUF, nor save a GGUF-loaded model). On CPU the "device"
is host memory: peak RSS is the figure to compare; jaxft also reports the bytes of its frozen weights
and of its train state on the device and the temporary memory XLA allocates for the step
(`memory_analysis`), next to what `jaxft plan` predicts for the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import busy_processes, run_worker, summarize  # noqa: E402

SIDES = {"jaxft-none": ("jaxft", "none"), "jaxft-nf4": ("jaxft", "nf4"), "jaxft-int8": ("jaxft", "int8"),
         "torch": ("torch", "none"), "torch-bnb": ("torch", "nf4")}


def plan_run(args, quant: str, model_dtype: str | None = None):
    from jaxft.config import load_config

    return load_config(None, [f"model.dtype={model_dtype or args.dtype}", f"model.remat={args.remat}",
                              f"quant.base={quant}", f"lora.r={args.rank}", f"lora.alpha={args.alpha}",
                              "lora.target_modules=all-linear", f"train.batch_size={args.batch}",
                              f"data.max_length={args.seq}"])


def write_hf_copy(out: Path) -> Path:
    """The example GGUF as an HF safetensors directory (fp32, jaxft's merged export of the bare model),
    for transformers + bitsandbytes (transformers refuses to save a GGUF-loaded model)."""
    from jaxft.formats.hf import load_pretrained, load_tokenizer
    from jaxft.example import example_model
    from jaxft.formats.gguf import GGUFSource
    from jaxft.formats.peft import export_merged

    path = example_model()
    return export_merged(load_pretrained(path), load_tokenizer(path), GGUFSource(path).hf_config, out,
                         dtype="fp32")


def print_plans(args):
    from jaxft.commands.plan import GiB, model_config, plan

    print(f"\n`jaxft plan` for Llama 3 shapes (LoRA r={args.rank} all-linear, bf16 compute, batch {args.batch} x "
          f"{args.seq}, remat {args.remat}; GiB):")
    print(f"{'model':<11} {'base':<5} | {'weights':>8} | {'trainable':>9} | {'optimizer':>9} | {'grads':>7} | "
          f"{'activations':>11} | {'total':>7}")
    for name in ("llama3-8b", "llama3-70b"):
        cfg = model_config(name)
        for q in ("none", "int8", "nf4"):
            p = plan(cfg, plan_run(args, q, "bf16"))
            print(f"{name:<11} {q:<5} | {p.base / GiB:>8.2f} | {p.trainable / GiB:>9.3f} | {p.optimizer / GiB:>9.3f} | "
                  f"{p.gradients / GiB:>7.3f} | {p.activations / GiB:>11.2f} | {p.total / GiB:>7.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (jaxft's first compiles)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="jaxft compute dtype (PyTorch: fp32)")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="jaxft only")
    ap.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    ap.add_argument("--write-hf-copy", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_hf_copy:
        write_hf_copy(Path(args.write_hf_copy))
        return

    busy = busy_processes()
    if busy:
        print(f"warning: other busy processes: {'; '.join(busy)}", file=sys.stderr)
    common = ["--mode", "lora", "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
              "--remat", args.remat]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        if "torch-bnb" in args.sides:  # in its own process: a child inherits its parent's peak RSS (ru_maxrss)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write-hf-copy", str(hf_dir)], check=True)
        for side in args.sides:
            worker, q = SIDES[side]
            argv = common + ["--quant", q, "--dtype", args.dtype if worker == "jaxft" else "fp32"]
            argv += ["--xla-memory"] if worker == "jaxft" else []
            argv += ["--hf-dir", str(hf_dir)] if side == "torch-bnb" else []
            results.append(dict(summarize(run_worker(worker, argv, label=side), args), side=side))

    from jaxft.example import example_model
    from jaxft.commands.plan import model_config, plan

    print(f"\nQLoRA training, {example_model().name}: LoRA r={args.rank} alpha={args.alpha:g} on q,k,v,o,gate,up,down, "
          f"jaxft compute {args.dtype}, batch {args.batch} x seq {args.seq}, AdamW lr {args.lr:g}, "
          f"{args.warmup} warmup + {args.steps} timed steps, remat {args.remat} (jaxft)")
    head = (f"{'side':<11} | {'tokens/s med':>12} | {'step s':>7} | {'peak RSS GB':>11} | {'train RSS GB':>12} | "
            f"{'frozen GB':>9} | {'XLA temp GB':>11} | {'plan total GB':>13} | {'loss 1st':>8} | {'loss last':>9}")
    print(head)
    print("-" * len(head))
    cfg = model_config("example")
    for r in results:
        jax_side = r["side"].startswith("jaxft")
        total = plan(cfg, plan_run(args, SIDES[r["side"]][1])).total / 1e9 if jax_side else float("nan")
        print(f"{r['side']:<11} | {r['tokens_per_s_median']:>12.1f} | {r['step_s_median']:>7.2f} | "
              f"{r['peak_rss_gb']:>11.2f} | {r['train_peak_rss_gb']:>12.2f} | {r.get('frozen_gb', float('nan')):>9.3f} | "
              f"{r.get('xla_temp_gb', float('nan')):>11.3f} | {total:>13.3f} | {r['losses'][0]:>8.4f} | "
              f"{r['losses'][-1]:>9.4f}")
    for r in results:
        share = r["others_cpu_s"] / (r["wall_s"] * os.cpu_count())
        print(f"{r['side']}: worker {r['wall_s']:.0f} s wall; other processes took {100 * share:.0f}% of the machine"
              + ("  <-- NOISY: figures not trustworthy" if share > 0.1 else ""))
    print_plans(args)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(settings=vars(args), busy=busy, results=results), indent=1))


if __name__ == "__main__":
    main()
