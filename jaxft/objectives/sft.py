"""Supervised fine-tuning: next-token cross-entropy on packed examples (jaxft.data.encode.Batches)."""

from __future__ import annotations

from jaxft.data.encode import Batches, load_examples
from jaxft.losses import sft_loss
from jaxft.objective import Objective, Prefetched, make_eval_step, mean_over_batches, perplexity
from jaxft.objectives.multi import make as make_multi


def has_validation(run) -> bool:
    return run.data.validation is not None or run.data.validation_fraction > 0


def make(run, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """SFT batches (each wrapped by `wrap`, e.g. into sharded global batches), loss and validation."""
    if run.adapters:  # several adapters at once (jaxft.objectives.multi)
        return make_multi(run, setup, say, wrap, train)

    def batches(split: str, batch_size: int):
        examples, report = load_examples(run.data, setup.tokenizer, split)
        say(f"{split} data: {report.summary()}")
        return wrap(Batches(examples, batch_size, run.data.max_length, run.data.packing, run.data.seed))

    source = None
    if train:
        b = batches("train", run.train.batch_size)
        source = Prefetched(lambda step: b.step(step - 1, run.train.grad_accum), len(b))
    evaluate = None
    if has_validation(run):
        val, eval_step = batches("validation", run.train.batch_size), make_eval_step(setup.graphdef, sft_loss)

        def evaluate(params, frozen):
            r = mean_over_batches(eval_step, params, frozen, val, run.train.eval_batches, "eval_tokens")
            return dict(eval_loss=r["eval_loss"], eval_ppl=perplexity(r["eval_loss"]), eval_tokens=r["eval_tokens"])

    return Objective(name="sft", train=source, loss_fn=sft_loss, evaluate=evaluate, count_name="targets",
                     headline=("eval_ppl",), heldout=run.data.validation)
