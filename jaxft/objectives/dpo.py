"""Preference optimization: the DPO family (TRL's definitions), the reference without a second copy of
the weights, and cached reference log-probs.

    loss_fn = make_loss(run.dpo)           # (model, batch, ctx) → (sum, pairs, metric sums)
    obj = make(run, setup, say)            # a jaxft.objective.Objective

A sequence's log-prob is the sum of its completion tokens' log-probs (fp32, `losses.token_logprobs`);
chosen and rejected run in one forward pass (concatenated along the batch). With Δ = (logπ(c) − logπ_ref(c))
− (logπ(r) − logπ_ref(r)), β, label smoothing ε, lengths |c|, |r| (completion tokens):

    sigmoid  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)                      (ε > 0: cDPO)
    robust   (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)
    hinge    relu(1 − βΔ)
    ipo      ((ratio_c/|c| − ratio_r/|r|) − 1/(2β))²
    simpo    −(1−ε) log σ(z) − ε log σ(−z),  z = β (logπ(c)/|c| − logπ(r)/|r|) − γ       (no reference)
    orpo     NLL(chosen prompt + completion) + λ · −log σ(log odds(c) − log odds(r))    (no reference)

Metrics (means over pairs): rewards/chosen = β(logπ(c) − logπ_ref(c)), rewards/rejected, rewards/accuracies
(chosen > rejected, strict), rewards/margins, logps/chosen, logps/rejected. SimPO and ORPO report, as TRL's
CPO/ORPO trainers do, length-normalized log-probs and rewards β·logπ/|y| (λ·logπ/|y| for ORPO).

Reference: `dpo.reference=lora_base` is the same graph called with the adapters switched off
(`Ctx(enabled=False)`, under stop_gradient: no copy, no backward); `cache` computes those log-probs once per
dataset (full fine-tuning: the initial weights) and stores them in `<cache_dir>/<fingerprint>.npy`, keyed
by the model files, dtype, the reference kind and the exact token ids of every pair, so training runs no
reference forward at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config import DpoConfig, RunConfig
from jaxft.config.objectives import REFERENCE_FREE
from jaxft.context import OFF, ON, Ctx
from jaxft.data.pairs import PairBatches, load_pairs
from jaxft.errors import JaxftError
from jaxft.files import atomic_path
from jaxft.losses import token_logprobs
from jaxft.objective import Objective, Prefetched, make_eval_step, mean_over_batches

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


SOFT_LABELS = ("sigmoid", "simpo")  # the losses a per-pair `confidence` (per-pair label smoothing) applies to


def _smoothed(z, eps, soft=None):
    """−(1−ε) log σ(z) − ε log σ(−z); soft = (confidence, 1 − confidence) [B] replaces (1 − ε, ε) per pair."""
    if soft is not None:
        return -soft[0] * jax.nn.log_sigmoid(z) - soft[1] * jax.nn.log_sigmoid(-z)
    return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def pair_losses(cfg: DpoConfig, chosen, rejected, len_c, len_r, ref_c=None, ref_r=None, soft=None):
    """Per-pair losses [B] and per-pair metrics {name: [B]} from summed completion log-probs [B]
    (policy and, unless reference-free, reference) and completion lengths [B]. ORPO's NLL term is
    added by the caller. soft: (confidence, 1 − confidence) [B], the pairs' soft labels (sigmoid, simpo)."""
    b, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type in REFERENCE_FREE:
        avg_c, avg_r = chosen / len_c, rejected / len_r
        if cfg.loss_type == "simpo":
            loss, scale = _smoothed(b * (avg_c - avg_r) - cfg.simpo_gamma, eps, soft), b
        else:
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss, scale = -cfg.orpo_lambda * jax.nn.log_sigmoid(log_odds), cfg.orpo_lambda
        rc, rr, lc, lr = scale * avg_c, scale * avg_r, avg_c, avg_r
    else:
        ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
        z = b * (ratio_c - ratio_r)
        loss = {
            "sigmoid": lambda: _smoothed(z, eps, soft),
            "robust": lambda: (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps),
            "hinge": lambda: jax.nn.relu(1 - z),
            "ipo": lambda: (ratio_c / len_c - ratio_r / len_r - 1 / (2 * b)) ** 2,
        }[cfg.loss_type]()
        rc, rr, lc, lr = b * ratio_c, b * ratio_r, chosen, rejected
    metrics = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).astype(rc.dtype),
               "rewards/margins": rc - rr, "logps/chosen": lc, "logps/rejected": lr}
    return loss, metrics


