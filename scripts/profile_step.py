"""Where an SFT step's time goes: forward vs backward of a SmolLM2-135M-shaped model (random weights).

    python scripts/profile_step.py [--mode lora|full] [--batch 4] [--seq 256] [--layers 30]
                                   [--remat none|proj|dots|full] [--ops 25] [--ops-of grad|step]

--mode lora (default): LoRA r=16 on every layer linear, gradients with respect to the factors; full: every
weight trainable (full fine-tuning, the tied embeddings included). Prints medians of 3 (after a compile
call) for the layer stack forward, the loss forward, their gradients with respect to the trainable weights,
the backward/forward ratio (~2 is the LoRA ideal: one input-gradient matmul per forward matmul, no weight
gradients for the frozen base; ~3 for full fine-tuning, which adds a weight-gradient matmul per forward
one), and the whole train step (jaxft.train.make_train_step with AdamW: gradient, norm, update, donated).
With --ops N, also profiles the loss gradient (--ops-of grad) or the whole train step (--ops-of step)
with jax.profiler, 3 calls, and prints the share of op time spent in matmuls ("ynn"/dot fusions on
XLA:CPU) and the N most expensive XLA ops, each with its HLO, so you can see which operation of the model
a cost belongs to.
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.decoder import Decoder
from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.config import OptimConfig
from jaxft.losses import sft_loss
from jaxft.models.config import DecoderConfig, RopeConfig
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step

from benchlib import timed

SMOLLM2 = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope=RopeConfig(theta=100000.0))


def median_time(fn, *args, repeats=3):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))  # compiles
    return timed(lambda: jax.block_until_ready(fn(*args)), repeats)[0]


def op_profile(compiled, call, top: int, calls: int = 3):
    """Per-op time (ms per call) of call() — which runs the `compiled` program once — from a jax.profiler
    trace, with each op's HLO."""
    call()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "while")):
            ms[e["name"]] += e.get("dur", 0) / calls / 1000
    hlo = {}
    for line in compiled.as_text().splitlines():
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
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=SMOLLM2.num_layers)
    ap.add_argument("--remat", choices=["none", "proj", "dots", "full"], default="proj")
    ap.add_argument("--ops", type=int, default=0, help="also print the N most expensive XLA ops")
    ap.add_argument("--ops-of", choices=["grad", "step"], default="grad",
                    help="profile the loss gradient, or the whole train step (gradient + AdamW update)")
    a = ap.parse_args()
    model = Decoder(dataclasses.replace(SMOLLM2, num_layers=a.layers, layer_types=()), rngs=nnx.Rngs(0), remat=a.remat)
    cfg = LoraConfig(r=16, alpha=32, enabled=a.mode == "lora")
    if cfg.enabled:
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
    # the real step, as bench_sft.py runs it: AdamW, constant lr, no decay or clipping, state donated
    tx = make_optimizer(OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                    clip_norm=None), 10, p)
    state = init_state(jax.tree.map(jnp.copy, p), tx)
    step_batch = {k: v[None] for k, v in batch.items()}
    step = make_train_step(g, tx).lower(state, f, step_batch).compile()

    def one_step():
        nonlocal state
        state, metrics = step(state, f, step_batch)
        return jax.block_until_ready(metrics)

    one_step()
    rows.append(("train step (AdamW)", timed(one_step, 3)[0]))
    for name, t in rows:
        print(f"{name:26s} {t:7.3f} s")
    print(f"(forward+backward) / forward: layers {rows[1][1] / rows[0][1]:.2f}x, loss {rows[3][1] / rows[2][1]:.2f}x; "
          f"step - loss gradient {rows[4][1] - rows[3][1]:.3f} s")
    grad = jax.jit(jax.grad(loss)).lower(p, f).compile()
    print(f"loss gradient: XLA temp memory {grad.memory_analysis().temp_size_in_bytes / 1e9:.2f} GB "
          f"(mode {a.mode}, remat {a.remat}); train step {step.memory_analysis().temp_size_in_bytes / 1e9:.2f} GB")
    if a.ops and a.ops_of == "grad":
        op_profile(grad, lambda: jax.block_until_ready(grad(p, f)), a.ops)
    elif a.ops:
        op_profile(step, one_step, a.ops)


if __name__ == "__main__":
    main()
