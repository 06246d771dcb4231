"""A/B of the SFT loss value + gradient, interleaved in one process: remat policies and loss heads.

    python scripts/ab_grad.py [--mode lora|full] [--remat none,proj,dots] [--head sum,custom,autodiff]
                              [--batch 4] [--seq 256] [--repeats 10]

Model: SmolLM2-135M-shaped, random weights (scripts/profile_step.py's SMOLLM2), LoRA r=16 on every
layer linear (--mode lora) or every weight trainable (--mode full: full fine-tuning, tied embeddings).
Every (remat, head) variant is compiled first, then the variants run in turn, `--repeats` rounds, so a
noisy machine slows them alike. Prints per variant the wall and process CPU medians, the compiled temp
memory, and the largest gradient difference against the first variant.

head: sum = jaxft.losses.sft_loss (token_logprob_sum: the head's and h's gradients computed in the
forward pass); custom = Σ mask · jaxft.losses.token_logprobs (per-token hand-written gradient: dh in
the forward for a frozen head, a trainable head recomputed in the backward pass: sft_loss before
token_logprob_sum); autodiff = the chunked log-softmax under jax.checkpoint differentiated by JAX (the
implementation both replaced: the backward pass recomputes each chunk's logits).
"""

import argparse
import dataclasses
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxft
import jaxft.losses
from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.models.decoder import Decoder
from profile_step import SMOLLM2


def autodiff_token_logprobs(model, h, targets, chunk=128):
    B, S, D = h.shape
    c = min(chunk, S)
    n = -(-S // c)
    pad = n * c - S
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(_, xs):
        logits = model.logits(xs[0]).astype(jnp.float32)
        return None, jnp.take_along_axis(logits, xs[1][..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)

    _, lp = jax.lax.scan(one, None, (h, t))
    return lp.swapaxes(0, 1).reshape(B, n * c)[:, :S]


def per_token_loss(logprobs):
    """sft_loss with the per-token log-probs `logprobs(model, h, targets)`."""
    def loss(model, b):
        h, _ = model.hidden(b["tokens"], b["positions"], b["segment_ids"])
        return -jnp.sum(logprobs(model, h, b["targets"]) * b["loss_mask"])
    return loss


HEADS = {"sum": lambda model, b: jaxft.losses.sft_loss(model, b)[0],
         "custom": per_token_loss(jaxft.losses.token_logprobs), "autodiff": per_token_loss(autodiff_token_logprobs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--remat", default="none,proj,dots")
    ap.add_argument("--head", default="sum")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    B, S = a.batch, a.seq
    toks = np.random.RandomState(0).randint(0, SMOLLM2.vocab_size, (B, S)).astype(np.int32)
    batch = dict(tokens=toks, positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)), targets=toks,
                 segment_ids=np.ones_like(toks), loss_mask=np.ones(toks.shape, np.float32))
    variants = {}
    for remat, head in itertools.product(a.remat.split(","), a.head.split(",")):
        model = Decoder(dataclasses.replace(SMOLLM2, layer_types=()), rngs=nnx.Rngs(0), remat=remat)
        cfg = LoraConfig(r=16, alpha=32, enabled=a.mode == "lora")
        if cfg.enabled:
            adapters.attach(model, cfg, jax.random.key(0))
        g, p, f = adapters.split(model, cfg)
        loss = (lambda g, fn: lambda p, f, b: fn(nnx.merge(g, p, f), b))(g, HEADS[head])
        compiled = jax.jit(jax.value_and_grad(loss)).lower(p, f, batch).compile()
        jax.block_until_ready(compiled(p, f, batch))
        variants[f"remat={remat} head={head}"] = (compiled, p, f)
    times = {k: [] for k in variants}
    out = {}
    for _ in range(a.repeats):
        for k, (compiled, p, f) in variants.items():
            w, c = time.perf_counter(), time.process_time()
            out[k] = jax.block_until_ready(compiled(p, f, batch))
            times[k].append((time.perf_counter() - w, time.process_time() - c))
    first = next(iter(variants))
    for k, (compiled, _, _) in variants.items():
        diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-30)),
                                                out[k][1], out[first][1])))
        print(f"{k:28s} wall {statistics.median(t[0] for t in times[k]):6.3f} s  "
              f"cpu {statistics.median(t[1] for t in times[k]):6.3f} s  "
              f"temp {compiled.memory_analysis().temp_size_in_bytes / 1e9:5.2f} GB  "
              f"max |grad - first| / max |first| {diff:.1e}")


if __name__ == "__main__":
    main()
