"""Attention kernels behind one call: the XLA reference (einsum → fp32 softmax → einsum, [B, K, G, S, T] scores),
a blockwise flash-style attention in plain JAX (never holds S × T), cuDNN's fused kernel on GPU and Pallas
splash attention on TPU, picked per backend by `model.attention` (docs/models.md says what each uses).

Conventions (as jaxft.models.decoder)
    B batch · S queries · T keys · N query heads · K kv heads · G = N // K · H head_dim
    heads-major: q [B, K, G, S, H], k / v [B, K, T, H]; sequence-major: q [B, S, K, G, H], k / v [B, T, K, H]

Which key a query sees is described, not materialized (`Mask`): per row the segment of every query and key
(0 = padding or an empty cache slot), per position its slot (the index in the row: the cache slot when decoding,
after the prefix on the shared-prompt path) and the layer's window. A query attends to a key when both are in
the same non-zero segment, the key's slot is not after the query's and, on sliding layers, the query is fewer
than `window` slots after it (transformers' convention). The XLA path builds its additive bias from that;
the blockwise path computes each block's mask on the fly and skips key blocks no query of the block can see.

A query that sees no key at all (a padding row) gets zeros from the blockwise, cuDNN and splash kernels; the
XLA reference gives it the mean of every value (a uniform softmax over -max logits). Such rows never reach a
real token (nothing attends to a padding key) and the losses mask them, so losses and gradients agree.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
NO_WINDOW = 1 << 30  # the window of a global layer: wider than any sequence, and q_slot - kv_slot cannot overflow
SAVED = "attn_res"  # the name of the blockwise residuals (output, log-sum-exp) for a remat policy to keep


@partial(jax.tree_util.register_dataclass, data_fields=("q_seg", "kv_seg", "q_slot", "kv_slot", "window"),
         meta_fields=("aligned",))
@dataclasses.dataclass(frozen=True)
class Mask:
    """Who sees whom, per block on demand. q_seg [B, S], kv_seg [B, T] int32 segment ids (0 = padding / empty);
    q_slot [S], kv_slot [T] int32 positions in the row (kv_slot ascending); window [] int32 (NO_WINDOW: none).
    aligned (static): the queries are the keys (S == T, slots 0..S-1: a training or prefill forward without
    cache or prefix), the only form the fused kernels' causal masks describe."""

    q_seg: jax.Array
    kv_seg: jax.Array
    q_slot: jax.Array
    kv_slot: jax.Array
    window: jax.Array
    aligned: bool = False

    def allowed(self, q_seg=None, q_slot=None, kv_seg=None, kv_slot=None) -> jax.Array:
        """[B, S', T'] bool for the given slices of the fields (default: all of them)."""
        q_seg = self.q_seg if q_seg is None else q_seg
        q_slot = self.q_slot if q_slot is None else q_slot
        kv_seg = self.kv_seg if kv_seg is None else kv_seg
        kv_slot = self.kv_slot if kv_slot is None else kv_slot
        same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
        past = kv_slot[None, :] <= q_slot[:, None]
        near = q_slot[:, None] - kv_slot[None, :] < self.window
        return same & (past & near)[None]


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """model.attention and its block sizes. impl: auto | xla | blockwise | cudnn | splash; block_q / block_k:
    the blockwise (and splash) tiles, None = the backend's default; interpret: run splash's Pallas kernel in
    the interpreter (CPU tests)."""

    impl: str = "auto"
    block_q: int | None = None
    block_k: int | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


AUTO = AttentionKernel()


def as_kernel(attention: AttentionKernel | str) -> AttentionKernel:
    return attention if isinstance(attention, AttentionKernel) else AttentionKernel(attention)


def soft_cap(x, cap):
    """Gemma 2's logit soft-capping, tanh(x / cap) · cap (None: x); the decoder's final logits use it too."""
    return x if cap is None else jnp.tanh(x / cap) * cap


# ---------------------------------------------------------------- choosing


