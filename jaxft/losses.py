"""Token log-probs (fp32, chunked over the sequence) and objectives that return (sum, count).

Returning (sum, count) instead of a mean lets gradient accumulation, packing and multi-host
reductions weight every target token exactly once: the caller divides once, at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import dataclasses

from jaxft.context import ON, Ctx
from jaxft.models.decoder import Decoder, head_logits

LOGITS_TOKENS = 512  # tokens (rows x positions) per logits chunk: a few [512, V] fp32 are the largest temporaries


@dataclasses.dataclass(frozen=True)
class _Project:
    """head arrays, h [B, c, D] → logits [B, c, V] (soft-capped, divided by the temperature)."""

    graphdef: object
    treedef: object
    softcap: float | None
    temperature: float
    barrier: bool  # Tuning.exp_barrier

    def __call__(self, head, x):
        z = head_logits(nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, head)), x, self.softcap)
        return z if self.temperature == 1.0 else z / jnp.asarray(self.temperature, z.dtype)


def token_logprobs(model: Decoder, h: jax.Array, targets: jax.Array, chunk: int | None = None,
                   temperature: float = 1.0) -> jax.Array:
    """log p(targets[b, s]) [B, S] fp32 from final hidden states h [B, S, D], under softmax(logits / T).

    The vocabulary projection and log-softmax run `chunk` positions at a time (default: LOGITS_TOKENS
    tokens over the batch), so full [B, S, V] fp32 logits never exist, forward or backward (see
    `_chunk_logprobs` for the gradient). temperature: the sampling temperature of on-policy objectives
    (the sampler's log-probs are taken under the same scaled logits).
    """
    B, S, D = h.shape
    c = min(chunk or max(1, LOGITS_TOKENS // B), S)
    n = -(-S // c)
    pad = n * c - S
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)  # [n, B, c]
    graphdef, state = nnx.split(model.head)
    head, treedef = jax.tree.flatten(state)  # its arrays, as a plain list for the custom gradient
    project = _Project(graphdef, treedef, model.config.final_softcap, float(temperature), model.tuning.exp_barrier)
    _, lp = jax.lax.scan(lambda _, xs: (None, _chunk_logprobs(project, head, *xs)), None, (h, t))
    return lp.swapaxes(0, 1).reshape(B, n * c)[:, :S]


def _softmax_parts(z, barrier: bool = True):
    """exp(z − max), its sum over the vocabulary, and logsumexp(z) ([..., 1] each). barrier (CPU-tuned,
    Tuning.exp_barrier): exp is computed once into memory; XLA:CPU fuses it into the sum's reduction
    otherwise and runs it much slower there (`scripts/profile_step.py --ops` shows it)."""
    m = jax.lax.stop_gradient(z.max(axis=-1, keepdims=True))
    e = jnp.exp(z - m)
    e = jax.lax.optimization_barrier(e) if barrier else e
    total = e.sum(axis=-1, keepdims=True)
    return e, total, m + jnp.log(total)


def _pick(z, t):
    return jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]


def _logprobs(project, head, h, t):
    z = project(head, h).astype(jnp.float32)  # [B, c, V]
    return _pick(z, t) - _softmax_parts(z, project.barrier)[2][..., 0]


# One chunk's log-probs with a hand-written gradient. d lp / d logits = onehot(t) − softmax is known in
# the forward pass, so when the head is frozen (LoRA, the DPO reference) the forward also computes
# dh = (onehot − softmax) · ∂logits/∂h (one vocab-sized matmul) and keeps only that [B, c, D]; the
# backward scales it by each token's cotangent. Two vocab matmuls instead of autodiff's three (logits,
# their recomputation, dh), and no [B, c, V] array survives the chunk. A trainable head (full
# fine-tuning, modules_to_save) keeps the chunk's inputs and differentiates it again in the backward.
_chunk_logprobs = jax.custom_vjp(_logprobs, nondiff_argnums=(0,))


def _chunk_fwd(project, head, h, t):
    trainable = any(p.perturbed for p in jax.tree.leaves(head, is_leaf=lambda p: hasattr(p, "perturbed")))
    head, h, t = jax.tree.map(lambda p: p.value, (head, h, t), is_leaf=lambda p: hasattr(p, "perturbed"))
    if trainable:
        return _logprobs(project, head, h, t), (head, h, t, None)
    logits, pullback = jax.vjp(lambda x: project(head, x), h)
    z = logits.astype(jnp.float32)
    e, total, lse = _softmax_parts(z, project.barrier)
    p = e / total
    dz = jnp.put_along_axis(-p, t[..., None], 1.0 - _pick(p, t)[..., None], axis=-1, inplace=False)  # onehot − p
    (dh,) = pullback(dz.astype(logits.dtype))
    return _pick(z, t) - lse[..., 0], (None, None, None, dh)


def _chunk_bwd(project, res, g):
    head, h, t, dh = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    if dh is not None:
        return None, (g[..., None] * dh.astype(jnp.float32)).astype(dh.dtype), None
    _, pullback = jax.vjp(lambda w, x: _logprobs(project, w, x, t), head, h)
    return (*pullback(g), None)


_chunk_logprobs.defvjp(_chunk_fwd, _chunk_bwd, symbolic_zeros=True)


def sft_loss(model: Decoder, batch: dict, ctx: Ctx = ON) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy over the batch's trained targets → (sum of −log p, number of targets).

    batch: tokens, positions, segment_ids, targets [B, S] int; loss_mask [B, S] float (see jaxft.data.encode).
    """
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], ctx=ctx)
    lp = token_logprobs(model, h, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(lp * mask), jnp.sum(mask)
