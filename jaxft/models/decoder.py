"""The one parametric decoder: Llama, Mistral, Qwen2/3, Gemma 1/2/3 are switches of DecoderConfig.

Conventions
    B batch · S query length · T key length (= S, or the cache length when decoding)
    D hidden · F intermediate · N query heads · K kv heads · G = N // K · H head_dim · V vocab · L layers

Parameter paths mirror Hugging Face: `model.embed_tokens.embedding`, `model.layers.self_attn.q_proj.kernel`,
`model.norm.scale`, `lm_head.kernel`. The layers are stacked (a leading [L] axis on every layer
parameter) and run with `jax.lax.scan`, so compile time does not grow with depth. Kernels are [in, out]
(HF's `weight` transposed).

Attention mask from `segment_ids` [B, S]: a query attends to a key when both are in the same
segment, the key is not padding (segment 0), the key is not in the future and, on sliding layers,
`q - k < sliding_window` (transformers' convention). Packed documents therefore never see each other.
The mask travels as a description (jaxft.models.attention.Mask), never as an [S, T] array: each attention
kernel (`attention`: xla, blockwise, cudnn, splash; auto picks per backend) builds what it needs from it.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft.context import ON, Ctx
from jaxft.models.attention import AUTO, NO_WINDOW, SAVED, AttentionKernel, Mask, as_kernel, attend, soft_cap
from jaxft.models.config import DecoderConfig, RopeConfig, rope_inv_freq
from jaxft.models.names import BATCH_AXES, HEAD_AXES, PROJECTIONS

Cache = dict[str, jax.Array]  # k, v: [L, B, K, T, H] or [L, B, T, K, H] (init_cache); segment_ids: [B, T] (0 = empty slot); index: []
KV = dict[str, jax.Array]  # a prefix's keys / values for the layers to attend to: a Cache without index (keep_kv)

REMAT_POLICIES = {  # what a layer keeps for the backward pass (its input h is always kept)
    "none": None,  # everything XLA wants, elementwise intermediates included
    # keeps q/k/v/o/gate/up, the adapters' x·A and the attention output: no matmul runs twice, while
    # norms, RoPE, activations and residual adds are recomputed (`scripts/ab_grad.py --remat` measures it)
    # (and the blockwise attention's output and log-sum-exp, O(S): its forward does not run again either)
    "proj": jax.checkpoint_policies.save_only_these_names("proj", SAVED),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every unbatched matmul output
    "full": jax.checkpoint_policies.nothing_saveable,  # only h: the layer's forward runs again
}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Layout choices tuned on XLA:CPU (scripts/ab_grad.py, scripts/profile_step.py measure them); each
    can be switched off to re-measure on TPU / GPU, where XLA may prefer the plain forms.

    flat_gemm: Linear runs [B*S, in] @ [in, out] 2-D GEMMs instead of 3-D dots.
    heads_major: attention transposes to [B, K, G, S, H] so both attention matmuls are batched GEMMs.
    exp_barrier: the loss writes exp(z - max) to memory once (jaxft.losses._softmax_parts) instead of
        letting XLA fuse it into the sum's reduction.
    """

    flat_gemm: bool = True
    heads_major: bool = True
    exp_barrier: bool = True


