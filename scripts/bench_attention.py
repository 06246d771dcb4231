"""XLA's attention vs the blockwise kernel on this CPU, side by side per sequence length (docs/performance.md).

    python scripts/bench_attention.py [--seqs 256,512,1024,2048,4096] [--layers 4] [--repeats 3] [--block 256]
                                      [--batch 1] [--decode 64]

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head_dim 64), fp32, batch 1 (--batch). Two measurements per
T, each compiled first and then run interleaved (`--repeats` rounds, medians), so a noisy machine slows both:
  attn   forward + backward of one attention call (jaxft.models.attention.attend, q, k, v random)
  step   value and gradient of the SFT loss of a LoRA (r 16, all linears) model of SmolLM2's shape cut to
         `--layers` layers (0 skips it), remat "proj", with its compiled temp memory and compile time
  decode (--decode N) greedy generation of N tokens for 4 prompts of 60-81 tokens with the whole SmolLM2-135M
         shape (jaxft.generate: prefill, then one token a step against the KV cache), random weights
Prints the CPU flags and one table: seconds and the blockwise / xla time ratio (below 1: blockwise faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.generate import Sampling, generate
from jaxft.losses import sft_loss
from jaxft.models.attention import NO_WINDOW, AttentionKernel, Mask, attend
from jaxft.models.decoder import Decoder

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import cpu_flags, table  # noqa: E402
from profile_step import SMOLLM2  # noqa: E402

IMPLS = ("xla", "blockwise")


def attention_call(kernel: AttentionKernel, T: int, B: int):
    """(jitted fwd+bwd of one attention call, its arguments)."""
    K, G, H = SMOLLM2.num_kv_heads, SMOLLM2.num_heads // SMOLLM2.num_kv_heads, SMOLLM2.head_dim
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, K, G, T, H), (B, K, T, H), (B, K, T, H)))
    slots, seg = jnp.arange(T, dtype=jnp.int32), jnp.ones((B, T), jnp.int32)
    mask = Mask(seg, seg, slots, slots, jnp.asarray(NO_WINDOW, jnp.int32), aligned=True)

    def f(q, k, v):
        out = attend(kernel, q, k, v, mask, scale=SMOLLM2.scale, softcap=None, sliding_window=None, heads_major=True)
        return jnp.sum(out * out)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile(), (q, k, v)


def lora_step(kernel: AttentionKernel, T: int, layers: int, B: int):
    """(compiled value-and-grad of a LoRA SFT loss, its arguments, its compile seconds)."""
    model = Decoder(dataclasses.replace(SMOLLM2, num_layers=layers, layer_types=()), rngs=nnx.Rngs(0),
                    attention=kernel)
    cfg = LoraConfig(r=16, alpha=32)
    adapters.attach(model, cfg, jax.random.key(0))
    g, p, f = adapters.split(model, cfg)
    toks = np.random.RandomState(0).randint(0, SMOLLM2.vocab_size, (B, T)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)), segment_ids=np.ones_like(toks),
                 targets=toks, loss_mask=np.ones(toks.shape, np.float32))
    loss = lambda p, f, b: sft_loss(nnx.merge(g, p, f), b)[0]  # noqa: E731
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(p, f, batch).compile()
    return compiled, (p, f, batch), time.perf_counter() - t0


def decode_call(kernel: AttentionKernel, new_tokens: int):
    """(a generate call of `new_tokens` greedy tokens for 4 prompts, no arguments)."""
    graphdef, state = nnx.split(Decoder(dataclasses.replace(SMOLLM2, layer_types=()), rngs=nnx.Rngs(0),
                                        attention=kernel))
    prompts = [np.random.RandomState(i).randint(3, 1000, 60 + 7 * i).tolist() for i in range(4)]
    sampling = Sampling(max_new_tokens=new_tokens)
    return lambda: generate(graphdef, (state,), prompts, eos_ids=set(), sampling=sampling).tokens, ()


def interleaved(calls: dict, repeats: int) -> dict:
    """Median wall seconds per call, the calls run in turn `repeats` rounds (after one warm-up call each)."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="256,512,1024,2048,4096")
    ap.add_argument("--layers", type=int, default=4, help="layers of the LoRA step's model (0: no step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=None, help="blockwise tile (query and key); default: the CPU's")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode", type=int, default=0, help="also time greedy generation of N tokens (0: no)")
    a = ap.parse_args()
    kernels = {"xla": AttentionKernel("xla"), "blockwise": AttentionKernel("blockwise", a.block, a.block)}
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, flags: {' '.join(cpu_flags()) or 'no avx512f / amx'}, "
          f"batch {a.batch}", flush=True)
    rows = []
    for T in map(int, a.seqs.split(",")):
        row = dict(T=T)
        attn = interleaved({i: attention_call(kernels[i], T, a.batch) for i in IMPLS}, a.repeats)
        row.update({f"attn_{i}": attn[i] for i in IMPLS})
        if a.layers:
            compiled = {i: lora_step(kernels[i], T, a.layers, a.batch) for i in IMPLS}
            step = interleaved({i: c[:2] for i, c in compiled.items()}, a.repeats)
            row.update({f"compile_{i}": compiled[i][2] for i in IMPLS})
            row.update({f"step_{i}": step[i] for i in IMPLS})
            row.update({f"temp_{i}": compiled[i][0].memory_analysis().temp_size_in_bytes / 1e9 for i in IMPLS})
        rows.append(row)
        print(f"  T={T} done: {row}", file=sys.stderr, flush=True)
    cols = [("T", ">5", "T"), ("attn xla s", ">10.4f", "attn_xla"), ("attn blockwise s", ">16.4f", "attn_blockwise"),
            ("ratio", ">6", lambda r: f"{r['attn_blockwise'] / r['attn_xla']:.2f}x")]
    if a.layers:
        cols += [(f"step xla s ({a.layers} layers)", ">22.3f", "step_xla"),
                 ("step blockwise s", ">16.3f", "step_blockwise"),
                 ("ratio", ">6", lambda r: f"{r['step_blockwise'] / r['step_xla']:.2f}x"),
                 ("temp xla GB", ">11.3f", "temp_xla"), ("temp blockwise GB", ">17.3f", "temp_blockwise"),
                 ("compile xla s", ">13.1f", "compile_xla"), ("compile blockwise s", ">19.1f", "compile_blockwise")]
    print("\n".join(table(cols, rows)))
    if a.decode:
        t = interleaved({i: decode_call(kernels[i], a.decode) for i in IMPLS}, a.repeats)
        print(f"decode {a.decode} tokens x 4 prompts, 30 layers: xla {t['xla']:.2f} s, blockwise "
              f"{t['blockwise']:.2f} s ({t['blockwise'] / t['xla']:.2f}x)")


if __name__ == "__main__":
    main()
