"""Generated tokens/s of `jaxft cai` revise and label next to transformers' `generate`, on the same prompts.

    python scripts/bench_cai.py [--prompts 16] [--new-tokens 48] [--repeats 1]

The example SmolLM2-135M-Instruct (the GGUF, fp32 on both sides), the quickstart task's prompts with the
task constitution. Stages measured at the batch sizes `configs/cai_task.yaml` uses:
- revise: the initial-answer prompts (few-shot turns + the task prompt) and the critique prompts, cai.batch_size rows;
- label, generation: each prompt twice (2 × cai.batch_size rows);
- label, judging: the feedback prompts (2 principles × 2 orders per pair), cai.label_batch_size per call:
  prompt tokens/s of jaxft's option scoring next to a transformers forward of the same batches.
Greedy decoding with EOS ignored, so both sides produce exactly --new-tokens per row (the rows are
compared). The jaxft figure is after a first (compiling) call, whose time is printed too.
"""

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from jaxft.commands import cai
from jaxft.config import load_config
from jaxft.data.constitution import load_constitution
from jaxft.example import example_model
from jaxft.generate import Sampling
from jaxft.data.task import make_examples, prompt_and_answer

from benchlib import timed


def left_pad(rows):
    P = max(map(len, rows))
    inp, mask = torch.zeros((len(rows), P), dtype=torch.long), torch.zeros((len(rows), P), dtype=torch.long)
    for i, p in enumerate(rows):
        inp[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return inp, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    run = load_config("configs/cai_task.yaml", [f"cai.batch_size={args.prompts}"])
    policy = cai.load_policy(run)
    tok = policy.tokenizer
    path = example_model()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"model: {path.name}  torch threads={torch.get_num_threads()}  (a shared, busy CPU: one run each)")
    const = load_constitution(run.cai.constitution)
    prompts = [prompt_and_answer(r)[0] for r in make_examples(args.prompts, seed=0)]
    first = [list(const.few_shot) + p for p in prompts]
    drafts = [[*p, {"role": "assistant", "content": '{"name": "x"}'}] for p in first]
    crit = [cai.critique_turns(d, const.principles[cai.draw_principle(0, i, 0, 5)]) for i, d in enumerate(drafts)]
    n = args.new_tokens
    greedy = Sampling(max_new_tokens=n)
    policy.eos = {-1}  # no early stop: every row decodes n tokens on both sides
    print(f"\n{'stage':<22}{'rows':>5}{'prompt tok':>11}{'jaxft tok/s':>13}{'transformers tok/s':>20}{'ratio':>7}"
          f"{'jaxft 1st call':>16}")
    for name, convs in (("revise: answer", first), ("revise: critique", crit),
                        ("label: 2 answers", [c for c in first for _ in (0, 1)])):
        ids = [tok(cai.render(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
        t_first, _ = timed(lambda: policy.answer(convs, greedy), 1)
        t_j, out = timed(lambda: policy.answer(convs, greedy), args.repeats)
        inp, mask = left_pad(ids)

        def run_hf():
            with torch.no_grad():
                return hf.generate(input_ids=inp, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

        t_h, ref = timed(run_hf, args.repeats)
        same = sum(a["text"] == tok.decode(r, skip_special_tokens=True).strip()
                   for a, r in zip(out, ref[:, inp.shape[1]:].tolist()))
        print(f"{name:<22}{len(ids):>5}{int(np.mean(list(map(len, ids)))):>11}{len(ids) * n / t_j:>13.1f}"
              f"{len(ids) * n / t_h:>20.1f}{t_h / t_j:>6.2f}x{t_first:>14.1f} s   ({same}/{len(ids)} rows identical)")
    qs = [const.principles[k] for k in cai.draw_comparisons(0, 0, 2, 5)]
    texts = [cai.feedback_prompt(tok, p, q.compare, a, b) for p in prompts for q in qs
             for a, b in (('{"name": "A"}', "Sure! Here it is."), ("Sure! Here it is.", '{"name": "A"}'))]
    B = run.cai.label_batch_size
    t_first, _ = timed(lambda: policy.option_logprobs(texts, B), 1)
    t_j, got = timed(lambda: policy.option_logprobs(texts, B), args.repeats)
    opts = cai.option_ids(tok).tolist()

    def run_hf_score():
        out = []
        with torch.no_grad():
            for k in range(0, len(texts), B):
                inp, mask = left_pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts[k:k + B]])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = hf(input_ids=inp, attention_mask=mask, position_ids=pos).logits[:, -1].double()
                out.append(torch.log_softmax(logits, -1)[:, opts].numpy())
        return np.concatenate(out)

    t_h, ref = timed(run_hf_score, args.repeats)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    print(f"{'label: judge (prompt)':<22}{len(texts):>5}{tokens // len(texts):>11}{tokens / t_j:>13.1f}"
          f"{tokens / t_h:>20.1f}{t_h / t_j:>6.2f}x{t_first:>14.1f} s   (max |Δ log p| {np.abs(got - ref).max():.1e})")


if __name__ == "__main__":
    main()
