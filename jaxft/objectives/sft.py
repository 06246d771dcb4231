"""Supervised fine-tuning: next-token cross-entropy on packed examples (jaxft.data.encode.Batches, or under
data.streaming jaxft.data.stream's batches, whose position checkpoints save)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from jaxft.data.encode import Batches, load_examples
from jaxft.data.stream import Stream, StreamBatches
from jaxft.distributed import gathered
from jaxft.errors import JaxftError
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
    if train and run.data.streaming:
        source = StreamSource(run, setup.tokenizer, say, wrap)
    elif train:
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


class StreamSource:
    """The BatchSource of a streamed run: prefetched global batches of this process's stream, and the
    position after a step's batches (`data_state`: every process's, gathered) that checkpoints save."""

    def __init__(self, run, tokenizer, say, wrap):
        B, self.accum = run.train.batch_size, run.train.grad_accum
        self.local = StreamBatches(B, run.data.max_length)
        batches = wrap(self.local)
        lo, hi = process_rows(batches, B)
        say(f"train data: streaming {run.data.train} ({run.data.stream_window:,}-row windows, "
            "tokenized and packed ahead of the step; counts at each epoch's end)")
        self.local.open(Stream(run.data, tokenizer, hi - lo, jax.process_index(), jax.process_count(), say), lo,
                        keep=self.accum)
        self.prefetched = Prefetched(lambda step: batches.step(step - 1, self.accum), len(batches))

    def __call__(self, step: int, params=None) -> dict:
        return self.prefetched(step, params)

    def __len__(self) -> int:
        return len(self.prefetched)

    def data_state(self, step: int) -> dict:
        """After step `step`: {"processes": [each process's stream position]} (a collective call)."""
        return {"processes": gathered(self.local.state(step * self.accum))}

    def load_data_state(self, state, step: int) -> None:
        n = jax.process_count()
        got = state.get("processes") if isinstance(state, dict) else None
        if not isinstance(got, list) or len(got) != n:
            raise JaxftError(f"checkpoint {step}: its data position is not that of a stream read by {n} process(es) "
                             "(saved without data.streaming, or by another number of processes); resume as it was "
                             "saved, or --restart")
        self.local.restore(got[jax.process_index()], step * self.accum)

    def close(self) -> None:
        self.prefetched.close()
        self.local.stream.close()


def process_rows(batches, batch_size: int) -> tuple[int, int]:
    """The global batch rows [lo, hi) this process holds (all of them without a mesh)."""
    if not hasattr(batches, "mesh"):
        return 0, batch_size
    idx = NamedSharding(batches.mesh, batches.rows).addressable_devices_indices_map((batch_size,))
    spans = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in idx.values()})
    lo, hi = spans[0][0], max(end for _, end in spans)
    if sum(end - start for start, end in spans) != hi - lo or (jax.process_count() > 1 and hi - lo == batch_size):
        raise JaxftError(f"data.streaming: this process holds rows {spans} of the batch of {batch_size}, not one "
                         "share of it; with several processes train.batch_size must divide over the mesh's data x "
                         "fsdp devices")
    return lo, hi

