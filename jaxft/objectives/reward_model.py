"""Reward models: Bradley–Terry on preference pairs with a ScoreModel (TRL RewardTrainer's definitions),
(the scorer of a trained reward model: jaxft.scoring).

    loss_fn = make_loss(run.reward)        # (model, batch, ctx) → (sum of pair losses, pairs, metric sums)
    obj = make(run, setup, say)            # a jaxft.objective.Objective

Chosen and rejected run in one forward pass (PairBatches' [2B, S]: chosen rows, then rejected rows);
r = the score at each row's last non-pad token (jaxft.models.heads). Per pair, with the row's optional
`margin` m and c = reward.center_rewards_coefficient:

    loss      −log σ(r_c − r_r − m)  (+ c · (r_c + r_r)²  when c is set; TRL adds c · mean((r_c + r_r)²))
              with a `confidence` column p (soft labels, e.g. `jaxft cai label`): −p log σ(d) − (1 − p) log σ(−d),
              d = r_c − r_r − m
    accuracy  r_c > r_r (strict: a tie counts 0)       margin  r_c − r_r       mean_reward  (r_c + r_r) / 2

min_reward / max_reward are extrema, not sums. In training (per step) they are the smallest / largest of
the 2B scores of each micro-batch, averaged over the step's micro-batches weighted by pairs: with
grad_accum = 1 the step's batch extremum, and TRL's per-micro-batch value averaged over a logging window.
In evaluation, eval_min_reward / eval_max_reward are the extrema over every evaluated score.

Pairs longer than data.max_length (either side) are dropped and counted, as TRL drops them (no truncation).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config import DpoConfig, RewardConfig, RunConfig
from jaxft.context import ON, Ctx
from jaxft.data.pairs import PairBatches, load_pairs
from jaxft.objective import Objective, Prefetched, mean_over_batches
from jaxft.sharding import to_host

METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")
PAIRS = DpoConfig(truncate_prompt=False)  # TRL drops over-length pairs: no prompt truncation


def pair_losses(chosen, rejected, margin=None, center: float | None = None, soft=None):
    """Per-pair losses [B] and per-pair metrics {name: [B]} from the scores r_c, r_r [B] (fp32).
    soft = (p, 1 − p) [B], the pairs' soft labels: the Bradley–Terry cross-entropy −p log σ(d) − (1−p) log σ(−d)."""
    delta = chosen - rejected
    d = delta if margin is None else delta - margin
    if soft is None:
        loss = -jax.nn.log_sigmoid(d)
    else:
        loss = -soft[0] * jax.nn.log_sigmoid(d) - soft[1] * jax.nn.log_sigmoid(-d)
    if center is not None:
        loss = loss + center * (chosen + rejected) ** 2
    return loss, {"accuracy": (chosen > rejected).astype(delta.dtype), "margin": delta,
                  "mean_reward": (chosen + rejected) / 2}


def _forward(model, batch: dict, ctx: Ctx, center):
    """(loss sum, pairs, metric sums, scores [2B] with NaN on the empty rows) of a pair batch."""
    m = batch["pair_mask"]  # [B]
    B = m.shape[0]
    r = model(batch["tokens"], batch["positions"], batch["segment_ids"], ctx)  # [2B] fp32
    soft = (batch["confidence"], batch["smoothing"]) if "confidence" in batch else None
    losses, per_pair = pair_losses(r[:B], r[B:], batch.get("margin"), center, soft)
    pairs = jnp.sum(m)
    sums = {k: jnp.sum(v * m) for k, v in per_pair.items()}
    real = jnp.concatenate([m, m]) > 0
    some = pairs > 0  # an all-empty micro-batch has no extrema: it adds 0 (weight 0) instead of ±inf
    sums["min_reward"] = jnp.where(some, jnp.min(jnp.where(real, r, jnp.inf)), 0.0) * pairs
    sums["max_reward"] = jnp.where(some, jnp.max(jnp.where(real, r, -jnp.inf)), 0.0) * pairs
    return jnp.sum(losses * m), pairs, sums, jnp.where(real, r, jnp.nan)


def make_loss(cfg: RewardConfig):
    """loss_fn(model, batch, ctx) → (sum of pair losses, number of pairs, {metric: sum over pairs})."""

    def loss_fn(model, batch, ctx: Ctx = ON):
        return _forward(model, batch, ctx, cfg.center_rewards_coefficient)[:3]

    return loss_fn


def make_eval_fn(graphdef, cfg: RewardConfig):
    """(params, frozen, batch) → (sum, pairs, metric sums, scores [2B]): the loss plus the scores, whose
    extrema over the whole validation set are eval_min_reward / eval_max_reward."""
    return jax.jit(lambda p, f, b: _forward(nnx.merge(graphdef, p, f), b, Ctx(), cfg.center_rewards_coefficient))


def evaluator(eval_fn, batches, n: int):
    """evaluate(params, frozen) → eval_loss, eval_<metric> (means over pairs), true extrema, eval_pairs."""

    def evaluate(params, frozen):
        seen = []

        def step(p, f, b):
            s, c, sums, r = eval_fn(p, f, b)
            seen.append(r)
            return s, c, sums

        out = mean_over_batches(step, params, frozen, batches, n, "eval_pairs")
        r = np.concatenate([to_host(x) for x in seen])
        out["eval_min_reward"], out["eval_max_reward"] = float(np.nanmin(r)), float(np.nanmax(r))
        return out

    return evaluate


# ---------------------------------------------------------------- the objective


def pair_batches(run: RunConfig, setup, split: str, batch_size: int, say=lambda *a: None):
    """The split's PairBatches (None for an unconfigured validation split); over-length pairs dropped."""
    pairs, report = load_pairs(run.data, PAIRS, setup.tokenizer, split)
    if not pairs:
        return None
    say(f"{split} pairs: {report.summary()}")
    return PairBatches(pairs, batch_size, run.data.max_length, run.data.seed)


def make(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The reward-model objective: pair batches, the Bradley–Terry loss, validation (eval_loss,
    eval_accuracy, eval_margin, eval_{min,mean,max}_reward, eval_pairs)."""
    loss_fn = make_loss(run.reward)
    source = None
    if train:
        b = wrap(pair_batches(run, setup, "train", run.train.batch_size, say))
        source = Prefetched(lambda step: b.step(step - 1, run.train.grad_accum), len(b))
    val = pair_batches(run, setup, "validation", run.train.batch_size, say)
    evaluate = None
    if val is not None:
        evaluate = evaluator(make_eval_fn(setup.graphdef, run.reward), wrap(val), run.train.eval_batches)
    return Objective(name="reward", train=source, loss_fn=loss_fn, evaluate=evaluate, count_name="pairs",
                     metrics=METRICS, headline=("eval_accuracy", "eval_margin"))
