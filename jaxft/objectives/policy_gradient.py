"""Advantages and policy-gradient losses of GRPO (and its variants) and RLOO, as pure functions (TRL 1.16).

Conventions: N completions of one generation batch, G per prompt (consecutive rows = one group), K reward
functions; a micro-batch has B completions of L token positions. Host-side (numpy, float64):

    A, stats = group_advantages(rewards [N, K], weights [K], G, scale="group")            GRPO
    A, stats = rloo_advantages(rewards [N, K], weights [K], G, kl=[N] or None, beta=0.05)  RLOO

Device-side (jax, any float dtype), each returning TRL's per-micro-batch loss (already divided for
accumulation exactly as TRL's `_compute_loss` returns it to backward) and TRL's logged metric values:

    loss, metrics = grpo_loss(logp, old, ref, adv, mask, cfg, num_items=…, ga=…, spg=…)   [B, L] … [B]
    loss, metrics = rloo_loss(logp, old_seq, adv, mask, eps_low, eps_high, ga=…)

The formulas (RL.md §1.5, §1.7, §2): ratio coef_1 = exp(logp − old) per token (GSPO: the masked sequence
mean of the log-ratio); clipped surrogate −min(coef_1·A, clip(coef_1, 1−ε_low, 1+ε_high)·A) with
coef_1 capped at delta when set; k3 KL exp(ref − logp) − (ref − logp) − 1 (× coef_1 with the bias
correction); normalizers: grpo/sapo per-sequence means, bnpo the micro-batch tokens, dr_grpo B·L_max,
dapo/cispo the generation batch's tokens (num_items) times GA/spg, luspo per-sequence sums.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

STD_EPS = 1e-4  # TRL adds it to the std before dividing


def nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Bessel-corrected std ignoring NaN (NaN when fewer than two values), as TRL's utils.nanstd."""
    x = np.asarray(x, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=axis, keepdims=True) / np.sum(~np.isnan(x), axis=axis, keepdims=True)
        var = np.nansum((x - mean) ** 2, axis=axis) / (n - 1)
    return np.where(n > 1, np.sqrt(var), np.nan)


def _nanmean(x, axis=None):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(x, axis=axis) / np.sum(~np.isnan(x), axis=axis)


