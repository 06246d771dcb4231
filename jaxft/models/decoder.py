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
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft.models.config import DecoderConfig, RopeConfig, rope_inv_freq

Cache = dict[str, jax.Array]  # k, v: [L, B, T, K, H]; segment_ids: [B, T] (0 = empty slot); index: []

REMAT_POLICIES = {  # what a layer keeps for the backward pass (its input h is always kept)
    "none": None,  # everything XLA wants, elementwise intermediates included
    # the q/k/v/o/gate/up projections and the attention output: no matmul runs twice, while norms,
    # RoPE, activations and residual adds are recomputed (SmolLM2 LoRA step at 4 x 256: 1.05 GB of
    # XLA temp memory against 2.19 GB for "none"; scripts/ab_grad.py)
    "proj": jax.checkpoint_policies.save_only_these_names("proj"),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every unbatched matmul output
    "full": jax.checkpoint_policies.nothing_saveable,  # only h: the layer's forward runs again
}


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] (HF weight transposed).

    The slot `lora` stays None until LoRA is attached under this layer; base paths never change.
    With a quantized base (QLoRA) `kernel` is a jaxft.quant.QuantKernel instead of a Param."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None
        self.dtype = dtype
        self.lora = nnx.data(None)  # jaxft.lora.attach puts a LoRA module here

    def __call__(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [B*S, in]: plain 2-D GEMMs forward and backward (XLA:CPU is 2x slower on 3-D)
        if isinstance(self.kernel, nnx.Variable):
            y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        else:  # a quantized frozen kernel (jaxft.quant.QuantKernel) dequantizes itself inside the step
            y = self.kernel.dot(x)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y.reshape(*lead, y.shape[-1])


class RMSNorm(nnx.Module):
    """RMSNorm in fp32, scaled by (offset + scale); rounding order follows transformers per family."""

    def __init__(self, dim: int, *, eps: float, offset: float, param_dtype):
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype))
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


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(D, N * H, bias=cfg.qkv_bias, **lin)
        self.k_proj = Linear(D, K * H, bias=cfg.qkv_bias, **lin)
        self.v_proj = Linear(D, K * H, bias=cfg.qkv_bias, **lin)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, **lin)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
            self.q_norm, self.k_norm = RMSNorm(H, **norm), RMSNorm(H, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x, cos, sin, bias, kv: tuple[jax.Array, jax.Array] | None, index):
        """x [B, S, D]; bias [B, 1, 1, S, T] fp32 (0 or -max); kv: this layer's cache ([B, T, K, H] each) or None."""
        cfg = self.cfg
        B, S, _ = x.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = checkpoint_name(self.q_proj(x), "proj").reshape(B, S, N, H)
        k = checkpoint_name(self.k_proj(x), "proj").reshape(B, S, K, H)
        v = checkpoint_name(self.v_proj(x), "proj").reshape(B, S, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write this step's keys/values at slot `index`, attend over the cache
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            kv = (k, v)
        # heads-major layouts make both attention matmuls plain batched GEMMs (2.5x faster on XLA:CPU)
        q = q.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, H]
        kt, vt = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(x.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]
        out = checkpoint_name(_attend(q, kt, vt, bias, cfg.scale, cfg.attn_softcap), "proj")  # [B, K, G, S, H]
        return checkpoint_name(self.o_proj(out.transpose(0, 3, 1, 2, 4).reshape(B, S, N * H)), "proj"), kv


@partial(jax.checkpoint, static_argnums=(4, 5))
def _attend(q, kt, vt, bias, scale: float, softcap: float | None):
    """softmax(q kᵀ · scale + bias) v, fp32 softmax like HF eager. q [B, K, G, S, H]; kt, vt [B, K, T, H].

    Under jax.checkpoint: the backward pass recomputes the [B, K, G, S, T] probabilities from q, k, v
    instead of keeping them for every layer (they grow with S², the rest with S)."""
    logits = jnp.einsum("bkgsh,bkth->bkgst", q, kt) * jnp.asarray(scale, q.dtype)
    logits = _softcap(logits.astype(jnp.float32), softcap) + bias  # additive like HF eager
    probs = jax.nn.softmax(logits, axis=-1).astype(vt.dtype)
    return jnp.einsum("bkgst,bkth->bkgsh", probs, vt)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        lin = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj, self.up_proj, self.down_proj = Linear(D, F, **lin), Linear(D, F, **lin), Linear(F, D, **lin)
        self.act = cfg.act

    def __call__(self, x):
        g, u = checkpoint_name(self.gate_proj(x), "proj"), checkpoint_name(self.up_proj(x), "proj")
        g = jax.nn.silu(g) if self.act == "silu" else jax.nn.gelu(g, approximate=self.act == "gelu_tanh")
        return self.down_proj(g * u)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
        D = cfg.hidden_size
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(D, **norm)
        self.post_attention_layernorm = RMSNorm(D, **norm)
        if cfg.sandwich_norm:  # Gemma 2/3; here post_attention_layernorm follows attention, not residual
            self.pre_feedforward_layernorm = RMSNorm(D, **norm)
            self.post_feedforward_layernorm = RMSNorm(D, **norm)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def __call__(self, h, cos, sin, bias, kv, index):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, bias, kv, index)
        if self.pre_feedforward_layernorm is not None:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), kv
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), param_dtype))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, h):
        """The tied output head: h [..., D] → h · embeddingᵀ [..., V]."""
        return jnp.dot(h, self.embedding[...].astype(h.dtype).T)


