"""GRPO (objective: grpo; loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, GSPO) and RLOO
(objective: rloo), as TRL 1.16 defines them, on rollouts sampled from the current weights.

    obj = make(run, setup, say, wrap)          # a jaxft.objective.Objective
    obj = make_rloo(run, setup, say, wrap)

Batching as TRL's: train.batch_size completions per micro-batch (per_device_train_batch_size),
train.grad_accum micro-batches per optimizer step (steps_per_generation = gradient_accumulation_steps),
so one generation batch of batch_size × grad_accum completions (its / G prompts) feeds one optimizer
step, and is reused for grpo.num_iterations (μ) steps. Advantages come from the whole generation batch
before it is split; groups stay whole and in order (TRL shuffles rows after computing advantages, which
changes nothing for the sums the step takes except bnpo's per-micro-batch token count).

What the loss returns to the step: (TRL's per-micro-batch loss × N, B, metrics × B), N = the generation
batch's completions, B = the micro-batch's: the step's division by Σ B = N gives exactly the sum of TRL's
per-micro-batch losses (each already divided for accumulation as TRL divides it) and, for every metric, the
mean of TRL's per-micro-batch values (what TRL logs with logging_steps = 1).

Old log-probs: on policy (μ = 1) old = stop_gradient(logp) (a ratio of 1 that carries the gradient, as
TRL); μ > 1 stores them from a forward at rollout time. Reference (beta > 0): see rollout.Reference.
The entropy metric is the sampler's (same weights at μ = 1; at μ > 1 the rollout's, not the current one's).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import RunConfig
from jaxft.config.objectives import group_size, iterations
from jaxft.context import ON, Ctx
from jaxft.data.prompts import load_prompts
from jaxft.objective import Objective
from jaxft.objectives.reward_funcs import load_reward_funcs
from jaxft.objectives.rollout import Reference, RolloutSource, completion_logps, make_forward, per_micro_batch
import jaxft.objectives.policy_gradient as pg

CLIP = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max")
COMPLETIONS = ("completions/mean_length", "completions/min_length", "completions/max_length",
               "completions/clipped_ratio", "completions/mean_terminated_length",
               "completions/min_terminated_length", "completions/max_terminated_length")
TIMES = ("time/rollout", "time/score", "time/wait_train")


def _names(funcs) -> list[str]:
    return [n for n, _ in funcs]


def _weights(run: RunConfig, funcs) -> np.ndarray:
    w = run.rollout.reward_weights
    return np.ones(len(funcs)) if w is None else np.asarray(w, np.float64)


def _source(run, setup, say, wrap, finish):
    prompts, report = load_prompts(run.data, setup.tokenizer, "train")
    say(f"train prompts: {report.summary()}")
    funcs = load_reward_funcs(run.rollout.reward_funcs, run.rollout.max_completion_length)
    src = RolloutSource(run, setup, prompts, funcs, G=group_size(run), iterations=iterations(run),
                        finish=lambda ro, p: finish(src, ro, p), wrap=wrap, say=say)
    return src, funcs


def _metric_names(funcs, extra) -> tuple[str, ...]:
    per_fn = [f"rewards/{n}/{s}" for n in _names(funcs) for s in ("mean", "std")]
    return ("reward", "reward_std", *per_fn, "frac_reward_zero_std", *extra, "entropy", *COMPLETIONS, *TIMES,
            "time/reference")


def _forwards(run, setup, beta: float, say):
    """The jitted no-gradient forward (reference / old log-probs) and the Reference (None when beta = 0)."""
    ref = Reference(run, setup) if beta != 0.0 else None
    if ref is not None:
        say(f"reference: {ref.kind}")
    return make_forward(setup.graphdef, run.rollout.temperature), ref


def _scaled(loss, metrics, mask, n_total):
    """(loss × N, B, metrics × B): see the module docstring."""
    B = mask.shape[0]
    return loss * n_total, jnp.asarray(B, jnp.float32), {k: v * B for k, v in metrics.items()}


def make(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The GRPO objective (TRL GRPOTrainer's loss types, advantages and metrics)."""
    g, T = run.grpo, run.rollout.temperature
    cfg = pg.PgLoss.of(g, run.rollout.max_completion_length)
    A, N = run.train.grad_accum, run.train.grad_accum * run.train.batch_size
    G = group_size(run)

    def loss_fn(model, batch, ctx: Ctx = ON):
        logp = completion_logps(model, batch, ctx, T)  # [B, L]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
        loss, metrics = pg.grpo_loss(logp, old, batch.get("ref_logps"), batch["advantages"], batch["mask"], cfg,
                                     num_items=batch["num_items"][0], ga=A, spg=A, entropy=batch["entropy"])
        return _scaled(loss, metrics, batch["mask"], N)

    source, funcs, ref = None, [], None
    if train:
        forward, ref = _forwards(run, setup, g.beta, say)

        def finish(src, ro, params):
            weights = _weights(run, src.funcs)
            adv, stats = pg.group_advantages(ro.rewards, weights, G, g.scale_rewards, g.multi_objective_aggregation)
            rows = ro.rows()
            rows.update(advantages=adv.astype(np.float32), entropy=ro.entropies,
                        num_items=np.full(N, ro.mask.sum(), np.float32))
            t0 = time.perf_counter()
            if ref is not None:  # once per generation batch, before any update (TRL)
                w, ctx = ref.weights(params)
                rows["ref_logps"] = per_micro_batch(lambda b: forward(w, setup.frozen, b, ctx), rows,
                                                    run.train.batch_size)
            if g.num_iterations > 1:
                rows["old_logps"] = per_micro_batch(lambda b: forward(params, setup.frozen, b, ON), rows,
                                                    run.train.batch_size)
            stats.update(pg.reward_stats(ro.rewards, weights, _names(src.funcs)),
                         **{"time/reference": time.perf_counter() - t0})
            return rows, stats

        source, funcs = _source(run, setup, say, wrap, finish)
        source.forward = forward  # the reference / old-policy forward (its compile count is tested)
    extra = ("kl",) * (g.beta != 0.0) + (("cispo_clip_ratio",) if g.loss_type == "cispo" else
                                         () if g.loss_type == "sapo" else CLIP)
    return Objective(name="grpo", train=source, loss_fn=loss_fn, evaluate=None, count_name="completions",
                     metrics=_metric_names(funcs, extra), headline=(), heldout=run.data.validation,
                     progress=("reward", "kl") if g.beta else ("reward",))


