"""Multi-adapter SFT (config `adapters:`): N LoRA adapters trained at once against one frozen base.

Every micro-batch mixes rows of every adapter: adapter n's rows are exactly the micro-batch its own
one-adapter run would see (its file, data.* settings, batch_size rows, its seed's order), stacked in
adapter order, each row tagged with its adapter id:

    tokens, positions, segment_ids, targets, loss_mask [B·N, S]; adapter_ids [B·N] int32;
    adapter_targets [B·N] fp32 — the targets of the row's adapter over the whole optimizer step

The loss is Σ_n (sum_n / targets_n): each adapter's mean over its own targets, so the gradient of
adapter n equals its one-adapter run's (its rows reach only its slice of the bank), and with
jaxft.optim.bank_optimizer (per-adapter clipping and learning rate) the trained adapters
equal N separate runs. The step's count is 1/A per micro-batch, so the loop's single division is by 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxft.data.encode import Batches, load_examples
from jaxft.losses import sft_loss, token_logprobs
from jaxft.objective import Objective, Prefetched, make_eval_step, mean_over_batches, perplexity


class MixedBatches:
    """Micro-batch i = the concatenation of each adapter's Batches.batch(i), rows tagged with adapter ids.

    accum: micro-batches per optimizer step, for adapter_targets (the step's totals per adapter)."""

    row_subsets = False  # adapter_targets needs the whole step: every process assembles whole micro-batches

    def __init__(self, per_adapter: list, accum: int = 1):
        self.parts, self.accum = per_adapter, accum
        self.batch_size = sum(b.batch_size for b in per_adapter)
        self.seq_len = per_adapter[0].seq_len
        self._totals: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(len(b) for b in self.parts)

    def _step_totals(self, i: int) -> np.ndarray:
        """Targets per adapter [N] over the optimizer step that micro-batch i belongs to."""
        g = i // self.accum
        cached = self._totals
        if cached is None or cached[0] != g:
            tot = [sum(float(b.batch(j)["loss_mask"].sum()) for j in range(g * self.accum, (g + 1) * self.accum))
                   for b in self.parts]
            cached = (g, np.asarray(tot, np.float32))
            self._totals = cached
        return cached[1]

    def batch(self, i: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        parts = [b.batch(i) for b in self.parts]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        ids = np.concatenate([np.full(b.batch_size, n, np.int32) for n, b in enumerate(self.parts)])
        out["adapter_ids"] = ids
        out["adapter_targets"] = self._step_totals(i)[ids]
        return {k: v[rows] for k, v in out.items()}


def make_loss(names: tuple[str, ...], accum: int = 1):
    """(model, micro-batch, ctx) → (Σ_n sum_n / targets_n, 1 / accum, {loss_<name>: sum_n / targets_n})."""
    N = len(names)

    def loss_fn(model, batch, ctx):
        ids = batch["adapter_ids"]  # [B]
        ctx = dataclasses.replace(ctx, adapter_ids=ids)
        h, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], ctx=ctx)
        lp = token_logprobs(model, h, batch["targets"])  # [B, S]
        row = -jnp.sum(lp * batch["loss_mask"].astype(jnp.float32), axis=1)  # [B]
        onehot = (ids[:, None] == jnp.arange(N)).astype(jnp.float32)  # [B, N]
        sums = jnp.sum(onehot * row[:, None], axis=0)  # [N]
        totals = jnp.max(onehot * batch["adapter_targets"][:, None], axis=0)  # [N]
        per = sums / jnp.maximum(totals, 1.0)
        return jnp.sum(per), jnp.asarray(1.0 / accum, jnp.float32), {f"loss_{n}": per[i] for i, n in enumerate(names)}

    return loss_fn


def make(run, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """Mixed multi-adapter batches, the per-adapter loss, and a validation loss per adapter."""
    names = tuple(a.name for a in run.adapters)

    def batches(spec, split: str):
        data = dataclasses.replace(run.data, train=spec.train, validation=spec.validation)
        examples, report = load_examples(data, setup.tokenizer, split)
        say(f"{spec.name} {split} data: {report.summary()}")
        return Batches(examples, run.train.batch_size, run.data.max_length, run.data.packing, data.seed)

    source = None
    loss_fn = make_loss(names, run.train.grad_accum)
    if train:
        mixed = wrap(MixedBatches([batches(a, "train") for a in run.adapters], run.train.grad_accum))
        source = Prefetched(lambda step: mixed.step(step - 1, run.train.grad_accum), len(mixed))
    evaluate = None
    judged = [(n, a) for n, a in enumerate(run.adapters) if a.validation]  # each adapter with its own validation
    unjudged = [a.name for a in run.adapters if not a.validation]
    if train and unjudged:  # said once, at the start: no eval_loss_<name> for these
        say(f"validation: {', '.join(unjudged)} {'has' if len(unjudged) == 1 else 'have'} no validation file "
            f"(adapters[i].validation): " + (f"eval_loss_<name> is logged for {', '.join(a.name for _, a in judged)} "
                                            "only" if judged else "no validation loss is logged"))
    if judged:
        vals = [(n, a.name, MixedBatches([batches(a, "validation")])) for n, a in judged]
        eval_step = make_eval_step(setup.graphdef, single_adapter_loss)

        def evaluate(params, frozen):
            out = {}
            for n, name, val in vals:
                tagged = Tagged(val, n)
                r = mean_over_batches(eval_step, params, frozen, tagged, run.train.eval_batches, "eval_tokens")
                out[f"eval_loss_{name}"] = r["eval_loss"]
                out[f"eval_ppl_{name}"] = perplexity(r["eval_loss"])
            out["eval_loss"] = float(np.mean([out[f"eval_loss_{name}"] for _, name, _ in vals]))
            return out

    return Objective(name="sft", train=source, loss_fn=loss_fn, evaluate=evaluate, count_name="targets",
                     metrics=tuple(f"loss_{n}" for n in names),
                     headline=tuple(f"eval_loss_{a.name}" for _, a in judged),
                     heldout=judged[0][1].validation if judged else None)


def single_adapter_loss(model, batch, ctx):
    """An evaluation batch of one adapter as (sum, count): the plain SFT loss with that adapter's ids."""
    return sft_loss(model, batch, dataclasses.replace(ctx, adapter_ids=batch["adapter_ids"]))


class Tagged:
    """One adapter's validation batches with its id on every row."""

    def __init__(self, mixed: MixedBatches, n: int):
        self.mixed, self.n = mixed, n

    def __len__(self) -> int:
        return len(self.mixed)

    def batch(self, i: int) -> dict:
        b = dict(self.mixed.batch(i))
        b["adapter_ids"] = np.full_like(b["adapter_ids"], self.n)
        b.pop("adapter_targets")
        return b