class Backbone(nnx.Module):
    """HF's `model.`: embed_tokens, stacked layers, final norm."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs):
            return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)


class Decoder(nnx.Module):
    """A causal LM. `Decoder(cfg, rngs=nnx.Rngs(0))` is random; `jaxft.load_pretrained` fills real weights.

    dtype: compute dtype (fp32 or bf16); param_dtype: storage dtype of the weights.
    remat: "none" | "proj" | "dots" | "full" — what a layer keeps for the backward pass (REMAT_POLICIES).
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "proj",
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat = cfg, dtype, remat
        self.constrain = None  # h [B, S, D] → h with a sharding constraint, at block boundaries (jaxft.sharding)
        self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, dropout_key=None):
        """tokens [B, S] → (logits [B, S, V], cache). See `hidden` for the arguments."""
        h, cache = self.hidden(tokens, positions, segment_ids, cache, dropout_key)
        return self.logits(h), cache

    @property
    def head(self) -> nnx.Module:
        """The output projection: lm_head, or embed_tokens when the embeddings are tied."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def logits(self, h):
        """Final hidden states [..., D] → logits [..., V] in the compute dtype (final soft-cap applied)."""
        return head_logits(self.head, h, self.config.final_softcap)

    def hidden(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, dropout_key=None):
        """Run the layers; returns (final-normed hidden [B, S, D], updated cache or None).

        tokens, positions, segment_ids: [B, S] int. positions default to 0..S-1; segment_ids to all 1
        (0 marks padding, equal ids are one document of a packed row). With `cache` (see `init_cache`)
        the S new tokens are written at slot cache["index"] and attend to everything cached before.
        dropout_key: turns on LoRA dropout (training); each layer and module gets its own fold of it.
        """
        cfg = self.config
        B, S = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        q_slot = index + jnp.arange(S)
        if cache is None:
            kv_seg, kv_slot = segment_ids, q_slot
        else:
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
            kv_slot = jnp.arange(kv_seg.shape[1])
        mask = (segment_ids[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
        mask &= kv_slot[None, None, :] <= q_slot[None, :, None]  # [B, S, T]
        to_bias = lambda m: jnp.where(m, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # noqa: E731 [B,1,1,S,T]
        bias = bias_local = to_bias(mask)
        if cfg.sliding_window:
            bias_local = to_bias(mask & (q_slot[:, None] - kv_slot[None, :] < cfg.sliding_window)[None])

        cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
        cos_l, sin_l = (cos, sin) if cfg.rope_local is None else rope_tables(cfg.rope_local, cfg.head_dim, positions)

        h = self.model.embed_tokens(tokens).astype(self.dtype)
        if cfg.embed_scale:
            h = h * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
        constrain = self.constrain or (lambda x: x)
        h = constrain(h)

        graphdef, layer_state = nnx.split(self.model.layers)
        sliding = jnp.asarray(cfg.is_sliding)

        def body(h, xs):
            state, is_sliding, kv, key = xs
            layer = nnx.merge(graphdef, state)
            if key is not None:
                _seed_dropout(layer, key)
            m = jnp.where(is_sliding, bias_local, bias) if cfg.sliding_window else bias
            c, s = jnp.where(is_sliding, cos_l, cos), jnp.where(is_sliding, sin_l, sin)
            h, kv = layer(h, c, s, m, kv, index)
            return constrain(h), kv

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        kv_in = None if cache is None else (cache["k"], cache["v"])
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
        h, kv_out = jax.lax.scan(body, h, (layer_state, sliding, kv_in, keys))
        h = self.model.norm(h)
        if cache is not None:
            cache = dict(k=kv_out[0], v=kv_out[1], segment_ids=kv_seg, index=index + S)
        return h, cache

    def init_cache(self, batch: int, length: int, dtype=None) -> Cache:
        """An empty KV cache for `batch` rows of up to `length` tokens."""
        cfg = self.config
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))


def head_logits(head: nnx.Module, h, softcap: float | None):
    """`Decoder.logits` given its `head` module (jaxft.losses differentiates the head by hand)."""
    return _softcap(head.attend(h) if isinstance(head, Embed) else head(h), softcap)


def _seed_dropout(layer: nnx.Module, key: jax.Array):
    """Give every module with dropout (LoRA) its own key, on this traced copy of the layer only."""
    for i, (_, m) in enumerate(nnx.iter_modules(layer)):
        if getattr(m, "dropout", 0.0):
            m.dropout_key = jax.random.fold_in(key, i)


def num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
