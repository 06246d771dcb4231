"""IA3 (Liu et al. 2022; PEFT `peft_type: IA3`): a learned scaling vector per targeted projection.

    output scaling (attention, default k_proj / v_proj):  y = base(x) ⊙ l     l [L, out], PEFT `ia3_l` (out, 1)
    input scaling (feedforward_modules, default down_proj): y = base(x ⊙ l)    l [L, in],  PEFT `ia3_l` (1, in)

l starts at ones (PEFT's init_ia3_weights=True): a fresh adapter leaves the model unchanged. The merge
is exact: W' = W ⊙ l along the scaled axis (output scaling scales the bias too, as PEFT's merge), so
the way to serve IA3 is a merged export — no runtime loads IA3 adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config import LoraConfig
from jaxft.context import Ctx
from jaxft.errors import JaxftError

from jaxft.models.names import IA3_FEEDFORWARD as FEEDFORWARD
from jaxft.models.names import IA3_TARGETS as TARGETS


def feedforward(cfg) -> tuple[str, ...]:
    return FEEDFORWARD if cfg.feedforward_modules is None else tuple(cfg.feedforward_modules)


class IA3(nnx.Module):
    method = "ia3"
    peft_type = "IA3"

    def __init__(self, l: jax.Array, is_feedforward: bool, axes=(None, None)):
        # LoRAParam: what jaxft trains (adapters.trainable_filter); the vector shards like the axis it scales
        self.l = nnx.LoRAParam(l, axes=(axes[0] if is_feedforward else axes[1],))  # [L, in] or [L, out]
        self.is_feedforward = is_feedforward

    @staticmethod
    def target_names(cfg, model_type: str) -> tuple[str, ...]:
        """lora.target_modules, where the default all-linear means PEFT's IA3 default for the family."""
        if tuple(cfg.target_modules) != ("all-linear",):
            return tuple(cfg.target_modules)
        if model_type not in TARGETS:
            raise JaxftError(f"lora.target_modules: PEFT has no IA3 default for model_type {model_type!r}; "
                             "name the modules")
        return TARGETS[model_type]

    @classmethod
    def init(cls, lin, cfg, key: jax.Array) -> IA3:
        L, d_in, d_out = lin.kernel.shape
        ff = lin.name in feedforward(cfg)
        return cls(jnp.ones((L, d_in if ff else d_out), jnp.float32), ff, lin.axes)

    def __call__(self, x, base, kernel, ctx: Ctx):
        l = self.l[...]
        if self.is_feedforward:  # PEFT: (x.to(fp32) * l).to(x.dtype), then the base layer
            return base((x.astype(jnp.float32) * l).astype(x.dtype))
        y = base(x)
        return (y.astype(jnp.float32) * l).astype(y.dtype)

    def off(self, x, base, kernel):
        return base(x)

    def merge(self, kernel: jax.Array) -> jax.Array:
        """W' = W ⊙ l: rows (inputs) for feed-forward modules, columns (outputs) otherwise; fp32."""
        w = kernel.astype(jnp.float32)
        return w * (self.l[...][:, :, None] if self.is_feedforward else self.l[...][:, None, :])

    def merge_bias(self, bias: jax.Array) -> jax.Array:
        """Output scaling scales the bias too (PEFT's merge); input scaling leaves it."""
        return bias if self.is_feedforward else bias.astype(jnp.float32) * self.l[...]

    # ---------------------------------------------------------------- PEFT layout

    def peft_tensors(self, name: str, layer: int) -> dict[str, np.ndarray]:
        l = np.asarray(self.l[layer], np.float32)
        return {f"{name}.ia3_l": np.ascontiguousarray(l[None, :] if self.is_feedforward else l[:, None])}

    @staticmethod
    def peft_config(cfg, modules=()) -> dict:
        ff = sorted(m for m in feedforward(cfg) if m in modules)
        return {"peft_type": "IA3", "feedforward_modules": ff, "init_ia3_weights": True}

    @staticmethod
    def config_from_peft(c: dict, where) -> LoraConfig:
        for key in ("modules_to_save", "fan_in_fan_out", "exclude_modules"):
            if c.get(key):
                raise JaxftError(f"{where}: {key}={c.get(key)!r} is not supported")
        tm, ff = c["target_modules"], c.get("feedforward_modules") or []
        tm, ff = tuple([tm] if isinstance(tm, str) else tm), tuple([ff] if isinstance(ff, str) else ff)
        if not set(ff) <= set(tm):
            raise JaxftError(f"{where}: feedforward_modules {sorted(ff)} is not a subset of target_modules")
        return LoraConfig(method="ia3", target_modules=tm, feedforward_modules=ff)

    @staticmethod
    def peft_shapes(cfg, d_in: int, d_out: int, name: str = "") -> dict[str, tuple[int, ...]]:
        return {"ia3_l": (1, d_in) if name in feedforward(cfg) else (d_out, 1)}

    @classmethod
    def from_peft(cls, per_layer, cfg, lin) -> IA3:
        l = np.stack([t["ia3_l"].reshape(-1) for t in per_layer])
        return cls(jnp.asarray(l, jnp.float32), lin.name in feedforward(cfg), lin.axes)