CPU_TUNED, PLAIN = Tuning(), Tuning(False, False, False)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] (HF weight transposed).

    `name` is the HF module name (q_proj, ..., lm_head); `axes` its logical (in, out) axes, declared
    here for the sharding rules. The slot `adapter` stays None until an adapter is attached under this
    layer (jaxft.adapters); base paths never change. With a quantized base (QLoRA) `kernel` is a
    jaxft.quant.QuantKernel instead of a Param."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs, name: str = "",
                 tuning: Tuning = CPU_TUNED):
        self.axes = PROJECTIONS[name][1] if name in PROJECTIONS else HEAD_AXES.get(name, (None, None))
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), param_dtype), axes=self.axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), axes=self.axes[1:]) if bias else None
        self.dtype, self.name, self.tuning = dtype, name, tuning
        self.index = list(PROJECTIONS).index(name) if name in PROJECTIONS else len(PROJECTIONS)  # dropout fold
        self.adapter = nnx.data(None)

    def base(self, x):
        """The frozen layer: x [..., in] → [..., out] in the compute dtype."""
        if isinstance(self.kernel, nnx.Variable):
            y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        else:  # a quantized frozen kernel (jaxft.quant.QuantKernel) dequantizes itself inside the step
            y = self.kernel.dot(x)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def __call__(self, x, ctx: Ctx = ON):
        lead = x.shape[:-1]
        if self.tuning.flat_gemm:  # [B*S, in]: 2-D GEMMs forward and backward (CPU-tuned, see Tuning)
            x = x.reshape(-1, x.shape[-1])
        if self.adapter is None or (not ctx.enabled and not hasattr(self.adapter, "off")):
            y = self.base(x)
        elif not ctx.enabled:  # the model as loaded (PiSSA's kernel is a residual: its `off` adds W back)
            y = self.adapter.off(x, self.base, self.kernel)
        else:
            if ctx.adapter_ids is not None and self.tuning.flat_gemm:  # one id per row of the flattened x
                ctx = dataclasses.replace(ctx, adapter_ids=jnp.repeat(ctx.adapter_ids, x.shape[0] // lead[0]))
            y = self.adapter(x, self.base, self.kernel, ctx.fold(self.index))
        return y.reshape(*lead, y.shape[-1])


class RMSNorm(nnx.Module):
    """RMSNorm in fp32, scaled by (offset + scale); rounding order follows transformers per family."""

    def __init__(self, dim: int, *, eps: float, offset: float, param_dtype, axes=("norm",)):
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), axes=axes)
        self.eps, self.offset = eps, offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)) in fp32, then cast
            return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)  # Llama: cast, then scale


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, S, H] (fp32) for integer positions [B, S]."""
    inv = jnp.asarray(rope_inv_freq(rope, head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, S, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, S, heads, H]; rotate-half convention of transformers, in x's dtype."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs, tuning: Tuning = CPU_TUNED,
                 attention: AttentionKernel = AUTO):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, tuning=tuning)
        self.q_proj = Linear(D, N * H, bias=cfg.qkv_bias, name="q_proj", **lin)
        self.k_proj = Linear(D, K * H, bias=cfg.qkv_bias, name="k_proj", **lin)
        self.v_proj = Linear(D, K * H, bias=cfg.qkv_bias, name="v_proj", **lin)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, name="o_proj", **lin)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype, axes=(None,))
            self.q_norm, self.k_norm = RMSNorm(H, **norm), RMSNorm(H, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.cfg, self.heads_major, self.kernel = cfg, tuning.heads_major, attention

    def __call__(self, x, cos, sin, mask: Mask, kv: tuple[jax.Array, jax.Array, jax.Array] | None, index,
                 ctx: Ctx = ON, prefix: tuple[jax.Array, jax.Array] | None = None):
        """x [B, S, D]; mask: who sees whom over the T keys (jaxft.models.attention.Mask, this layer's window
        set); kv: (k, v, layer) — the whole stacked cache (`init_cache`'s layout) and this layer's index in
        it — or None; prefix: this layer's keys and values [B, K, T - S, H] (or [B, T - S, K, H]) of earlier
        tokens, attended to before the S new ones.
        Returns (out, kv, (k, v) of the S new tokens in the cache layout)."""
        cfg = self.cfg
        B, S, _ = x.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = checkpoint_name(self.q_proj(x, ctx), "proj").reshape(B, S, N, H)
        k = checkpoint_name(self.k_proj(x, ctx), "proj").reshape(B, S, K, H)
        v = checkpoint_name(self.v_proj(x, ctx), "proj").reshape(B, S, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(B, S, K, N // K, H)
        if self.heads_major:  # keys / values as [B, K, T, H]: both attention matmuls are plain batched GEMMs
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        new = (k, v)
        if prefix is not None:  # differentiable, unlike the cache: the prefix's gradient flows back to its pass
            t = 2 if self.heads_major else 1
            k, v = (jnp.concatenate([pre.astype(a.dtype), a], axis=t) for pre, a in zip(prefix, (k, v)))
        if kv is not None:
            # Only this step's S keys / values are written, in place, into the stacked cache (a carry of the
            # layer scan): passing the cache through the scan as xs / ys made XLA write a whole new one per step
            k_all, v_all, layer = kv
            at = (layer, 0, 0, index, 0) if self.heads_major else (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            k, v = (jax.lax.dynamic_index_in_dim(a, layer, keepdims=False) for a in (k_all, v_all))
            kv = (k_all, v_all, layer)
        k, v = k.astype(q.dtype), v.astype(x.dtype)
        run = partial(attend, self.kernel, mask=mask, scale=cfg.scale, softcap=cfg.attn_softcap,
                      sliding_window=cfg.sliding_window, heads_major=self.heads_major)
        if self.heads_major:
            out = run(q.transpose(0, 2, 3, 1, 4), k, v).transpose(0, 3, 1, 2, 4)  # from [B, K, G, S, H]
        else:
            out = run(q, k, v)
        out = checkpoint_name(out, "proj")  # [B, S, K, G, H]
        return checkpoint_name(self.o_proj(out.reshape(B, S, N * H), ctx), "proj"), kv, new


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs, tuning: Tuning = CPU_TUNED):
        D, F = cfg.hidden_size, cfg.intermediate_size
        lin = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, tuning=tuning)
        self.gate_proj = Linear(D, F, name="gate_proj", **lin)
        self.up_proj = Linear(D, F, name="up_proj", **lin)
        self.down_proj = Linear(F, D, name="down_proj", **lin)
        self.act = cfg.act

    def __call__(self, x, ctx: Ctx = ON):
        g, u = checkpoint_name(self.gate_proj(x, ctx), "proj"), checkpoint_name(self.up_proj(x, ctx), "proj")
        g = jax.nn.silu(g) if self.act == "silu" else jax.nn.gelu(g, approximate=self.act == "gelu_tanh")
        return self.down_proj(g * u, ctx)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs, tuning: Tuning = CPU_TUNED,
                 attention: AttentionKernel = AUTO):
        norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
        D = cfg.hidden_size
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, tuning=tuning,
                                   attention=attention)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, tuning=tuning)
        self.input_layernorm = RMSNorm(D, **norm)
        self.post_attention_layernorm = RMSNorm(D, **norm)
        if cfg.sandwich_norm:  # Gemma 2/3; here post_attention_layernorm follows attention, not residual
            self.pre_feedforward_layernorm = RMSNorm(D, **norm)
            self.post_feedforward_layernorm = RMSNorm(D, **norm)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def __call__(self, h, cos, sin, mask: Mask, kv, index, ctx: Ctx = ON, prefix=None):
        a, kv, new = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, index, ctx, prefix)
        if self.pre_feedforward_layernorm is not None:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), ctx)), kv, new
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), ctx), kv, new


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), param_dtype), axes=("vocab", "embed"))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, h):
        """The tied output head: h [..., D] → h · embeddingᵀ [..., V]."""
        return jnp.dot(h, self.embedding[...].astype(h.dtype).T)


def constrain_batch(h):
    """h [B, ...] split over the batch mesh axes of the mesh in context (`jax.set_mesh`), whole on each
    device; unchanged without a mesh or when they do not divide B."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return h
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if n == 1 or h.shape[0] % n:
        return h
    return jax.lax.with_sharding_constraint(h, jax.sharding.PartitionSpec(BATCH_AXES))


class Backbone(nnx.Module):
    """HF's `model.`: embed_tokens, stacked layers, final norm — and the forward pass every head shares."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, remat: str = "proj", rngs,
                 tuning: Tuning = CPU_TUNED, attention: AttentionKernel | str = "auto"):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs):
            return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, tuning=tuning,
                                attention=as_kernel(attention))

        self.layers = stacked(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
        self.config, self.dtype, self.remat = cfg, dtype, remat

    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, ctx: Ctx = ON, *,
                 prefix: tuple[KV, jax.Array] | None = None, keep_kv: bool = False):
        """Run the layers; returns (final-normed hidden [B, S, D], updated cache or None).

        tokens, positions, segment_ids: [B, S] int. positions default to 0..S-1; segment_ids to all 1
        (0 marks padding, equal ids are one document of a packed row). With `cache` (see `init_cache`)
        the S new tokens are written at slot cache["index"] and attend to everything cached before; the cache is
        for inference (a carry of the layer scan: differentiating through it would keep one per layer).
        The training form of the same: `keep_kv=True` returns, in place of the cache, every layer's keys and
        values of these tokens (a KV: k, v [L, B, ...], segment_ids [B, S]; scan outputs, differentiable), and
        `prefix=(kv, src)` runs the S tokens of each row b after the prefix row src[b] of `kv` (its positions
        are the slots before them): a prompt shared by several rows runs once, its gradients summed over them.
        ctx: per-call state for the adapters (dropout key, adapters off, per-row adapter ids).
        Under a mesh in context (`jax.set_mesh`), activations stay split over the batch axes.
        """
        cfg = self.config
        B, S = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        pre, src = (None, None) if prefix is None else prefix
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if pre is not None:
            index = jnp.asarray(pre["segment_ids"].shape[1], jnp.int32)
        q_slot = index + jnp.arange(S)
        if cache is not None:
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
            kv_slot = jnp.arange(kv_seg.shape[1])
        elif pre is not None:
            kv_seg = jnp.concatenate([pre["segment_ids"][src], segment_ids], axis=1)
            kv_slot = jnp.arange(kv_seg.shape[1])
        else:
            kv_seg, kv_slot = segment_ids, q_slot
        mask = Mask(segment_ids.astype(jnp.int32), kv_seg.astype(jnp.int32), q_slot.astype(jnp.int32),
                    kv_slot.astype(jnp.int32), jnp.asarray(NO_WINDOW, jnp.int32), aligned=cache is None and pre is None)

        cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
        cos_l, sin_l = (cos, sin) if cfg.rope_local is None else rope_tables(cfg.rope_local, cfg.head_dim, positions)

        h = self.embed_tokens(tokens).astype(self.dtype)
        if cfg.embed_scale:
            h = h * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
        h = constrain_batch(h)

        graphdef, layer_state = nnx.split(self.layers)
        sliding = jnp.asarray(cfg.is_sliding)

        def body(carry, xs):
            h, kv = carry
            state, is_sliding, i, p_kv = xs
            layer = nnx.merge(graphdef, state)
            m = mask
            if cfg.sliding_window:  # traced per layer: one scanned body serves local and global layers
                m = dataclasses.replace(mask, window=jnp.where(is_sliding, cfg.sliding_window, NO_WINDOW))
            c, s = jnp.where(is_sliding, cos_l, cos), jnp.where(is_sliding, sin_l, sin)
            p_kv = None if p_kv is None else (p_kv[0][src], p_kv[1][src])
            h, kv, new = layer(h, c, s, m, None if kv is None else (*kv, i), index, ctx.fold(i), p_kv)
            return (constrain_batch(h), None if kv is None else kv[:2]), new if keep_kv else None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        kv = None if cache is None else (cache["k"], cache["v"])
        xs = (layer_state, sliding, jnp.arange(cfg.num_layers), None if pre is None else (pre["k"], pre["v"]))
        (h, kv), new = jax.lax.scan(body, (h, kv), xs)
        h = self.norm(h)
        if keep_kv:
            return h, dict(k=new[0], v=new[1], segment_ids=segment_ids)
        if cache is not None:
            cache = dict(k=kv[0], v=kv[1], segment_ids=kv_seg, index=index + S)
        return h, cache


class Decoder(nnx.Module):
    """A causal LM: the Backbone (HF's `model.`) and the LM head beside it (`lm_head`, or the tied
    embeddings). `Decoder(cfg, rngs=nnx.Rngs(0))` is random; `jaxft.formats.hf.load_pretrained` fills real weights.

    dtype: compute dtype (fp32 or bf16); param_dtype: storage dtype of the weights.
    remat: "none" | "proj" | "dots" | "full" — what a layer keeps for the backward pass (REMAT_POLICIES).
    tuning: the CPU-tuned layout switches (Tuning).
    attention: "auto" | "xla" | "blockwise" | "cudnn" | "splash", or a jaxft.models.attention.AttentionKernel
    (with block sizes) — the attention kernel (`choose` says which runs where).
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "proj",
                 tuning: Tuning = CPU_TUNED, attention: AttentionKernel | str = "auto", rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat, self.tuning = cfg, dtype, remat, tuning
        self.attention = as_kernel(attention)
        self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs, tuning=tuning,
                              attention=self.attention)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            name="lm_head", tuning=tuning)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, ctx: Ctx = ON):
        """tokens [B, S] → (logits [B, S, V], cache). See `Backbone.__call__` for the arguments."""
        h, cache = self.model(tokens, positions, segment_ids, cache, ctx)
        return self.logits(h), cache

    def hidden(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, ctx: Ctx = ON, **kw):
        """(final-normed hidden [B, S, D], cache): the backbone's forward (`Backbone.__call__`; kw: prefix,
        keep_kv)."""
        return self.model(tokens, positions, segment_ids, cache, ctx, **kw)

    @property
    def head(self) -> nnx.Module:
        """The output projection: lm_head, or embed_tokens when the embeddings are tied."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def logits(self, h):
        """Final hidden states [..., D] → logits [..., V] in the compute dtype (final soft-cap applied)."""
        return head_logits(self.head, h, self.config.final_softcap)

    def init_cache(self, batch: int, length: int, dtype=None) -> Cache:
        """An empty KV cache for `batch` rows of up to `length` tokens."""
        return init_cache(self.config, batch, length, dtype or self.dtype, heads_major=self.tuning.heads_major)


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype, heads_major: bool = True) -> Cache:
    """k, v: [L, B, K, T, H] (heads_major, the attention's own layout: no transpose per step) or [L, B, T, K, H]."""
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    shape = (L, batch, K, length, H) if heads_major else (L, batch, length, K, H)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))


def cache_rows(cache: Cache, src) -> Cache:
    """The cache of rows `src` [B] (indices into its rows): a prompt prefilled once, handed to its B rows."""
    return dict(cache, k=cache["k"][:, src], v=cache["v"][:, src], segment_ids=cache["segment_ids"][src])


def head_logits(head: nnx.Module, h, softcap: float | None):
    """`Decoder.logits` given its `head` module (jaxft.losses differentiates the head by hand). The head
    runs with adapters on: the LM head itself is never adapted, only trained in full (modules_to_save)."""
    return soft_cap(head.attend(h) if isinstance(head, Embed) else head(h), softcap)


def num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
