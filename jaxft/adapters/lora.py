"""LoRA under its base layer, PEFT's definition: y = x W + s · dropout(x) A B.

Layers are stacked, so `a` is [L, in, r] and `b` is [L, r, out] (PEFT's lora_A.weight is `a[i].T`,
lora_B.weight is `b[i].T`). A is kaiming-uniform (PEFT's default) or N(0, 1/r) (`lora.init: gaussian`),
B is zero: a fresh adapter leaves the model's outputs unchanged. s = alpha / r, or alpha / sqrt(r) with rsLoRA. The factors are fp32
whatever the base dtype, and declare their logical axes where they are made: `a` shards like its
base's input, `b` like its output, the rank never.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft.config import LoraConfig, residual_init
from jaxft.context import Ctx
from jaxft.errors import JaxftError


def scale(cfg) -> float:
    """PEFT's scaling of a LoraConfig: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r


class LoRA(nnx.Module):
    method = "lora"
    peft_type = "LORA"

    def __init__(self, a: jax.Array, b: jax.Array, scale: float, dropout: float = 0.0,
                 axes: tuple[str | None, str | None] = (None, None)):
        self.a = nnx.LoRAParam(a, axes=(axes[0], "rank"))  # [L, in, r]; axes per layer (the scan adds `layers`)
        self.b = nnx.LoRAParam(b, axes=("rank", axes[1]))  # [L, r, out]
        self.scale, self.dropout = scale, dropout

    @staticmethod
    def target_names(cfg, model_type: str) -> tuple[str, ...]:
        """The projections this method adapts (lora.target_modules as given)."""
        return tuple(cfg.target_modules)

    @classmethod
    def init(cls, lin, cfg, key: jax.Array) -> LoRA:
        """A fresh adapter for the stacked Linear `lin` (kernel [L, in, out]): A kaiming-uniform (a=sqrt(5))
        or, with lora.init=gaussian, N(0, 1/r) as PEFT; B zero."""
        L, d_in, d_out = lin.kernel.shape
        if cfg.init == "gaussian":
            a = jax.random.normal(key, (L, d_in, cfg.r), jnp.float32) / cfg.r
        else:
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (L, d_in, cfg.r), jnp.float32, -bound, bound)
        return cls(a, jnp.zeros((L, cfg.r, d_out), jnp.float32), scale(cfg), cfg.dropout, lin.axes)

    def off(self, x, base, kernel):
        """The layer with the adapter switched off (Ctx(enabled=False)): the base as loaded."""
        return base(x)

    def merge_bias(self, bias: jax.Array) -> jax.Array:
        """The bias a merged export writes (LoRA leaves it alone)."""
        return bias

    def __call__(self, x, base, kernel, ctx: Ctx):
        y = base(x)
        if self.dropout and ctx.dropout_key is not None:
            keep = jax.random.bernoulli(ctx.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.dot(x, self.a[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)  # scale the [.., r] side
        xa = checkpoint_name(xa, "proj")  # [.., r]: kept under remat "proj", so x A never runs twice
        return y + jnp.dot(xa, self.b[...].astype(x.dtype)).astype(y.dtype)

    def merge(self, kernel: jax.Array) -> jax.Array:
        """W' = W + s · A B, fp32."""
        return kernel.astype(jnp.float32) + self.scale * jnp.einsum("lir,lro->lio", self.a[...], self.b[...])

    # ---------------------------------------------------------------- PEFT layout (FORMATS.md)

    def peft_tensors(self, name: str, layer: int) -> dict[str, np.ndarray]:
        a, b = np.asarray(self.a[layer], np.float32), np.asarray(self.b[layer], np.float32)
        return {f"{name}.lora_A.weight": np.ascontiguousarray(a.T), f"{name}.lora_B.weight": np.ascontiguousarray(b.T)}

    @staticmethod
    def peft_config(cfg, modules=()) -> dict:
        """adapter_config.json keys of this method (only long-standing keys: older PEFT releases load it)."""
        return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "use_rslora": cfg.rslora, "use_dora": bool(cfg.use_dora), "init_lora_weights": True, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}}

    @staticmethod
    def config_from_peft(c: dict, where) -> LoraConfig:
        """A PEFT LoRA adapter_config.json (dict) → jaxft LoraConfig; unsupported settings are one-line errors."""
        for key, ok in (("bias", c.get("bias", "none") == "none"), ("rank_pattern", not c.get("rank_pattern")),
                        ("alpha_pattern", not c.get("alpha_pattern")),
                        ("modules_to_save", not c.get("modules_to_save")),
                        ("fan_in_fan_out", not c.get("fan_in_fan_out"))):
            if not ok:
                raise JaxftError(f"{where}: {key}={c.get(key)!r} is not supported")
        init = c.get("init_lora_weights", True)
        if isinstance(init, str) and residual_init(init.lower()):  # its tensors are only valid on W_res
            raise JaxftError(f"{where}: init_lora_weights={init!r}: the adapter needs PEFT's residual base; save it "
                             "with save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA")
        tm = c["target_modules"]
        return LoraConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout") or 0.0),
                          rslora=bool(c.get("use_rslora")), use_dora=bool(c.get("use_dora")),
                          target_modules=tuple([tm] if isinstance(tm, str) else tm))

    @staticmethod
    def peft_shapes(cfg, d_in: int, d_out: int, name: str = "") -> dict[str, tuple[int, ...]]:
        return {"lora_A.weight": (cfg.r, d_in), "lora_B.weight": (d_out, cfg.r)}

    @classmethod
    def from_peft(cls, per_layer: list[dict[str, np.ndarray]], cfg, lin) -> LoRA:
        """Stack the per-layer PEFT tensors ({suffix: array}) of one module (under Linear `lin`) into a LoRA."""
        a = np.stack([t["lora_A.weight"].T for t in per_layer])
        b = np.stack([t["lora_B.weight"].T for t in per_layer])
        return cls(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scale(cfg), cfg.dropout, lin.axes)
