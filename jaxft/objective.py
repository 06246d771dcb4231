"""What an objective gives the training loop. The loop (jaxft.train) knows this protocol, never an
objective by name; objectives live in jaxft.objectives, one module each, picked from a plain table.

    obj = OBJECTIVES[run.objective](run, setup, say, wrap)      # jaxft.objectives
    batch = obj.train(step, params)                              # micro-batches [A, B, ...], placed
    (sum, count, {metric: sum}) = obj.loss_fn(model, micro_batch, ctx)
    obj.evaluate(params, frozen) → {"eval_loss": …, …}           # None without a validation split

Losses return sums: the step divides once by the summed count (tokens, pairs, sequences), so
accumulation, packing and multi-host reductions weigh every counted unit the same.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Any, Callable, Protocol

import jax
from flax import nnx

from jaxft.context import Ctx
LossOut = tuple[jax.Array, jax.Array, dict[str, jax.Array]]  # (sum, count, {metric: sum}) — divided by the step


class BatchSource(Protocol):
    def __call__(self, step: int, params) -> dict[str, jax.Array]:
        """The micro-batches [A, B, ...] of optimizer step `step` (1-based), already placed on the mesh.
        `params` are the current trainable weights: an on-policy source generates from them."""

    def __len__(self) -> int:
        """Micro-batches per epoch (recorded in checkpoints)."""

    def close(self) -> None: ...

    # Optional: `host_metrics(step) -> {name: float}`, measured by the source itself (an on-policy source's
    # rewards, completion lengths and rollout time), logged with step `step`'s row.
    # Optional: `data_state(step) -> JSON` and `load_data_state(state, step)`: a source whose position is not a
    # function of the step (a stream) gives it for the checkpoint of step `step`, and is put back there on resume.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    name: str  # for logs only
    train: BatchSource
    loss_fn: Callable[[nnx.Module, dict, Ctx], tuple]  # (model, micro-batch, ctx) → (sum, count[, metric sums])
    evaluate: Callable[[Any, Any], dict[str, float]] | None = None  # (trainable, frozen) → {"eval_loss": …}
    count_name: str = "targets"  # what `count` counts, as the logs name it
    metrics: tuple[str, ...] = ()  # the loss's metric names, logged per step
    headline: tuple[str, ...] = ()  # eval metrics printed next to the validation loss
    heldout: str | None = None  # default file of held-out chat rows for `jaxft eval`'s generation metric
    progress: tuple[str, ...] = ()  # step metrics shown on the progress bar next to the loss (RL: reward, kl)


class Prefetched:
    """A BatchSource over a deterministic batch stream: `fetch(step)` for steps start, start+1, ... is
    built on a background thread, ahead of the step that needs it; the weights are ignored."""

    def __init__(self, fetch: Callable[[int], dict], length: int, depth: int = 2):
        self.fetch, self.length, self.depth = fetch, length, depth
        self.q: queue.Queue | None = None
        self.next_step = None
        self.stop = False

    def __len__(self) -> int:
        return self.length

    def _start(self, step: int):
        self.close()
        self.q, self.stop, self.next_step = queue.Queue(maxsize=self.depth), False, step

        def work(q=self.q):
            s = step
            while not self.stop:
                try:
                    q.put(self.fetch(s))
                except BaseException as e:  # hand it to the loop instead of leaving it waiting forever
                    q.put(e)
                    return
                s += 1

        threading.Thread(target=work, daemon=True).start()

    def __call__(self, step: int, params=None) -> dict:
        if self.q is None or step != self.next_step:  # the first call, or a jump: restart the stream there
            self._start(step)
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        self.next_step = step + 1
        return item

    def close(self):
        self.stop = True
        if self.q is not None:
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass


def make_eval_step(graphdef, loss_fn: Callable):
    """(params, frozen, batch [B, ...]) → loss_fn's (sum, count[, metric sums]), adapters on, no dropout."""
    return jax.jit(lambda params, frozen, batch: loss_fn(nnx.merge(graphdef, params, frozen), batch, Ctx()))


def mean_over_batches(eval_step, params, frozen, batches, n: int, count_key: str) -> dict[str, float]:
    """The one definition of a validation measurement: over the first n batches (0: all) of a
    deterministic stream, eval_loss = Σ loss / Σ count and eval_<metric> = Σ metric / Σ count, with the
    count itself under `count_key`."""
    n = len(batches) if n == 0 else min(n, len(batches))
    s = c = 0.0
    sums: dict[str, float] = {}
    for i in range(n):
        bs, bc, *aux = jax.device_get(eval_step(params, frozen, batches.batch(i)))
        s, c = s + float(bs), c + float(bc)
        for k, v in (aux[0] if aux else {}).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    c1 = max(c, 1.0)
    return dict(eval_loss=s / c1, **{f"eval_{k}": v / c1 for k, v in sums.items()}, **{count_key: int(c)})


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
