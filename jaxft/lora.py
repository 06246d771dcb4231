"""LoRA under its base layer, PEFT's definition: y = x W + s · dropout(x) A B.

`attach` puts a `LoRA` module in the `lora` slot of each targeted `Linear`, so base parameter paths
never change: `model.layers.self_attn.q_proj.kernel` stays, `...q_proj.lora.a` / `.lora.b` appear.
Layers are stacked, so `a` is [L, in, r] and `b` is [L, r, out] (PEFT's lora_A.weight is `a[i].T`,
lora_B.weight is `b[i].T`). A is kaiming-uniform (PEFT's default), B is zero: a fresh adapter leaves
the model's outputs unchanged. s = alpha / r, or alpha / sqrt(r) with rsLoRA.

`split` freezes by construction: the optimizer and the gradient see the trainable subtree only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft.config import LoraConfig
from jaxft.errors import JaxftError
from jaxft.models.decoder import Decoder, Linear

LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVEABLE = ("embed_tokens", "lm_head")


class LoRA(nnx.Module):
    """The low-rank update of one (stacked) Linear. Parameters are fp32 whatever the base dtype."""

    def __init__(self, a: jax.Array, b: jax.Array, scale: float, dropout: float = 0.0):
        self.a = nnx.LoRAParam(a)  # [L, in, r]
        self.b = nnx.LoRAParam(b)  # [L, r, out]
        self.scale, self.dropout = scale, dropout
        self.dropout_key = nnx.data(None)  # set per forward by Decoder.hidden when training with dropout

    def __call__(self, x):
        if self.dropout and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.dot(x, self.a[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)  # scale the [.., r] side
        xa = checkpoint_name(xa, "proj")  # [.., r]: kept under remat "proj", so x A never runs twice
        return jnp.dot(xa, self.b[...].astype(x.dtype))


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r


def targets(model: Decoder, names: tuple[str, ...]) -> list[tuple[tuple, Linear]]:
    """The (path, Linear) pairs named by `names`: HF module names (q_proj, ...) or "all-linear"."""
    wanted = set(LAYER_LINEARS) if "all-linear" in names else set(names)
    unknown = sorted(wanted - set(LAYER_LINEARS))
    if unknown:
        raise JaxftError(f"lora.target_modules: {unknown[0]!r} is not a linear layer of the decoder "
                         f"(known: {', '.join(LAYER_LINEARS)}, all-linear)")
    return [(path, m) for path, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and path[:2] == ("model", "layers") and path[-1] in wanted]


def attach(model: Decoder, cfg: LoraConfig, key: jax.Array) -> Decoder:
    """Add fresh LoRA factors under every targeted layer (in place; returns the model)."""
    bad = sorted(set(cfg.modules_to_save) - set(SAVEABLE))
    if bad:
        raise JaxftError(f"lora.modules_to_save: {bad[0]!r} is not one of {', '.join(SAVEABLE)}")
    s = scale(cfg)
    for i, (_, lin) in enumerate(targets(model, cfg.target_modules)):
        L, d_in, d_out = lin.kernel.shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)), as PEFT initialises lora_A
        a = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, cfg.r), jnp.float32, -bound, bound)
        lin.lora = LoRA(a, jnp.zeros((L, cfg.r, d_out), jnp.float32), s, cfg.dropout)
    return model


def trainable_filter(cfg: LoraConfig):
    """nnx filter of what trains: LoRA factors (+ modules_to_save), or every parameter without LoRA."""
    if not cfg.enabled:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, *[nnx.All(nnx.Param, nnx.PathContains(m)) for m in cfg.modules_to_save])


def split(model: Decoder, cfg: LoraConfig):
    """model → (graphdef, trainable, frozen); `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
    return nnx.split(model, trainable_filter(cfg), ...)


def merged_kernel(lin: Linear) -> jax.Array:
    """W' = W + s · A B for a (stacked) Linear, in fp32 — the kernel a merged export writes."""
    w = lin.kernel[...].astype(jnp.float32)
    if lin.lora is None:
        return w
    return w + lin.lora.scale * jnp.einsum("lir,lro->lio", lin.lora.a[...], lin.lora.b[...])
