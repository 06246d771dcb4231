"""Mixed-adapter decode and joint multi-adapter training on SmolLM2-135M (the example model), one run.

    python scripts/bench_multi_adapter.py [--rows 16] [--new-tokens 32] [--banks 1,4,16] [--no-peft]

Decode: greedy tokens/s of `rows` prompts with 1, 4 and 16 different LoRA adapters (r=8, all linear
layers, random B) in the batch (row i uses adapter i mod n, one jaxft.adapters.bank forward), against
the same batch under one plain adapter (jaxft.adapters.lora), and PEFT's `generate(adapter_names=...)`
on the same adapters as the reference. EOS is ignored, so every run produces exactly --new-tokens.
Training: 4 adapters trained jointly (one bank, mixed micro-batches) against 4 sequential one-adapter
runs, same rows per adapter: step time, compile time and the compiled step's memory (arguments +
temporaries, from XLA's memory analysis: the CPU has no device peak counter). Times are medians of
--repeats; the machine is shared, so quote them with its load.
"""

import argparse
import os
import time

from benchlib import offline_env, timed  # scripts/ is on the path when a script runs

os.environ.update(offline_env())  # before the imports below: peft imports bitsandbytes (see benchlib.OFFLINE_ENV)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.adapters import bank
from jaxft.context import Ctx
from jaxft.config import LoraConfig, OptimConfig, load_config
from jaxft.example import example_model
from jaxft.generate import Sampling, generate
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from jaxft.optim import bank_optimizer

TARGETS = ("all-linear",)


def random_entries(model, n, r=8, seed=0):
    cfg = LoraConfig(r=r, alpha=16, target_modules=TARGETS)
    out = []
    for k in range(n):
        key = jax.random.key(seed + k)
        factors = {}
        for i, (path, lin) in enumerate(adapters.targets(model, TARGETS)):
            L, d_in, d_out = lin.kernel.shape
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            factors[path] = (np.asarray(jax.random.normal(ka, (L, d_in, r)) / np.sqrt(d_in)),
                             np.asarray(0.02 * jax.random.normal(kb, (L, r, d_out))))
        out.append(bank.Entry(f"a{k}", cfg, factors))
    return out


def decode(args, path, prompts):
    rows = []
    sampling = Sampling(max_new_tokens=args.new_tokens)
    one = load_pretrained(path)
    e = random_entries(one, 1)[0]
    for p, lin in adapters.targets(one, TARGETS):  # the baseline: one plain adapter
        lin.adapter = adapters.LoRA(jnp.asarray(e.factors[p][0]), jnp.asarray(e.factors[p][1]), 2.0, 0.0, lin.axes)
    g, s = nnx.split(one)
    base_ctx = Ctx()
    run = lambda g=g, s=s, ctx=base_ctx: generate(g, (s,), prompts, eos_ids=[], sampling=sampling, ctx=ctx)  # noqa: E731
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    t, _ = timed(run, args.repeats)
    base_tps = len(prompts) * args.new_tokens / t
    rows.append(("one plain LoRA", base_tps, compile_s))
    for n in args.banks:
        model = load_pretrained(path)
        bank.install(model, random_entries(model, n))
        g, s = nnx.split(model)
        ctx = Ctx(adapter_ids=jnp.arange(len(prompts)) % n)
        t0 = time.perf_counter()
        run(g, s, ctx)
        compile_s = time.perf_counter() - t0
        t, _ = timed(lambda: run(g, s, ctx), args.repeats)
        rows.append((f"bank, {n} adapters in the batch", len(prompts) * args.new_tokens / t, compile_s))
    return rows, base_tps


def peft_decode(args, path, prompts):
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxft.formats.peft import export_adapter

    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = load_pretrained(path)
        entries = random_entries(model, max(args.banks))
        for e in entries:  # the same adapters, as PEFT directories
            for p, lin in adapters.targets(model, TARGETS):
                lin.adapter = adapters.LoRA(jnp.asarray(e.factors[p][0]), jnp.asarray(e.factors[p][1]), 2.0, 0.0)
            export_adapter(model, e.cfg, f"{d}/{e.name}")
        base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32) \
            if path.suffix == ".gguf" else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, f"{d}/a0", adapter_name="a0")
        for e in entries[1:]:
            pm.load_adapter(f"{d}/{e.name}", e.name)
        pm.eval()
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
        for n in args.banks:
            names = [f"a{i % n}" for i in range(len(prompts))]
            with torch.no_grad():
                gen = lambda: pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names,  # noqa: E731
                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False, pad_token_id=0)
                gen()
                t, _ = timed(gen, args.repeats)
            rows.append((f"PEFT adapter_names=, {n} adapters", len(prompts) * args.new_tokens / t))
    return rows


