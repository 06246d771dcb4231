"""Load time and greedy decode tokens/s of SmolLM2-135M-Instruct: jaxft next to transformers, one run.

    python scripts/bench_generate.py [--new-tokens 64] [--repeats 3]

Both load the same GGUF (the example model) to float32 and decode greedily on the CPU with a KV
cache; EOS is ignored so both produce exactly --new-tokens tokens. Prints medians and ratios.
"""

import argparse
import statistics
import time

import jax
import torch
from transformers import AutoModelForCausalLM

import jaxft
from jaxft.example import example_model
from jaxft.generate import Generator, Sampling, chat_prompt


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = example_model()
    print(f"model: {path.name}  jax {jax.__version__} ({jax.default_backend()})  torch {torch.__version__} "
          f"threads={torch.get_num_threads()}")

    t_tok, tok = timed(lambda: jaxft.load_tokenizer(path), 1)
    t_jx, model = timed(lambda: jax.block_until_ready(jaxft.load_pretrained(path)), 1)
    t_hf, hf = timed(lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval(), 1)
    print(f"\nload (weights, fp32)      jaxft {t_jx:6.1f} s   transformers {t_hf:6.1f} s   ratio {t_hf / t_jx:.2f}x"
          f"   (tokenizer from GGUF: {t_tok:.1f} s)")

    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "Explain gravity to a child.", "List three prime numbers."]
    ids = [chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    gen = Generator(model)
    n = args.new_tokens
    sampling = Sampling(max_new_tokens=n)
    print(f"\ngreedy decode, {n} new tokens, median of {args.repeats}")
    print(f"{'batch':>5}  {'jaxft tok/s':>12}  {'transformers tok/s':>18}  {'ratio':>6}  {'jaxft 1st call (compile)':>24}")
    for b in (1, 4):
        batch = ids[:b]
        t_first, _ = timed(lambda: gen(batch, eos_ids={-1}, sampling=sampling), 1)
        t_j, out = timed(lambda: gen(batch, eos_ids={-1}, sampling=sampling), args.repeats)
        assert all(len(o) == n for o in out)
        P = max(map(len, batch))
        inp = torch.zeros((b, P), dtype=torch.long)
        mask = torch.zeros_like(inp)
        for i, p in enumerate(batch):
            inp[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1

        def run_hf():
            with torch.no_grad():
                return hf.generate(input_ids=inp, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

        t_h, _ = timed(run_hf, args.repeats)
        print(f"{b:>5}  {b * n / t_j:>12.1f}  {b * n / t_h:>18.1f}  {t_h / t_j:>5.2f}x  {t_first:>22.1f} s")


if __name__ == "__main__":
    main()
