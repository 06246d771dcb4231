"""Where a LoRA SFT step's time goes: forward vs backward of a SmolLM2-135M-shaped model (random weights).

    python scripts/profile_step.py [--batch 4] [--seq 256] [--layers 30] [--remat none|proj|dots|full] [--ops 25]

Prints medians of 3 (after a compile call) for the layer stack forward, the loss forward, and their
gradients with respect to the LoRA factors, and the backward/forward ratio (~2 is the LoRA ideal:
one input-gradient matmul per forward matmul, no weight gradients for the frozen base).
With --ops N, also profiles the loss gradient (jax.profiler, 3 calls) and prints the share of op time
spent in matmuls ("ynn"/dot fusions on XLA:CPU) and the N most expensive XLA ops, each with its
HLO, so you can see which operation of the model a cost belongs to.
"""

import argparse
import dataclasses
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np
from flax import nnx

from jaxft.models.decoder import Decoder
from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.losses import sft_loss
from jaxft.models.config import DecoderConfig, RopeConfig

from benchlib import timed

SMOLLM2 = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope=RopeConfig(theta=100000.0))


def median_time(fn, *args, repeats=3):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))  # compiles
    return timed(lambda: jax.block_until_ready(fn(*args)), repeats)[0]


def op_profile(fn, args, top: int, calls: int = 3):
    """Per-op time (ms per call) of the jitted fn from a jax.profiler trace, with each op's HLO."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "while")):
            ms[e["name"]] += e.get("dur", 0) / calls / 1000
    hlo = {}
    for line in fn.lower(*args).compile().as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if m:
            hlo[m.group(1)] = re.sub(r", metadata=.*", "", m.group(2))
    total = sum(ms.values())
    dots = sum(v for k, v in ms.items() if k.startswith("ynn_fusion") or "dot" in k)
    print(f"op time {total:.0f} ms per call: matmuls {dots:.0f} ms ({100 * dots / total:.0f}%), other {total - dots:.0f} ms")
    for name, v in ms.most_common(top):
        print(f"{v:8.2f} ms  {name}: {hlo.get(name, '')[:140]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=SMOLLM2.num_layers)
    ap.add_argument("--remat", choices=["none", "proj", "dots", "full"], default="proj")
    ap.add_argument("--ops", type=int, default=0, help="also print the N most expensive XLA ops of the loss gradient")
    a = ap.parse_args()
    model = Decoder(dataclasses.replace(SMOLLM2, num_layers=a.layers, layer_types=()), rngs=nnx.Rngs(0), remat=a.remat)
    cfg = LoraConfig(r=16, alpha=32)
    adapters.attach(model, cfg, jax.random.key(0))
    g, p, f = adapters.split(model, cfg)
    toks = np.random.RandomState(0).randint(0, SMOLLM2.vocab_size, (a.batch, a.seq)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.tile(np.arange(a.seq, dtype=np.int32), (a.batch, 1)),
                 segment_ids=np.ones_like(toks), targets=toks, loss_mask=np.ones(toks.shape, np.float32))
    hidden = lambda p, f: nnx.merge(g, p, f).hidden(batch["tokens"])[0]  # noqa: E731
    loss = lambda p, f: sft_loss(nnx.merge(g, p, f), batch)[0]  # noqa: E731
    rows = [("layers forward", median_time(hidden, p, f)),
            ("layers forward+backward", median_time(jax.grad(lambda p, f: hidden(p, f).sum()), p, f)),
            ("loss forward", median_time(loss, p, f)),
            ("loss forward+backward", median_time(jax.grad(loss), p, f))]
    for name, t in rows:
        print(f"{name:26s} {t:7.3f} s")
    print(f"(forward+backward) / forward: layers {rows[1][1] / rows[0][1]:.2f}x, loss {rows[3][1] / rows[2][1]:.2f}x")
    mem = jax.jit(jax.grad(loss)).lower(p, f).compile().memory_analysis()
    print(f"loss gradient: XLA temp memory {mem.temp_size_in_bytes / 1e9:.2f} GB (remat {a.remat})")
    if a.ops:
        op_profile(jax.grad(loss), (p, f), a.ops)


if __name__ == "__main__":
    main()
