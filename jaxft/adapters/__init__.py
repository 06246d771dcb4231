"""Adapters under the decoder's Linear layers: the method table, attach, split, merge.

    adapters.attach(model, run.lora, key)             # a fresh adapter under every targeted projection
    graphdef, trainable, frozen = adapters.split(model, run.lora)

`attach` puts an adapter module in the `adapter` slot of each targeted `Linear`, so base parameter
paths never change: `model.layers.self_attn.q_proj.kernel` stays, `...q_proj.adapter.a` / `.b` appear.
`split` freezes by construction: the optimizer and the gradient see the trainable subtree only.
A new method is one module with the `jaxft.adapters.base.Adapter` protocol plus a row of METHODS.
"""

from __future__ import annotations

from flax import nnx

from jaxft.adapters.base import Adapter
from jaxft.adapters.dora import DoRA
from jaxft.adapters.ia3 import IA3
from jaxft.adapters.lora import LoRA, scale
from jaxft.adapters.pissa import PiSSA
from jaxft.config import residual_init
from jaxft.errors import JaxftError
from jaxft.models.decoder import Linear
from jaxft.models.names import PROJECTIONS, SAVEABLE, TRAINED_HEADS

__all__ = ["METHODS", "READERS", "Adapter", "LoRA", "DoRA", "IA3", "PiSSA", "adapted", "attach", "merged_bias",
           "merged_kernel", "method_of", "scale", "split", "targets", "trainable_filter"]

# method name → adapter class (`init`, `from_peft`, `peft_config`, `config_from_peft`, ...)
METHODS: dict[str, type] = {"lora": LoRA, "dora": DoRA, "pissa": PiSSA, "ia3": IA3}
READERS: dict[str, type] = {"LORA": LoRA, "IA3": IA3}  # adapter_config.json peft_type → who parses it


def method_of(cfg) -> str:
    """The METHODS key a LoraConfig asks for: lora.method, lora.use_dora, lora.init (pissa / olora)."""
    if cfg.method == "ia3":
        return "ia3"
    if cfg.use_dora:
        return "dora"
    return "pissa" if residual_init(cfg.init) else "lora"


def targets(model, names: tuple[str, ...]) -> list[tuple[tuple, object]]:
    """The (path, Linear) pairs named by `names`: HF module names (q_proj, ...) or "all-linear"."""
    wanted = set(PROJECTIONS) if "all-linear" in names else set(names)
    unknown = sorted(wanted - set(PROJECTIONS))
    if unknown:
        raise JaxftError(f"lora.target_modules: {unknown[0]!r} is not a linear layer of the decoder "
                         f"(known: {', '.join(PROJECTIONS)}, all-linear)")
    return [(path, m) for path, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and path[:2] == ("model", "layers") and path[-1] in wanted]


def adapted(model) -> list[tuple[tuple, object]]:
    """(path, Linear) of every projection that holds an adapter."""
    return [(p, lin) for p, lin in targets(model, ("all-linear",)) if lin.adapter is not None]


def attach(model, cfg, key, method: str | None = None):
    """Add a fresh adapter under every targeted layer (in place; returns the model). PiSSA / OLoRA also
    rewrite the targeted kernels to their residual (jaxft.adapters.pissa)."""
    import jax

    bad = sorted(set(cfg.modules_to_save) - set(SAVEABLE))
    if bad:
        raise JaxftError(f"lora.modules_to_save: {bad[0]!r} is not one of {', '.join(SAVEABLE)}")
    cls = METHODS[method or method_of(cfg)]
    for i, (_, lin) in enumerate(targets(model, cls.target_names(cfg, model.config.model_type))):
        lin.adapter = cls.init(lin, cfg, jax.random.fold_in(key, i))
    return model


def trainable_filter(cfg):
    """nnx filter of what trains: adapter parameters (+ modules_to_save and a new head such as a reward
    model's `score`), or every parameter without an adapter."""
    if not cfg.enabled:
        return nnx.Param
    full = (*cfg.modules_to_save, *TRAINED_HEADS)
    return nnx.Any(nnx.LoRAParam, *[nnx.All(nnx.Param, nnx.PathContains(m)) for m in full])


def split(model, cfg):
    """model → (graphdef, trainable, frozen); `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
    return nnx.split(model, trainable_filter(cfg), ...)


def merged_kernel(lin):
    """The kernel a merged export writes for a (stacked) Linear, in fp32: the adapter's merge, or W."""
    import jax.numpy as jnp

    w = lin.kernel[...].astype(jnp.float32)
    return w if lin.adapter is None else lin.adapter.merge(w)


def merged_bias(lin):
    """The bias a merged export writes for a (stacked) Linear with a bias, fp32 (IA3 scales it)."""
    import jax.numpy as jnp

    b = lin.bias[...].astype(jnp.float32)
    return b if not hasattr(lin.adapter, "merge_bias") else lin.adapter.merge_bias(b)
