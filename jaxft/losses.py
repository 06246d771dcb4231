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
    B, S, _ = h.shape
    c = min(chunk or max(1, LOGITS_TOKENS // B), S)
    project, head = _head(model, temperature)
    _, lp = jax.lax.scan(lambda _, xs: (None, _chunk_logprobs(project, head, *xs)), None,
                         (_chunks(h, c), _chunks(targets, c)))
    return _unchunk(lp, S)


def token_logprob_sum(model: Decoder, h: jax.Array, targets: jax.Array, weights: jax.Array,
                      chunk: int | None = None) -> jax.Array:
    """Σ weights[b, s] · log p(targets[b, s]): a fp32 scalar, from final hidden states h [B, S, D].

    The same chunked log-softmax as `token_logprobs`, for a loss that only needs the weighted sum (SFT): its
    cotangent is then one scalar, so the forward pass computes the whole gradient of the head and of h
    (`_logprob_sum`) and no vocab-sized matmul runs in the backward pass, trainable head or not.
    weights [B, S] (e.g. the loss mask) are data: their gradient is log p, as for any product.
    """
    B, S, _ = h.shape
    c = min(chunk or max(1, LOGITS_TOKENS // B), S)
    project, head = _head(model, 1.0)
    w = weights.astype(jnp.float32)
    return _logprob_sum(project, head, _chunks(h, c), _chunks(targets, c), _chunks(w, c))


def _head(model: Decoder, temperature: float):
    """(_Project, the head's arrays as a plain list) — the form the hand-written gradients take."""
    graphdef, state = nnx.split(model.head)
    head, treedef = jax.tree.flatten(state)
    return _Project(graphdef, treedef, model.config.final_softcap, float(temperature), model.tuning.exp_barrier), head


def _chunks(x, c: int):
    """x [B, S, ...] → [n, B, c, ...] (zero-padded to n·c positions)."""
    B, S = x.shape[:2]
    n = -(-S // c)
    x = jnp.pad(x, ((0, 0), (0, n * c - S)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(B, n, c, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x, S: int):
    """[n, B, c, ...] → [B, S, ...]: `_chunks` undone."""
    n, B, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(B, n * c, *x.shape[3:])[:, :S]


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


def _onehot_minus_softmax(z, t, w, barrier: bool):
    """(w · (onehot(t) − softmax(z)) [B, c, V] fp32: d(w · log p(t)) / dz, log p(t) [B, c]) for z [B, c, V]."""
    e, total, lse = _softmax_parts(z, barrier)
    p_t = _pick(e, t)[..., None] / total
    dz = jnp.put_along_axis(-e * (w[..., None] / total), t[..., None], w[..., None] * (1.0 - p_t), axis=-1,
                            inplace=False)
    return dz, _pick(z, t) - lse[..., 0]


def _sum_primal(project, head, h, t, w):
    """Σ w · log p(t) over chunks h [n, B, c, D], t, w [n, B, c] (no gradient: evaluation)."""
    return jax.lax.scan(lambda s, xs: (s + jnp.sum(xs[2] * _logprobs(project, head, *xs[:2])), None),
                        jnp.zeros((), jnp.float32), (h, t, w))[0]


# The weighted sum's hand-written gradient. Its cotangent is a scalar, so everything the backward pass
# needs can be computed in the forward pass, chunk by chunk, while the chunk's softmax is at hand:
# dz = w · (onehot − softmax), then dh = dz · ∂logits/∂h and, for a trainable head (full fine-tuning,
# modules_to_save), dW = ∂logits/∂Wᵀ · dz summed over the chunks. Three vocab-sized matmuls per chunk
# (logits, dh, dW) instead of four for autodiff of a trainable head (logits, their recomputation in the
# backward pass, dh, dW), two for a frozen one; the backward pass only scales by the scalar cotangent.
# The forward keeps dh [n, B, c, D], the head's gradient (the head's size) and log p [n, B, c].
_logprob_sum = jax.custom_vjp(_sum_primal, nondiff_argnums=(0,))


def _sum_fwd(project, head, h, t, w):
    is_primal = lambda p: hasattr(p, "perturbed")  # noqa: E731 — symbolic_zeros wraps each argument
    trainable = any(p.perturbed for p in jax.tree.leaves(head, is_leaf=is_primal))
    head, h, t, w = jax.tree.map(lambda p: p.value, (head, h, t, w), is_leaf=is_primal)

    def chunk(acc, xs):
        x, t, w = xs
        if trainable:
            logits, pullback = jax.vjp(project, head, x)
        else:
            logits, pullback = jax.vjp(lambda x: project(head, x), x)
        dz, lp = _onehot_minus_softmax(logits.astype(jnp.float32), t, w, project.barrier)
        grads = pullback(dz.astype(logits.dtype))
        if trainable:  # accumulated in fp32 over the chunks, as one matmul over all tokens would
            acc = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, grads[0])
        return acc, (grads[-1], lp)

    acc = [jnp.zeros(p.shape, jnp.float32) for p in head] if trainable else None
    acc, (dh, lp) = jax.lax.scan(chunk, acc, (h, t, w))
    dtypes = None if acc is None else [jnp.zeros((), p.dtype) for p in head]  # a bf16 head rounds once, in bwd
    return jnp.sum(w * lp), (acc, dtypes, dh, lp)


def _sum_bwd(project, res, g):
    dhead, dtypes, dh, lp = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda x, like: (g * x.astype(jnp.float32)).astype(like.dtype)  # noqa: E731
    dhead = None if dhead is None else [scale(d, like) for d, like in zip(dhead, dtypes)]
    return dhead, scale(dh, dh), None, g * lp


_logprob_sum.defvjp(_sum_fwd, _sum_bwd, symbolic_zeros=True)


def sft_loss(model: Decoder, batch: dict, ctx: Ctx = ON) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy over the batch's trained targets → (sum of −log p, number of targets).

    batch: tokens, positions, segment_ids, targets [B, S] int; loss_mask [B, S] float (see jaxft.data.encode).
    """
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], ctx=ctx)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -token_logprob_sum(model, h, batch["targets"], mask), jnp.sum(mask)