def weighted(rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_k w_k r_k per completion [N] (a None/NaN term counts 0); NaN when every function returned None."""
    total = np.nansum(rewards * weights[None, :], axis=1)
    return np.where(np.isnan(rewards).all(axis=1), np.nan, total)


def reward_stats(rewards: np.ndarray, weights: np.ndarray, names: list[str]) -> dict[str, float]:
    """reward, reward_std, rewards/<fn>/mean, rewards/<fn>/std (TRL's names; NaN-aware, raw per function)."""
    out = {}
    for k, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(_nanmean(rewards[:, k]))
        out[f"rewards/{name}/std"] = float(nanstd(rewards[:, k]))
    r = weighted(rewards, weights)
    out["reward"], out["reward_std"] = float(_nanmean(r)), float(nanstd(r))
    return out


def group_advantages(rewards: np.ndarray, weights: np.ndarray, G: int, scale: str = "group",
                     aggregation: str = "sum_then_normalize") -> tuple[np.ndarray, dict[str, float]]:
    """GRPO advantages [N] and frac_reward_zero_std. rewards [N, K] (NaN = None), weights [K]."""
    N, K = rewards.shape
    if aggregation == "sum_then_normalize":
        r = weighted(rewards, weights)  # [N]
        mean = np.repeat(_nanmean(r.reshape(-1, G), axis=1), G)
        if scale == "batch":
            std = np.full(N, nanstd(r) if N > 1 else 0.0)
        else:  # group (and none, for the zero-std statistic)
            std = np.repeat(nanstd(r.reshape(-1, G), axis=1), G) if G > 1 else np.zeros(N)
        adv = r - mean
        if scale != "none":
            adv = adv / (std + STD_EPS)
    else:  # normalize_then_sum (GDPO): per function group z-scores, weighted sum, then batch-normalized
        g = rewards.reshape(-1, G, K)
        with np.errstate(invalid="ignore"):
            z = (g - _nanmean(g, axis=1)[:, None]) / (nanstd(g, axis=1)[:, None] + STD_EPS)
        r = weighted(z.reshape(N, K), weights)
        std = np.full(N, nanstd(r) if N > 1 else 0.0)
        adv = (r - _nanmean(r)) / (std + STD_EPS)
    zero = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)  # torch.isclose defaults
    return np.nan_to_num(adv, nan=0.0), {"frac_reward_zero_std": float(zero.mean())}


def rloo_advantages(rewards: np.ndarray, weights: np.ndarray, G: int, kl: np.ndarray | None = None,
                    beta: float = 0.0, normalize: bool = False,
                    clip_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """RLOO advantages [N]: leave-one-out baseline over the scorable siblings of the (clipped,
    KL-penalized: r − β·Σ_t(old − ref)) rewards. kl [N]: the summed per-token old − ref."""
    r = weighted(rewards, weights)
    if clip_range is not None:
        r = np.clip(r, clip_range[0], clip_range[1])
    if beta != 0.0 and kl is not None:
        r = r - beta * kl
    g = r.reshape(-1, G)
    scorable = np.sum(~np.isnan(g), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        baseline = (np.nansum(g, axis=1, keepdims=True) - g) / (scorable - 1)
    adv = (g - baseline).reshape(-1) if G > 1 else np.zeros_like(r)
    if normalize:
        adv = (adv - _nanmean(adv)) / (nanstd(adv) + STD_EPS)
    std = nanstd(g, axis=1) if G > 1 else np.zeros(len(g))
    zero = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)
    return np.nan_to_num(adv, nan=0.0), {"frac_reward_zero_std": float(zero.mean())}


# ---------------------------------------------------------------- losses (jax)


@dataclasses.dataclass(frozen=True)
class PgLoss:
    """The loss settings of grpo_loss (jaxft.config.GrpoConfig resolved: epsilon_high None → epsilon)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    level: str = "token"  # token | sequence (GSPO)
    bias_correction_kl: bool = True
    sapo_pos: float = 1.0
    sapo_neg: float = 1.05
    max_completion_length: int = 512

    @classmethod
    def of(cls, g, max_completion_length: int) -> "PgLoss":
        return cls(g.loss_type, g.beta, g.epsilon, g.epsilon if g.epsilon_high is None else g.epsilon_high, g.delta,
                   g.importance_sampling_level, g.use_bias_correction_kl, g.sapo_temperature_pos,
                   g.sapo_temperature_neg, max_completion_length)


def _masked_mean(x, mask):
    """TRL's global_masked_mean: token-weighted over the mask, or over sequences for [B, 1] values."""
    if x.shape[1] == 1:
        return jnp.sum(x) / x.shape[0]
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _seq_mean(x, mask):
    """TRL's masked_seq_mean [B] (NaN for an all-masked row, skipped by nanmin / nanmax)."""
    return x[:, 0] if x.shape[1] == 1 else jnp.sum(x * mask, axis=-1) / jnp.sum(mask, axis=-1)


def grpo_loss(logp, old, ref, adv, mask, cfg: PgLoss, *, num_items, ga: int = 1, spg: int = 1,
              entropy=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TRL GRPOTrainer._compute_loss in training mode, one process.

    logp, old [B, L]: policy log-probs (old: the sampling policy's; pass stop_gradient(logp) on policy);
    ref [B, L] or None (beta = 0); adv [B]; mask [B, L] (1 on kept completion tokens); num_items: kept
    tokens of the whole generation batch (dapo / cispo); ga: micro-batches per optimizer step; spg:
    micro-batches per generation batch. Returns (loss, {metric: value})."""
    mask = mask.astype(logp.dtype)
    A = adv[:, None]  # [B, 1]
    log_ratio = logp - old
    if cfg.level == "sequence":
        w = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]  # [B, 1]
    else:
        w = log_ratio
    coef_1 = jnp.exp(w)
    if cfg.beta != 0.0:
        d = ref - logp
        kl = jnp.exp(d) - d - 1
        if cfg.bias_correction_kl:
            kl = kl * coef_1
    t = cfg.loss_type
    if t == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(coef_1, cfg.eps_high)) * A * logp
    elif t in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = jnp.clip(coef_1, 1 - cfg.eps_low, 1 + cfg.eps_high)
        if cfg.delta is not None:
            coef_1 = jnp.minimum(coef_1, cfg.delta)
        per_token = -jnp.minimum(coef_1 * A, coef_2 * A)
    elif t == "sapo":
        temp = jnp.where(A > 0, cfg.sapo_pos, cfg.sapo_neg)
        per_token = -jax.nn.sigmoid(temp * (coef_1 - 1)) * 4 / temp * A
    else:
        raise ValueError(f"unknown loss_type {t!r}")
    if cfg.beta != 0.0:
        per_token = per_token + cfg.beta * kl
    lm = jnp.broadcast_to(per_token, mask.shape) * mask  # [B, L]
    B = logp.shape[0]
    if t in ("grpo", "sapo"):
        loss = jnp.mean(jnp.sum(lm, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)) / ga
    elif t == "bnpo":
        loss = jnp.sum(lm) / jnp.maximum(jnp.sum(mask), 1.0) / ga
    elif t == "dr_grpo":
        loss = jnp.sum(lm) / (B * cfg.max_completion_length) / ga
    elif t == "luspo":
        loss = jnp.mean(jnp.sum(lm, -1)) / ga
    else:  # dapo, cispo: the generation batch's token count, rescaled to one accumulation window
        loss = jnp.sum(lm) / (jnp.maximum(num_items, 1.0) * ga / spg)
    metrics = {}
    if cfg.beta != 0.0:
        metrics["kl"] = _masked_mean(kl, mask)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
    if t == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean(((coef_1 > cfg.eps_high) & (A > 0)).astype(logp.dtype), mask)
    elif t != "sapo":
        low = ((coef_1 < 1 - cfg.eps_low) & (A < 0)).astype(logp.dtype)
        high = ((coef_1 > 1 + cfg.eps_high) & (A > 0)).astype(logp.dtype)
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(jnp.maximum(low, high), mask)
        metrics["clip_ratio/low_min"] = jnp.nanmin(_seq_mean(low, mask))
        metrics["clip_ratio/high_max"] = jnp.nanmax(_seq_mean(high, mask))
    return loss, metrics


def rloo_loss(logp, old_seq, adv, mask, eps_low: float, eps_high: float, *, ga: int = 1,
              entropy=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TRL RLOOTrainer._compute_loss (divided by ga, as the Trainer does): sequence ratio of summed
    log-probs. logp [B, L], old_seq [B] (Σ_t old·mask), adv [B], mask [B, L]."""
    mask = mask.astype(logp.dtype)
    coef_1 = jnp.exp(jnp.sum(logp * mask, -1) - old_seq)  # [B]
    coef_2 = jnp.clip(coef_1, 1 - eps_low, 1 + eps_high)
    loss = jnp.mean(-jnp.minimum(coef_1 * adv, coef_2 * adv)) / ga
    low = ((coef_1 < 1 - eps_low) & (adv < 0)).astype(logp.dtype)
    high = ((coef_1 > 1 + eps_high) & (adv > 0)).astype(logp.dtype)
    metrics = {"clip_ratio/low_mean": jnp.mean(low), "clip_ratio/low_min": jnp.min(low),
               "clip_ratio/high_mean": jnp.mean(high), "clip_ratio/high_max": jnp.max(high),
               "clip_ratio/region_mean": jnp.mean(jnp.maximum(low, high))}
    if entropy is not None:
        metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, metrics