def _token_logprobs(model, batch: dict, ctx: Ctx = ON) -> jax.Array:
    """log p(target) [2B, S] fp32 of every position of a pair batch."""
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], ctx=ctx)
    return token_logprobs(model, h, batch["targets"])


def reference_logps(model, batch: dict) -> jax.Array:
    """Summed completion log-probs [2B] of the reference for a pair batch: the same weights with every
    adapter switched off, outside the gradient (validation refuses a reference that trains weights)."""
    lp = _token_logprobs(model, batch, OFF)
    return jax.lax.stop_gradient(jnp.sum(lp * batch["loss_mask"], axis=-1))


def make_loss(cfg: DpoConfig):
    """loss_fn(model, batch, ctx) → (sum of pair losses, number of pairs, {metric: sum over pairs}).

    The reference log-probs come from batch["ref_logps"] (a cache) when present, else from `reference_logps`.
    """

    def loss_fn(model, batch, ctx: Ctx = ON):
        m = batch["pair_mask"]  # [B]
        B = m.shape[0]
        real = jnp.concatenate([m, m]) > 0  # [2B]
        lp = _token_logprobs(model, batch, ctx)  # [2B, S]
        mask = batch["loss_mask"]
        logps = jnp.where(real, jnp.sum(lp * mask, axis=-1), -1.0)  # empty rows: harmless finite values
        lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        ref = ()
        if cfg.loss_type not in REFERENCE_FREE:
            r = batch["ref_logps"] if "ref_logps" in batch else reference_logps(model, batch)
            r = jnp.where(real, r, -1.0)
            ref = (r[:B], r[B:])
        soft = (batch["confidence"], batch["smoothing"]) if "confidence" in batch else None
        losses, metrics = pair_losses(cfg, logps[:B], logps[B:], lengths[:B], lengths[B:], *ref, soft=soft)
        total, pairs = jnp.sum(losses * m), jnp.sum(m)
        if cfg.loss_type == "orpo":  # TRL: mean NLL over the chosen sequences' prompt and completion tokens
            seg = batch["segment_ids"][:B]
            has_target = (seg > 0) & (jnp.pad(seg[:, 1:], ((0, 0), (0, 1))) > 0)
            nll = -jnp.sum(lp[:B] * has_target) / jnp.maximum(jnp.sum(has_target), 1)
            total = total + pairs * nll
        return total, pairs, {k: jnp.sum(v * m) for k, v in metrics.items()}

    return loss_fn


# ---------------------------------------------------------------- reference log-prob cache


