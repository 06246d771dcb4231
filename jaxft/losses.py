"""Token log-probs (fp32, chunked over the sequence) and objectives that return (sum, count).

Returning (sum, count) instead of a mean lets gradient accumulation, packing and multi-host
reductions weight every target token exactly once: the caller divides once, at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models.decoder import Decoder

LOGITS_CHUNK = 128  # sequence positions per logits chunk: [B, chunk, V] fp32 is the largest temporary


def token_logprobs(model: Decoder, h: jax.Array, targets: jax.Array, chunk: int = LOGITS_CHUNK) -> jax.Array:
    """log p(targets[b, s]) [B, S] fp32 from final hidden states h [B, S, D].

    The vocabulary projection and log-softmax run one chunk of positions at a time under
    `jax.checkpoint`, so full [B, S, V] fp32 logits never exist, forward or backward.
    """
    B, S, D = h.shape
    c = min(chunk, S)
    n = -(-S // c)
    pad = n * c - S
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def one(_, xs):
        hc, tc = xs
        logits = model.logits(hc).astype(jnp.float32)  # [B, c, V]
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return None, picked - jax.nn.logsumexp(logits, axis=-1)

    _, lp = jax.lax.scan(one, None, (h, t))
    return lp.swapaxes(0, 1).reshape(B, n * c)[:, :S]


def sft_loss(model: Decoder, batch: dict, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy over the batch's trained targets → (sum of −log p, number of targets).

    batch: tokens, positions, segment_ids, targets [B, S] int; loss_mask [B, S] float (see jaxft.data).
    """
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)
    lp = token_logprobs(model, h, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(lp * mask), jnp.sum(mask)
