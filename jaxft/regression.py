"""Teacher-forced comparison of models on one set of answers: the regression check of `jaxft eval` (tuned vs
base on the base's own greedy answers to general prompts) and the export check (an exported artifact vs the
fp32 tuned model on the tuned model's answers to the held-out prompts).

    prompts, answers = greedy_answers(Variant(graphdef, (p0, f)), tokenizer, chats, eos=eos, max_new_tokens=48,
                                      batch_size=8)
    batches = answer_batches(prompts, answers, batch_size=8, length=48)
    figures = divergences(Variant(graphdef, (p0, f)), {"tuned": Variant(graphdef, (p1, f))}, batches, prefix="reg_")

One jitted forward (`answer_logsoftmax`) per variant and batch, every batch the same shape: one compile per
model structure, whatever the weights. The maths is jaxft.divergence's.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.context import ON, Ctx
from jaxft.divergence import summarize, token_parts
from jaxft.generate import Sampling, chat_prompt, generate, with_system
from jaxft.sharding import to_host

PROMPT_BUCKET = 32  # prompt widths round up to this: the widest prompt of the set fixes one shape for all batches


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model to compare: nnx.merge(graphdef, *weights); adapter: with an adapter bank, the adapter id of every
    row (-1: the base)."""

    graphdef: object
    weights: tuple
    adapter: int | None = None

    def ctx(self, rows: int) -> Ctx:
        return ON if self.adapter is None else Ctx(adapter_ids=jnp.full((rows,), self.adapter, jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "length"))
def answer_logsoftmax(weights, tokens, positions, segment_ids, ctx: Ctx = ON, *, graphdef, length: int):
    """Full log-softmax [B, length, V] fp32 at the positions that predict the last `length` tokens of
    tokens / positions / segment_ids [B, P + length] (the answers, after left-padded prompts)."""
    model = nnx.merge(graphdef, *weights)
    h, _ = model.hidden(tokens, positions, segment_ids, ctx=ctx)
    return jax.nn.log_softmax(model.logits(h[:, -length - 1:-1]).astype(jnp.float32), axis=-1)


def greedy_answers(v: Variant, tokenizer, chats: list[list[dict]], *, eos: set[int], max_new_tokens: int,
                   batch_size: int, system_prompt: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy answer ids) per chat, as `jaxft.generate.answer_chats` renders and answers them, but
    as token ids: the EOS that ended an answer is kept (whether a model stops is part of its answer)."""
    prompts = [chat_prompt(tokenizer, with_system(m, system_prompt)) for m in chats]
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        g = generate(v.graphdef, v.weights, chunk, eos_ids=eos, sampling=Sampling(max_new_tokens=max_new_tokens),
                     ctx=v.ctx(len(chunk)))
        answers += [row[:n].tolist() for row, n in zip(g.tokens, g.lengths)]
    return prompts, answers


def answer_batches(prompts: list[list[int]], answers: list[list[int]], batch_size: int, length: int) -> list[dict]:
    """Rows of prompt + answer in batches of one shape: tokens / positions / segment_ids [batch_size, P + length]
    (prompts left-padded to P, answers right-padded), targets / mask [batch_size, length]. The last batch is
    filled with copies of its first row, masked out. Answers longer than `length` are cut."""
    P = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = list(zip(prompts[i:i + batch_size], answers[i:i + batch_size]))
        real = len(rows)
        rows += [rows[0]] * (batch_size - real)
        tokens = np.zeros((batch_size, P + length), np.int32)
        seg = np.zeros_like(tokens)
        mask = np.zeros((batch_size, length), bool)
        for r, (p, a) in enumerate(rows):
            a = a[:length]
            tokens[r, P - len(p):P], tokens[r, P:P + len(a)] = p, a
            seg[r, P - len(p):P + len(a)] = 1
            mask[r, :len(a)] = r < real
        pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
        out.append(dict(tokens=tokens, positions=pos, segment_ids=seg, targets=tokens[:, P:], mask=mask))
    return out


def text_windows(ids: list[int], length: int, limit: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """A text's token ids as (prompts, answers) for answer_batches: consecutive windows of length + 1 tokens whose
    first token is the context and the rest are scored, so every token after the first of each window is
    predicted exactly once; the first `limit` windows (0 = all)."""
    starts = range(0, max(len(ids) - 1, 0), length)
    windows = [ids[i:i + length + 1] for i in (starts if not limit else starts[:limit])]
    return [w[:1] for w in windows], [w[1:] for w in windows]


def logsoftmax(v: Variant, batch: dict) -> np.ndarray:
    """answer_logsoftmax of one variant on one batch, on the host [B, L, V]."""
    return to_host(answer_logsoftmax(v.weights, batch["tokens"], batch["positions"], batch["segment_ids"],
                                     v.ctx(batch["tokens"].shape[0]),
                                     graphdef=v.graphdef, length=batch["targets"].shape[1]))


def divergences(ref: Variant, others: dict[str, Variant], batches: list[dict], prefix: str = "") -> dict[str, dict]:
    """{name: jaxft.divergence.summarize figures of that variant against `ref`} over every batch (teacher
    forced on the batches' answers). One batch's [B, L, V] log-probs are held at a time."""
    parts: dict[str, list] = {k: [] for k in others}
    for b in batches:
        ref_lp = logsoftmax(ref, b)
        for k, v in others.items():
            parts[k].append(token_parts(ref_lp, logsoftmax(v, b), b["targets"], b["mask"]))
    return {k: summarize(p, prefix) for k, p in parts.items()}