def cudnn_covers(q, mask: Mask, softcap) -> bool:
    """cuDNN's flash attention (jax.nn.dot_product_attention, jax 0.10) takes a causal mask, one left window,
    sequence lengths and a bias (a boolean mask becomes one), in bf16 / fp16 with head_dim ≤ 128 a multiple of
    8 and, with a bias in training, an even length; no logit soft-cap and no query offset (a cache, a prefix)."""
    S, H = q.shape[-2], q.shape[-1]
    return (softcap is None and mask.aligned and q.dtype in (jnp.bfloat16, jnp.float16) and H <= 128
            and H % 8 == 0 and S % 2 == 0)


def splash_covers(mask: Mask, S: int, kernel: AttentionKernel) -> bool:
    """Splash's masks are static: causal (and local) from slot 0, so only the aligned form; its tiles need S
    a multiple of 128 (the kernel's lane width)."""
    bq, bk = _splash_blocks(kernel, S)
    return mask.aligned and S % 128 == 0 and S % bq == 0 and S % bk == 0


def choose(kernel: AttentionKernel, q, mask: Mask, softcap, backend: str | None = None) -> str:
    """The implementation that runs for this call (static: shapes, dtypes and the backend are known at trace
    time). auto: GPU → cudnn where it covers the layer, else blockwise; TPU → splash where it covers, else
    blockwise; CPU → blockwise (scripts/bench_attention.py measured it faster than XLA's einsums at every
    length from 32 to 4096 keys, docs/performance.md, so no length switch). An explicit cudnn / splash falls
    back to blockwise where it does not cover the layer or the backend lacks it (splash runs anywhere in the
    Pallas interpreter: kernel.interpret)."""
    backend = backend or jax.default_backend()
    impl = kernel.impl
    if impl == "auto":
        impl = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "blockwise")
    if impl == "cudnn" and not (backend in ("gpu", "cuda") and cudnn_covers(q, mask, softcap)):
        return "blockwise"
    if impl == "splash" and not ((backend == "tpu" or kernel.interpret) and splash_covers(mask, q.shape[-2], kernel)):
        return "blockwise"
    return impl


def attend(kernel: AttentionKernel, q, k, v, mask: Mask, *, scale: float, softcap: float | None,
           sliding_window: int | None, heads_major: bool, backend: str | None = None):
    """softmax(q kᵀ · scale, soft-capped, masked) v in q's layout (see the conventions above); q [B, K, G, S, H]
    or [B, S, K, G, H]. sliding_window: the model's window (static; the mask's traced `window` says whether
    this layer uses it)."""
    if not heads_major:  # every kernel below reads heads-major; the reference keeps its own einsums
        if choose(kernel, q.transpose(0, 2, 3, 1, 4), mask, softcap, backend) == "xla":
            return xla_attention(q, k, v, mask, scale, softcap, "bskgh,btkh->bkgst", "bkgst,btkh->bskgh")
        out = attend(kernel, q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                     scale=scale, softcap=softcap, sliding_window=sliding_window, heads_major=True, backend=backend)
        return out.transpose(0, 3, 1, 2, 4)
    impl = choose(kernel, q, mask, softcap, backend)
    if impl == "xla":
        return xla_attention(q, k, v, mask, scale, softcap, "bkgsh,bkth->bkgst", "bkgst,bkth->bkgsh")
    if impl == "cudnn":
        return fused_attention(q, k, v, mask, scale, sliding_window, "cudnn")
    if impl == "splash":
        return splash_attention(q, k, v, mask, scale, softcap, sliding_window, kernel)
    bq, bk = blocks(kernel, q.shape[-2], k.shape[2], backend)
    return blockwise_attention(q, k, v, mask, scale, softcap, bq, bk)