def training(args, path):
    """4 adapters jointly vs 4 sequential one-adapter runs: step time, compile, compiled memory."""
    import dataclasses

    from jaxft.config import AdapterSpec
    from jaxft.losses import sft_loss
    from jaxft.objectives.multi import make_loss

    N, b, S = 4, args.train_rows, args.train_len
    run = load_config(None, ["optim.warmup_steps=0", "optim.schedule=constant", "lora.r=8", "lora.alpha=16"])
    run = dataclasses.replace(run, adapters=tuple(AdapterSpec(name=f"a{i}", train="x", lr=1e-3 * (i + 1))
                                                  for i in range(N)))
    rng = np.random.RandomState(0)
    toks = rng.randint(0, 49152, (1, N * b, S)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.broadcast_to(np.arange(S, dtype=np.int32), toks.shape).copy(),
                 segment_ids=np.ones_like(toks), targets=np.roll(toks, -1, -1), loss_mask=np.ones(toks.shape, np.float32))

    def measure(graphdef, params, frozen, tx, loss_fn, mb):
        state = init_state(params, tx)
        step = make_train_step(graphdef, tx, loss_fn)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, mb).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        mem_b = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) if mem is not None else float("nan")
        state, _ = step(state, frozen, mb)
        jax.block_until_ready(state)

        def one():
            nonlocal state
            state, m = step(state, frozen, mb)
            return jax.block_until_ready(m["loss"])
        t, _ = timed(one, args.repeats)
        return t, compile_s, mem_b

    model = load_pretrained(path)
    bank.attach_for_training(model, run)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    joint_batch = dict(batch, adapter_ids=np.repeat(np.arange(N, dtype=np.int32), b)[None],
                       adapter_targets=np.full((1, N * b), float(b * S), np.float32))
    joint = measure(graphdef, params, frozen, bank_optimizer(run, 10, params),
                    make_loss(tuple(a.name for a in run.adapters)), joint_batch)
    model = load_pretrained(path)
    cfg = LoraConfig(r=8, alpha=16)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    single = {k: v[:, :b] for k, v in batch.items()}
    seq = measure(graphdef, params, frozen, make_optimizer(OptimConfig(warmup_steps=0, schedule="constant"), 10, params),
                  sft_loss, single)
    return joint, seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--banks", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-rows", type=int, default=2, help="rows per adapter per step")
    ap.add_argument("--train-len", type=int, default=64)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    args.banks = [int(x) for x in args.banks.split(",")]
    path = example_model()
    prompts = [list(np.random.RandomState(i).randint(10, 40000, 8 + i % 5)) for i in range(args.rows)]
    prompts = [[int(t) for t in p] for p in prompts]
    print(f"SmolLM2-135M fp32, CPU x{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; {args.rows} rows, "
          f"{args.new_tokens} new tokens, LoRA r=8 on all linear layers")
    if not args.no_decode:
        rows, base = decode(args, path, prompts)
        for name, tps, c in rows:
            print(f"  jaxft {name:<32} {tps:8.1f} tok/s  ({tps / base:.2f}x one adapter; first call {c:.1f}s)")
    if not (args.no_peft or args.no_decode):
        for name, tps in peft_decode(args, path, prompts):
            print(f"  {name:<38} {tps:8.1f} tok/s")
    if not args.no_train:
        (tj, cj, mj), (ts, cs, ms) = training(args, path)
        print(f"training, 4 adapters x {args.train_rows} rows x {args.train_len} tokens per step:")
        print(f"  joint (one bank)        step {tj:6.2f}s  compile {cj:5.1f}s  memory {mj / 2**20:7.1f} MiB")
        print(f"  4 sequential runs       step {4 * ts:6.2f}s  compile {4 * cs:5.1f}s  memory {ms / 2**20:7.1f} MiB "
              f"(4 x one run: {ts:.2f}s / {cs:.1f}s; runs one after another, so memory is one run's)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