def make_rloo(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The RLOO objective (TRL RLOOTrainer: leave-one-out baseline, k1 KL in the reward, sequence ratio)."""
    o, T = run.rloo, run.rollout.temperature
    eps_high = o.epsilon if o.epsilon_high is None else o.epsilon_high
    A, N, B = run.train.grad_accum, run.train.grad_accum * run.train.batch_size, run.train.batch_size
    G = group_size(run)

    def loss_fn(model, batch, ctx: Ctx = ON):
        logp = completion_logps(model, batch, ctx, T)
        mask = batch["mask"]
        old = batch["old_seq"] if "old_seq" in batch else jax.lax.stop_gradient(jnp.sum(logp * mask, -1))
        loss, metrics = pg.rloo_loss(logp, old, batch["advantages"], mask, o.epsilon, eps_high, ga=A,
                                     entropy=batch["entropy"])
        return _scaled(loss, metrics, mask, N)

    source, funcs = None, []
    if train:
        forward, ref = _forwards(run, setup, o.beta, say)

        def finish(src, ro, params):
            weights = _weights(run, src.funcs)
            rows = ro.rows()
            t0 = time.perf_counter()
            kl_seq, stats = None, {}
            if ref is not None or o.num_iterations > 1:
                old = per_micro_batch(lambda b: forward(params, setup.frozen, b, ON), rows, B)  # [N, L]
                rows["old_seq"] = np.sum(old * ro.mask, -1).astype(np.float32)
            if ref is not None:
                w, ctx = ref.weights(params)
                refl = per_micro_batch(lambda b: forward(w, setup.frozen, b, ctx), rows, B)
                # TRL: the KL enters the reward over completion_mask (kept tokens, truncation mask applied)
                kl_tok = (old - refl) * ro.mask
                kl_seq = kl_tok.sum(-1)
                stats["kl"] = float(kl_tok.sum() / max(ro.mask.sum(), 1.0))
            adv, zero = pg.rloo_advantages(ro.rewards, weights, G, kl_seq, o.beta, o.normalize_advantages,
                                           o.reward_clip_range)
            rows.update(advantages=adv.astype(np.float32), entropy=ro.entropies)
            stats.update(zero, **pg.reward_stats(ro.rewards, weights, _names(src.funcs)),
                         **{"time/reference": time.perf_counter() - t0})
            return rows, stats

        source, funcs = _source(run, setup, say, wrap, finish)
        source.forward = forward
    extra = ("kl",) * (o.beta != 0.0) + CLIP
    return Objective(name="rloo", train=source, loss_fn=loss_fn, evaluate=None, count_name="completions",
                     metrics=_metric_names(funcs, extra), headline=(), heldout=run.data.validation,
                     progress=("reward", "kl") if o.beta else ("reward",))
