"""How far one model's next-token distributions are from another's, from log-probs alone (numpy, no jax).

    parts = token_parts(ref_lp, new_lp, targets, mask)        # per answer token, one batch
    figures = summarize([parts, ...], prefix="reg_")           # {"reg_kl_mean": ..., "reg_kl_p95": ..., ...}

The reference is the base model (regression check) or the fp32 tuned model (export check); "new" is the model
judged against it. Both see the same tokens (teacher forcing), so every figure compares distributions at the
same positions.
"""

from __future__ import annotations

import numpy as np

P95 = 95.0  # the tail figure: a few answer tokens moving a lot shows here before it moves the mean


def token_parts(ref_lp: np.ndarray, new_lp: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
    """Per-token measures of one batch.

    ref_lp, new_lp [B, L, V] float: full log-softmax at the L positions that predict targets [B, L] int;
    mask [B, L] bool: the real answer tokens. Returns kl, ref_nll, new_nll, agree — each [n] over the n masked
    tokens, row-major — and changed [r] bool over the r rows with a masked token (rows without one are filler):
    whether the top-1 tokens differ at one of its masked positions at least.

    kl = Σ_v p_ref(v) (log p_ref(v) − log p_new(v)), KL(ref ‖ new) in nats; nll = −log p(target).
    """
    ref_lp, new_lp, mask = np.asarray(ref_lp), np.asarray(new_lp), np.asarray(mask, bool)
    kl = np.sum(np.exp(ref_lp) * (ref_lp - new_lp), axis=-1, dtype=np.float64)  # [B, L]; summed in fp64
    t = np.asarray(targets)[..., None]
    ref_nll = -np.take_along_axis(ref_lp, t, axis=-1)[..., 0].astype(np.float64)
    new_nll = -np.take_along_axis(new_lp, t, axis=-1)[..., 0].astype(np.float64)
    agree = ref_lp.argmax(-1) == new_lp.argmax(-1)
    return dict(kl=np.maximum(kl[mask], 0.0), ref_nll=ref_nll[mask], new_nll=new_nll[mask], agree=agree[mask],
                changed=(~agree & mask).any(axis=1)[mask.any(axis=1)])


def summarize(parts: list[dict], prefix: str = "") -> dict[str, float]:
    """Figures over every token (and row) of `parts` (token_parts of each batch):
    kl_mean, kl_p95 (nats per token); ce_increase: mean nll of new − of ref (nats per token; > 0: the answers
    became less likely); top1_agree: share of tokens whose argmax is equal; changed: share of rows whose greedy
    continuation departs from the reference's somewhere; tokens: how many answer tokens were compared."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = cat["kl"].size
    if n == 0:
        return {}
    return {f"{prefix}kl_mean": float(cat["kl"].mean()), f"{prefix}kl_p95": float(np.percentile(cat["kl"], P95)),
            f"{prefix}ce_increase": float(cat["new_nll"].mean() - cat["ref_nll"].mean()),
            f"{prefix}top1_agree": float(cat["agree"].mean()), f"{prefix}changed": float(cat["changed"].mean()),
            f"{prefix}tokens": float(n)}
