"""Where a sampled decode step's time goes: SmolLM2-135M-Instruct fp32 (the example model), one run.

    python scripts/profile_decode.py [--batch 16] [--prompt 192] [--new 64] [--repeats 10]

Prints medians of: the layers' decode step (jitted, cache donated), the LM head + sampling (temperature 1) and
the Gumbel draw alone, a plain chain of matmuls of the layers' weight size (what the memory reaches here),
and `jaxft.generate.generate` tokens/s at the batch (repeated prompts, as a GRPO rollout). Run it from another
checkout (PYTHONPATH=<checkout>) to compare versions on the same machine.
"""

import argparse
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft.example import example_model
from jaxft.generate import Sampling, generate, sample_logits, token_logprob

from benchlib import cpu_flags, timed


def median_ms(fn, repeats):
    jax.block_until_ready(fn())  # compiles
    return 1e3 * timed(lambda: jax.block_until_ready(fn()), repeats)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=192, help="cached prompt slots")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    flags = cpu_flags()
    print(f"jax {jax.__version__}; jaxft {jaxft.__file__}; cpu flags: {' '.join(flags) or 'none of avx512f/amx'}")
    model = load_pretrained(example_model())
    graphdef, state = nnx.split(model)
    B, P, V = a.batch, a.prompt, model.config.vocab_size

    @partial(jax.jit, donate_argnums=(3,))
    def layers(state, tok, pos, cache):
        return nnx.merge(graphdef, state).hidden(tok[:, None], pos[:, None], jnp.ones_like(tok)[:, None], cache)

    @jax.jit
    def head(state, h, key):
        logits = nnx.merge(graphdef, state).logits(h).astype(jnp.float32)
        tok = sample_logits(logits, key, Sampling(temperature=1.0))
        return tok, token_logprob(logits, tok, 1.0)

    tok, pos = jnp.ones((B,), jnp.int32), jnp.full((B,), P, jnp.int32)
    box = [dict(model.init_cache(B, P + a.new), index=jnp.int32(P))]

    def step():
        h, box[0] = layers(state, tok, pos, box[0])
        return h

    ms_layers = median_ms(step, a.repeats)
    h, key = jnp.ones((B, model.config.hidden_size)), jax.random.key(0)
    ms_head = median_ms(lambda: head(state, h, key), a.repeats)
    gumbel = jax.jit(lambda k: jax.random.categorical(k, jnp.zeros((B, V)), axis=-1))
    ms_gumbel = median_ms(lambda: gumbel(key), a.repeats)
    w = state["model"]["layers"]
    nbytes = sum(x.nbytes for x in jax.tree.leaves(w))
    D, L = model.config.hidden_size, model.config.num_layers
    F = nbytes // (8 * L * D)  # two [D, F] matrices a layer: the layers' weight bytes
    W1 = jax.random.normal(jax.random.key(1), (L, D, F)) * 0.02
    W2 = jax.random.normal(jax.random.key(2), (L, F, D)) * 0.02
    chain = jax.jit(lambda x, W1, W2: jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w[0]) @ w[1], None), x, (W1, W2))[0])
    x = jnp.ones((B, D))
    ms_chain = median_ms(lambda: chain(x, W1, W2), a.repeats)
    prompts = [list(range(5 + i, 5 + i + P - 22)) for i in range(B // 8 or 1) for _ in range(min(B, 8))][:B]
    s = Sampling(temperature=1.0, max_new_tokens=a.new)
    ms_gen = median_ms(lambda: generate(graphdef, (state,), prompts, eos_ids={-1}, sampling=s).tokens, 3)
    print(f"batch {B}, {P} cached slots, {a.new} new tokens; medians of {a.repeats}")
    print(f"  layers' decode step (cache donated)   {ms_layers:7.1f} ms   reads {nbytes / 1e9:.2f} GB of weights: "
          f"{nbytes / ms_layers / 1e6:5.1f} GB/s")
    print(f"  plain matmul chain, same bytes         {ms_chain:7.1f} ms   {nbytes / ms_chain / 1e6:5.1f} GB/s")
    print(f"  LM head + sampling                     {ms_head:7.1f} ms   (Gumbel draw over {V} alone {ms_gumbel:.1f} ms)")
    print(f"  generate, sampled                      {B * a.new / ms_gen * 1e3:7.1f} tok/s")


if __name__ == "__main__":
    main()
