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
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_sft
from benchlib import (NOISY, NOISY_SHARE, add_training_args, others_share, run_worker, table, training_argv, warn_busy,
                      write_json)

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
    add_training_args(ap)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="jaxft compute dtype (PyTorch: fp32)")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="jaxft only")
    ap.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    ap.add_argument("--write-hf-copy", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_hf_copy:
        write_hf_copy(Path(args.write_hf_copy))
        return

    busy = warn_busy()
    common = ["--mode", "lora", "--batch", str(args.batch), "--seq", str(args.seq), *training_argv(args),
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
            r = run_worker(worker, argv, bench_sft.__file__, label=side)
            results.append(dict(bench_sft.summarize(r, args), side=side))

    from jaxft.example import example_model
    from jaxft.commands.plan import model_config, plan

    print(f"\nQLoRA training, {example_model().name}: LoRA r={args.rank} alpha={args.alpha:g} on q,k,v,o,gate,up,down, "
          f"jaxft compute {args.dtype}, batch {args.batch} x seq {args.seq}, AdamW lr {args.lr:g}, "
          f"{args.warmup} warmup + {args.steps} timed steps, remat {args.remat} (jaxft)")
    cfg, nan = model_config("example"), float("nan")

    def plan_total(r):  # what `jaxft plan` predicts for a jaxft side
        return plan(cfg, plan_run(args, SIDES[r["side"]][1])).total / 1e9 if r["side"].startswith("jaxft") else nan

    print("\n".join(table([("side", "<11", "side"), ("tokens/s med", ">12.1f", "tokens_per_s_median"),
                          ("step s", ">7.2f", "step_s_median"), ("peak RSS GB", ">11.2f", "peak_rss_gb"),
                          ("train RSS GB", ">12.2f", "train_peak_rss_gb"),
                          ("frozen GB", ">9.3f", lambda r: r.get("frozen_gb", nan)),
                          ("XLA temp GB", ">11.3f", lambda r: r.get("xla_temp_gb", nan)),
                          ("plan total GB", ">13.3f", plan_total), ("loss 1st", ">8.4f", lambda r: r["losses"][0]),
                          ("loss last", ">9.4f", lambda r: r["losses"][-1])], results)))
    for r in results:
        print(f"{r['side']}: worker {r['wall_s']:.0f} s wall; other processes took {100 * others_share(r):.0f}% of the "
              f"machine" + (NOISY if others_share(r) > NOISY_SHARE else ""))
    print_plans(args)
    write_json(args.json, settings=vars(args), busy=busy, results=results)


if __name__ == "__main__":
    main()
