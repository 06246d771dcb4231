"""Where jaxft's and transformers' batched greedy decodes of the example model part, and how close a call it was.

    python scripts/greedy_ties.py [--batches 8,32] [--new-tokens 64] [--masked-eos] [--alone]

Both sides decode scripts/bench_generate.py's 32 short chat prompts greedily (EOS ignored, left-padded batches,
float32, the same Q4_1 GGUF dequantized). For every row where the two token streams differ, at the first differing
step it prints the top-2 logit margin (top-1 minus top-2) of each side's own batched decode step and of one
unpadded forward of each side over the shared prefix, and which token each side picked; also whether each side's
batched row equals its own unbatched decode of that prompt (--alone). A difference "starts at a near tie" when both sides'
margins there are below the stated bound (--bound, default 0.05 logits): two float32 programs that sum in a
different order (different kernels, batch shapes, padding) may then pick different tokens, and the rest of the
row follows from that pick.
"""

import argparse
import json
import sys

import jax
import numpy as np
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from jaxft.example import example_model
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.generate import Sampling, chat_prompt, generate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import cpu_flags  # noqa: E402

EOS = None  # the model's EOS id (its generation config's), for --masked-eos
TOPICS = ["the capital of France", "the sea", "gravity", "prime numbers", "photosynthesis", "the moon",
          "volcanoes", "a bicycle"]
ASKS = ["Tell me about {}.", "Write a haiku about {}.", "Explain {} to a child.", "List three facts about {}."]


def hf_greedy(hf, batch, n, with_scores=False, masked_eos=False):
    """transformers' greedy decode of n tokens. masked_eos: as scripts/bench_generate.py did before this script's
    finding, `min_new_tokens=n`, which sets the EOS logit to -inf until n tokens are out; else EOS is neither
    a stop nor masked (generation config without eos_token_id), as jaxft's eos_ids={-1}."""
    from transformers import GenerationConfig

    P = max(map(len, batch))
    inp = torch.zeros((len(batch), P), dtype=torch.long)
    mask = torch.zeros_like(inp)
    for i, p in enumerate(batch):
        inp[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    eos = dict(eos_token_id=EOS, min_new_tokens=n) if masked_eos else {}
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=with_scores,
                           return_dict_in_generate=True, **eos)
    with torch.no_grad():
        out = hf.generate(input_ids=inp, attention_mask=mask, generation_config=cfg)
    toks = out.sequences[:, P:].tolist()
    logits = torch.stack(out.logits, 1).float().numpy() if with_scores else None  # [B, n, V]
    return toks, logits


def margin(z):
    top = np.sort(z)[-2:]
    return float(top[1] - top[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bound", type=float, default=0.05, help="a near tie: top-2 margin below this (logits)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--masked-eos", action="store_true",
                    help="transformers with min_new_tokens (EOS masked until the last token), as bench_generate.py was")
    ap.add_argument("--alone", action="store_true", help="also decode each row alone on both sides")
    args = ap.parse_args()
    path = example_model()
    print(f"model: {path.name}  jax {jax.__version__}  torch {torch.__version__}  cpu flags: {' '.join(cpu_flags())}")
    tok = load_tokenizer(path)
    model = load_pretrained(path)
    graphdef, state = nnx.split(model)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    global EOS
    EOS = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None  # else generate() takes it back from the model as a default
    ids = [chat_prompt(tok, [{"role": "user", "content": a.format(t)}]) for t in TOPICS for a in ASKS]
    n = args.new_tokens

    def jx_greedy(batch):
        return generate(graphdef, (state,), batch, eos_ids={-1}, sampling=Sampling(max_new_tokens=n)).tokens.tolist()

    def jx_logits(seq):  # one unpadded forward: the logits after the last token
        z, _ = model(jax.numpy.asarray([seq]))
        return np.asarray(z[0, -1], np.float32)

    def hf_logits(seq):
        with torch.no_grad():
            return hf(torch.tensor([seq])).logits[0, -1].float().numpy()

    rows = range(max(map(int, args.batches.split(",")))) if args.alone else range(0)
    alone_jx = {i: jx_greedy([ids[i]])[0] for i in rows}
    alone_hf = {i: hf_greedy(hf, [ids[i]], n, masked_eos=args.masked_eos)[0][0] for i in rows}
    report, worst = [], 0.0
    for b in map(int, args.batches.split(",")):
        batch = ids[:b]
        got, (want, want_logits) = jx_greedy(batch), hf_greedy(hf, batch, n, True, args.masked_eos)
        same = sum(g == w for g, w in zip(got, want))
        print(f"\nbatch {b}: {same}/{b} rows identical" + (
              f"; jaxft batched == jaxft alone on {sum(got[i] == alone_jx[i] for i in range(b))}/{b}, transformers "
              f"batched == transformers alone on {sum(want[i] == alone_hf[i] for i in range(b))}/{b}" if args.alone
              else ""), flush=True)
        for i, (g, w) in enumerate(zip(got, want)):
            if g == w:
                continue
            t = next(k for k in range(n) if g[k] != w[k])
            prefix = ids[i] + g[:t]
            zj, zh = jx_logits(prefix), hf_logits(prefix)
            row = dict(batch=b, row=i, step=t, jaxft_token=g[t], hf_token=w[t],
                       margin_hf_batched=margin(want_logits[i, t]), margin_jaxft_alone=margin(zj),
                       margin_hf_alone=margin(zh), gap_jaxft_alone=float(zj[g[t]] - zj[w[t]]),
                       gap_hf_alone=float(zh[g[t]] - zh[w[t]]), max_logit_diff_alone=float(np.abs(zj - zh).max()))
            worst = max(worst, row["margin_hf_batched"], abs(row["gap_jaxft_alone"]), abs(row["gap_hf_alone"]))
            report.append(row)
            print(f"  row {i:2d}: first difference at step {t:2d}: jaxft {tok.decode([g[t]])!r} vs transformers "
                  f"{tok.decode([w[t]])!r}; top-2 margin: transformers batched {row['margin_hf_batched']:.4f}, "
                  f"jaxft alone {row['margin_jaxft_alone']:.4f}, transformers alone {row['margin_hf_alone']:.4f}; "
                  f"logit(jaxft's) - logit(transformers') alone: jaxft {row['gap_jaxft_alone']:+.4f}, "
                  f"transformers {row['gap_hf_alone']:+.4f}; max |logit diff| alone {row['max_logit_diff_alone']:.2e}")
    verdict = all(abs(r["gap_jaxft_alone"]) < args.bound and abs(r["gap_hf_alone"]) < args.bound
                  and r["margin_hf_batched"] < args.bound for r in report)
    print(f"\n{len(report)} differing rows; largest margin / gap at a first difference: {worst:.4f} logits; "
          f"all near ties (< {args.bound}): {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=report, bound=args.bound, all_near_ties=verdict), f, indent=1)


if __name__ == "__main__":
    main()