def fingerprint(run: RunConfig, model_path: Path, pairs) -> str:
    """sha256 of what the reference log-probs depend on: model files, dtype, quantization, reference kind, token ids."""
    h = hashlib.sha256(json.dumps(dict(dtype=run.model.dtype, quant=run.to_dict()["quant"],
                                       reference="initial weights, LoRA off", version=1)).encode())
    files = [model_path] if model_path.is_file() else sorted(
        p for p in model_path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(np.int64(len(ex.tokens)).tobytes() + ex.tokens.tobytes() + ex.loss_mask.tobytes())
    return h.hexdigest()[:24]


def compute_reference_logps(graphdef, params, frozen, pairs, batch_size: int, seq_len: int) -> np.ndarray:
    """The reference's (chosen, rejected) log-probs [N, 2] of every pair, in the order of `pairs`."""
    batches = PairBatches(pairs, batch_size, seq_len, seed=0)
    fn = jax.jit(lambda p, f, b: reference_logps(nnx.merge(graphdef, p, f), b))
    out = np.zeros((len(pairs), 2), np.float32)
    for i in range(len(batches)):
        b = batches.in_order(i)
        lp = np.asarray(fn(params, frozen, b))
        idx = b["pair_index"]
        ok = idx >= 0
        out[idx[ok], 0], out[idx[ok], 1] = lp[:batch_size][ok], lp[batch_size:][ok]
    return out


def cached_reference(run: RunConfig, setup, pairs, say=lambda *a: None) -> np.ndarray:
    """The reference log-probs of `pairs`, from the cache or computed once and stored (atomically)."""
    cache_dir = Path(run.dpo.cache_dir or Path(run.train.out_dir) / "reference")
    path = cache_dir / f"{fingerprint(run, setup.model_path, pairs)}.npy"
    if path.is_file():
        ref = np.load(path)
        if ref.shape == (len(pairs), 2):
            say(f"reference log-probs: {path} (cached)")
            return ref
    say(f"reference log-probs: computing for {len(pairs)} pairs → {path}")
    ref = compute_reference_logps(setup.graphdef, setup.params, setup.frozen, pairs, run.train.batch_size,
                                  run.data.max_length)
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, ref)
    return ref


# ---------------------------------------------------------------- batches, objective


def pair_batches(run: RunConfig, setup, split: str, batch_size: int, say=lambda *a: None):
    """The split's PairBatches (None for an unconfigured validation split), with cached reference
    log-probs when dpo.reference=cache and the loss needs a reference."""
    pairs, report = load_pairs(run.data, run.dpo, setup.tokenizer, split)
    if not pairs:
        return None
    say(f"{split} pairs: {report.summary()}")
    if pairs[0].confidence is not None:  # soft labels: per-pair label smoothing 1 − confidence (cDPO per pair)
        if run.dpo.loss_type not in SOFT_LABELS:
            raise JaxftError(f"dpo.loss_type: {run.dpo.loss_type} has no label smoothing, but the {split} pairs carry "
                             f"a 'confidence' column (soft labels need one of {', '.join(SOFT_LABELS)})")
        if run.dpo.label_smoothing:
            raise JaxftError(f"dpo.label_smoothing: {run.dpo.label_smoothing} and a 'confidence' column in the {split} "
                             "pairs: each pair's smoothing is 1 − confidence; set dpo.label_smoothing=0")
    ref = None
    if run.dpo.reference == "cache" and run.dpo.loss_type not in REFERENCE_FREE:
        ref = cached_reference(run, setup, pairs, say)
    return PairBatches(pairs, batch_size, run.data.max_length, run.data.seed, ref)


def make(run: RunConfig, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True) -> Objective:
    """The DPO objective: pair batches (each wrapped by `wrap`, e.g. into sharded global batches), the
    loss, validation metrics (eval_loss, eval_rewards/..., eval_logps/..., eval_pairs)."""
    loss_fn = make_loss(run.dpo)
    source = None
    if train:
        b = wrap(pair_batches(run, setup, "train", run.train.batch_size, say))
        source = Prefetched(lambda step: b.step(step - 1, run.train.grad_accum), len(b))
    val = pair_batches(run, setup, "validation", run.train.batch_size, say)  # the reference cache's batch shapes
    evaluate = None
    if val is not None:
        val, eval_step = wrap(val), make_eval_step(setup.graphdef, loss_fn)
        evaluate = lambda params, frozen: mean_over_batches(  # noqa: E731
            eval_step, params, frozen, val, run.train.eval_batches, "eval_pairs")
    return Objective(name="dpo", train=source, loss_fn=loss_fn, evaluate=evaluate, count_name="pairs",
                     metrics=METRICS, headline=("eval_rewards/accuracies", "eval_rewards/margins"))
