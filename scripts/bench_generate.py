"""Load time and greedy decode tokens/s of SmolLM2-135M-Instruct: jaxft next to transformers, one run.

    python scripts/bench_generate.py [--new-tokens 64] [--repeats 3] [--batches 1,8,32]
                                     [--task-prompts G] [--temperature T]

Both load the same GGUF (the example model) to float32 and decode greedily on the CPU with a KV
cache; EOS is ignored (neither a stop nor masked) so both produce exactly --new-tokens tokens. `--task-prompts G` uses the quickstart
task's chat prompts instead (130-180 tokens), each repeated G times in consecutive rows (a GRPO generation
batch: `--batches 16 --task-prompts 8` is configs/grpo_lora.yaml's rollout), and `--temperature T > 0` samples
(no top-k / top-p) on both sides, as a rollout does; rows are then compared only for length. jaxft runs `jaxft.generate.generate`
(prefill + while_loop decode in one compiled program per shape bucket, weights as arguments). Prints
medians, ratios, the compile (first-call) time and the CPU flags.
"""

import argparse

import jax
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.example import example_model
from jaxft.generate import Sampling, chat_prompt, generate
from flax import nnx

from benchlib import cpu_flags, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--task-prompts", type=int, default=0, metavar="G",
                    help="quickstart task prompts, each repeated G times (0: the short chat prompts)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = ap.parse_args()
    path = example_model()
    flags = cpu_flags()
    print(f"model: {path.name}  jax {jax.__version__} ({jax.default_backend()})  torch {torch.__version__} "
          f"threads={torch.get_num_threads()}  cpu flags: {' '.join(flags) or 'none of avx512f/avx512_bf16/amx'}")

    t_tok, tok = timed(lambda: load_tokenizer(path), 1)
    t_jx, model = timed(lambda: jax.block_until_ready(load_pretrained(path)), 1)
    t_hf, hf = timed(lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval(), 1)
    hf.generation_config.eos_token_id = None  # EOS is no stop (generate() would take it back from the model)
    print(f"\nload (weights, fp32)      jaxft {t_jx:6.1f} s   transformers {t_hf:6.1f} s   ratio {t_hf / t_jx:.2f}x"
          f"   (tokenizer from GGUF: {t_tok:.1f} s)")

    topics = ["the capital of France", "the sea", "gravity", "prime numbers", "photosynthesis", "the moon",
              "volcanoes", "a bicycle"]
    asks = ["Tell me about {}.", "Write a haiku about {}.", "Explain {} to a child.", "List three facts about {}."]
    prompts = [a.format(t) for t in topics for a in asks]  # 32 distinct prompts
    ids = [chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    if args.task_prompts:
        from jaxft.data.task import make_examples, prompt_and_answer

        task = [chat_prompt(tok, prompt_and_answer(r)[0]) for r in make_examples(64, seed=0)]
        ids = [p for p in task for _ in range(args.task_prompts)]
    graphdef, state = nnx.split(model)
    # transformers' defaults from the GGUF's generation config would add top-k / top-p: switch them off.
    sample_kw = (dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature
                 else dict(do_sample=False))
    gen = lambda b, s: generate(graphdef, (state,), b, eos_ids={-1}, sampling=s).ids()  # noqa: E731
    n = args.new_tokens
    sampling = Sampling(temperature=args.temperature, max_new_tokens=n)
    what = f"sampled at temperature {args.temperature:g}" if args.temperature else "greedy decode"
    src = f"task prompts x {args.task_prompts}" if args.task_prompts else "short chat prompts"
    print(f"\n{what}, {n} new tokens, {src}, median of {args.repeats}")
    print(f"{'batch':>5}  {'jaxft tok/s':>12}  {'transformers tok/s':>18}  {'ratio':>6}  {'jaxft 1st call (compile)':>24}")
    for b in map(int, args.batches.split(",")):
        batch = ids[:b]
        t_first, _ = timed(lambda: gen(batch, sampling), 1)
        t_j, out = timed(lambda: gen(batch, sampling), args.repeats)
        assert all(len(o) == n for o in out)
        P = max(map(len, batch))
        inp = torch.zeros((b, P), dtype=torch.long)
        mask = torch.zeros_like(inp)
        for i, p in enumerate(batch):
            inp[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1

        # EOS neither stops a row nor is masked on either side: min_new_tokens would set its logit to -inf until
        # the n-th token, so transformers would take the runner-up where jaxft takes EOS (scripts/greedy_ties.py)
        cfg = GenerationConfig(max_new_tokens=n, pad_token_id=0, **sample_kw)

        def run_hf():
            with torch.no_grad():
                return hf.generate(input_ids=inp, attention_mask=mask, generation_config=cfg)

        t_h, ref = timed(run_hf, args.repeats)
        assert ref.shape[1] - P == n
        same = (f"{sum(o == r for o, r in zip(out, ref[:, P:].tolist()))}/{b} rows identical" if not args.temperature
                else f"prompt {P} tokens, padded")
        print(f"{b:>5}  {b * n / t_j:>12.1f}  {b * n / t_h:>18.1f}  {t_h / t_j:>5.2f}x  {t_first:>22.1f} s"
              f"   ({same})")


if __name__ == "__main__":
    main()