def blocks(kernel: AttentionKernel, S: int, T: int, backend: str | None = None) -> tuple[int, int]:
    """The blockwise tiles: the kernel's, else 256 × 256 on CPU (scripts/bench_attention.py: as fast as 128,
    faster than 512 from 1k keys) and 128 × 128 elsewhere, never longer than the sequence."""
    default = 256 if (backend or jax.default_backend()) == "cpu" else 128
    return min(kernel.block_q or default, S), min(kernel.block_k or default, T)


# ---------------------------------------------------------------- the XLA reference


@partial(jax.checkpoint, static_argnums=(4, 5, 6, 7))
def xla_attention(q, k, v, mask: Mask, scale: float, softcap: float | None, qk: str, pv: str):
    """softmax(q kᵀ · scale + bias) v, fp32 softmax like HF eager; `qk` / `pv` are the einsums of the
    layout (heads-major or sequence-major). Probabilities: [B, K, G, S, T].

    Under jax.checkpoint: the backward pass recomputes the probabilities from q, k, v instead of
    keeping them for every layer (they grow with S², the rest with S)."""
    bias = jnp.where(mask.allowed(), 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # [B, 1, 1, S, T]
    logits = jnp.einsum(qk, q, k) * jnp.asarray(scale, q.dtype)
    logits = soft_cap(logits.astype(jnp.float32), softcap) + bias  # additive like HF eager
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum(pv, probs, v)


# ---------------------------------------------------------------- blockwise (flash-style) attention


def blockwise_attention(q, k, v, mask: Mask, scale: float, softcap: float | None, block_q: int, block_k: int):
    """The XLA reference's values (to fp32 rounding) without its S × T scores: an online softmax over key
    blocks per query block, visiting only the key blocks causality and the window leave visible; the
    backward recomputes each block from q, k, v, the output and the per-query log-sum-exp (FlashAttention-2).
    Heads-major q [B, K, G, S, H], k / v [B, K, T, H] → [B, K, G, S, H]; any S, T (padded to the blocks)."""
    S, T = q.shape[3], k.shape[2]
    Sp, Tp = -(-S // block_q) * block_q, -(-T // block_k) * block_k
    pad = lambda x, n, axis: jnp.pad(x, [(0, n if a == axis else 0) for a in range(x.ndim)])  # noqa: E731
    edge = lambda x, n: jnp.pad(x, (0, n), mode="edge")  # noqa: E731  padded slots keep the blocks' ranges
    m = Mask(pad(mask.q_seg, Sp - S, 1), pad(mask.kv_seg, Tp - T, 1), edge(mask.q_slot, Sp - S),
             edge(mask.kv_slot, Tp - T), mask.window, mask.aligned)  # padded queries / keys: segment 0
    out = _flash(pad(q, Sp - S, 3), pad(k, Tp - T, 2), pad(v, Tp - T, 2), m, scale, softcap, block_q, block_k)
    return out[:, :, :, :S]


def _ranges(m: Mask, bq: int, bk: int):
    """Per query block, the first and one-past-last key block it can see (by slots and window); and per key
    block the same range of query blocks. Blocks in between are visited even if masked: the mask is exact."""
    qs, ks = m.q_slot.reshape(-1, bq), m.kv_slot.reshape(-1, bk)
    seen = (ks.min(1)[None] <= qs.max(1)[:, None]) & (qs.min(1)[:, None] - ks.max(1)[None] < m.window)  # [nq, nk]

    def span(rows):  # [n, m] bool → first / one-past-last true column (0, 0 when none)
        any_ = rows.any(1)
        lo = jnp.argmax(rows, axis=1)
        hi = rows.shape[1] - jnp.argmax(rows[:, ::-1], axis=1)
        return jnp.where(any_, lo, 0), jnp.where(any_, hi, 0)

    return span(seen), span(seen.T)


def _block(x, i, n, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * n, n, axis)


def _scores(q, k, m: Mask, i, j, bq, bk, scale, softcap):
    """One block's soft-capped fp32 logits (masked to -inf) and the capped values' tanh for the backward:
    q [B, K, G, bq, H] (block i), k [B, K, bk, H] (block j) → [B, K, G, bq, bk]."""
    s = jnp.einsum("bkgsh,bkth->bkgst", q, k) * jnp.asarray(scale, q.dtype)  # as the reference: scale in q's dtype
    s = soft_cap(s.astype(jnp.float32), softcap)
    allow = m.allowed(_block(m.q_seg, i, bq, 1), _block(m.q_slot, i, bq, 0),
                      _block(m.kv_seg, j, bk, 1), _block(m.kv_slot, j, bk, 0))[:, None, None]
    return jnp.where(allow, s, -jnp.inf), s


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, m: Mask, scale, softcap, bq, bk):
    return _flash_fwd(q, k, v, m, scale, softcap, bq, bk)[0]


def _flash_fwd(q, k, v, m: Mask, scale, softcap, bq, bk):
    (lo, hi), _ = _ranges(m, bq, bk)
    B, K, G, _, H = q.shape

    def query_block(i):
        qi = _block(q, i, bq, 3)

        def key_block(j, carry):
            acc, mx, l = carry
            s, _ = _scores(qi, _block(k, j, bk, 2), m, i, j, bq, bk, scale, softcap)
            new = jnp.maximum(mx, s.max(-1))
            base = jnp.where(new == -jnp.inf, 0.0, new)  # a row that has seen nothing yet: exp(-inf) = 0, not nan
            p = jnp.exp(s - base[..., None])
            keep = jnp.exp(mx - base)
            pv = jnp.einsum("bkgst,bkth->bkgsh", p.astype(v.dtype), _block(v, j, bk, 2),
                            preferred_element_type=jnp.float32)
            return acc * keep[..., None] + pv, new, l * keep + p.sum(-1)

        init = (jnp.zeros((B, K, G, bq, H), jnp.float32), jnp.full((B, K, G, bq), -jnp.inf), jnp.zeros((B, K, G, bq)))
        acc, mx, l = jax.lax.fori_loop(lo[i], hi[i], key_block, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)  # unseen rows: 0
        return out.astype(v.dtype), jnp.where(l > 0, mx + jnp.log(l), jnp.inf)  # lse +inf: p = 0 in the backward

    out, lse = jax.lax.map(query_block, jnp.arange(q.shape[3] // bq))  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(q.shape[:3] + (-1, v.shape[-1]))
    lse = jnp.moveaxis(lse, 0, 3).reshape(q.shape[:4])
    out, lse = checkpoint_name(out, SAVED), checkpoint_name(lse, SAVED)
    return out, (q, k, v, m, out, lse)


def _flash_bwd(scale, softcap, bq, bk, res, dout):
    """FlashAttention-2's backward, one pass over query blocks: dq per block, dk / dv accumulated in fp32.
    ds = p (dp - delta) with delta = rowsum(dout · out); through the soft-cap c·tanh(x/c): × (1 - tanh²)."""
    q, k, v, m, out, lse = res
    (lo, hi), _ = _ranges(m, bq, bk)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, K, G, S]
    sc = jnp.asarray(scale, q.dtype)

    def query_block(carry, i):
        qi, doi = _block(q, i, bq, 3), _block(dout, i, bq, 3)
        lse_i, delta_i = _block(lse, i, bq, 3)[..., None], _block(delta, i, bq, 3)[..., None]

        def key_block(j, c):
            dq, dk, dv = c
            kj, vj = _block(k, j, bk, 2), _block(v, j, bk, 2)
            s, capped = _scores(qi, kj, m, i, j, bq, bk, scale, softcap)
            p = jnp.exp(s - lse_i)  # [B, K, G, bq, bk]
            dv_j = jnp.einsum("bkgst,bkgsh->bkth", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgsh,bkth->bkgst", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i)
            if softcap is not None:
                ds = ds * (1.0 - jnp.square(capped / softcap))
            ds = ds.astype(q.dtype) * sc
            dq = dq + jnp.einsum("bkgst,bkth->bkgsh", ds, kj, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgst,bkgsh->bkth", ds, qi, preferred_element_type=jnp.float32)
            add = lambda a, d: jax.lax.dynamic_update_slice_in_dim(a, _block(a, j, bk, 2) + d, j * bk, 2)  # noqa: E731
            return dq, add(dk, dk_j), add(dv, dv_j)

        dq = jnp.zeros(qi.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(lo[i], hi[i], key_block, (dq, *carry))
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(q.shape[3] // bq))
    dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- fused kernels: cuDNN (GPU), splash (TPU)


def fused_attention(q, k, v, mask: Mask, scale: float, sliding_window: int | None, implementation: str):
    """jax.nn.dot_product_attention on the aligned form: is_causal, the layer's left window as
    local_window_size (static, so a sliding model runs one of two calls per layer: lax.cond on the traced
    window), packing and padding as a boolean [B, 1, S, T] mask (jax 0.10's API has no segment ids; jax turns
    it into an additive bias in the compute dtype: two bytes per query-key pair and row, shared by the heads,
    where the XLA path holds four per head and pair). implementation:
    "cudnn" on a GPU; "xla" runs the same call on any backend (the tests). Heads-major in and out."""
    B, K, G, S, H = q.shape
    qs = q.transpose(0, 3, 1, 2, 4).reshape(B, S, K * G, H)  # head n = k·G + g, as q_proj's columns
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, T, K, H]
    same = (mask.q_seg[:, None, :, None] == mask.kv_seg[:, None, None, :]) & (mask.kv_seg[:, None, None, :] != 0)

    def call(window):
        return jax.nn.dot_product_attention(qs, ks, vs, mask=same, scale=scale, is_causal=True,
                                            local_window_size=window, implementation=implementation)

    if sliding_window is None:
        out = call(None)
    else:
        out = jax.lax.cond(mask.window < NO_WINDOW, lambda: call((sliding_window - 1, 0)), lambda: call(None))
    out = jnp.where(same.any(-1)[:, 0, :, None, None, None], out.reshape(B, S, K, G, H), 0)  # rows that see nothing: 0
    return out.transpose(0, 2, 3, 1, 4)


def _splash_blocks(kernel: AttentionKernel, S: int) -> tuple[int, int]:
    return min(kernel.block_q or 512, S), min(kernel.block_k or 512, S)


def splash_attention(q, k, v, mask: Mask, scale: float, softcap: float | None, sliding_window: int | None,
                     kernel: AttentionKernel):
    """Pallas splash attention (TPU; kernel.interpret runs it in the Pallas interpreter, any backend) on the
    aligned form: its MQA kernel (G query heads against one kv head, k / v never repeated) vmapped over kv
    heads and rows, segment ids for packing and padding, its soft-cap, and a static causal or local mask (a
    sliding model runs one of two kernels per layer: lax.cond on the traced window). q is scaled before the
    kernel (splash has no scale argument). Heads-major in and out."""
    B, K, G, S, H = q.shape
    bq, bk = _splash_blocks(kernel, S)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)

    def run(window):
        shape = (S, S)
        causal = splash_mask.CausalMask(shape) if window is None else splash_mask.LocalMask(shape, (window - 1, 0), 0)
        fn = splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([causal] * G), block_sizes=sizes,
                                                  attn_logits_soft_cap=softcap, interpret=kernel.interpret)
        one = lambda q, k, v, seg: fn(q, k, v, segment_ids=splash.SegmentIds(seg, seg))  # noqa: E731 q [G, S, H]
        per_row = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
        return jax.vmap(per_row)(q * jnp.asarray(scale, q.dtype), k, v, mask.q_seg)

    if sliding_window is None:
        out = run(None)
    else:
        out = jax.lax.cond(mask.window < NO_WINDOW, lambda: run(sliding_window), lambda: run(None))
    # a padding query (segment 0) sees the padding keys in splash; here, as in the blockwise kernel, it gets 0
    return jnp.where(mask.q_seg[:, None, None, :, None] != 0, out, 0).astype(v.dtype)
