"""What a forward call tells the adapters (`Ctx`), and what an adapter is (`Adapter`).

An adapter sits in the `adapter` slot of a `jaxft.models.decoder.Linear`; only `jaxft.adapters`
knows what is there. `Linear.__call__` is

    y = base(x) if self.adapter is None else
        self.adapter(x, base, self.kernel, ctx) if ctx.enabled else self.adapter.off(x, base, self.kernel)
        (an adapter without `off`: base(x))

so "adapters off" (the DPO / RL reference) is the same graph called with `Ctx(enabled=False)` — the
model as loaded: `off` is base(x), except for PiSSA / OLoRA whose base kernel is the residual — and
dropout keys or per-row adapter ids arrive as arguments, never as attributes written onto modules.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import numpy as np

from jaxft.context import Ctx


class Adapter(Protocol):
    """One parameter-efficient method under a (stacked) Linear with kernel [L, in, out]."""

    method: str  # the key of jaxft.adapters.METHODS

    def __call__(self, x: jax.Array, base: Callable[[jax.Array], jax.Array], kernel, ctx: Ctx) -> jax.Array:
        """x [N, in] → y [N, out]; `base(x)` is the frozen layer (bias included)."""

    def off(self, x: jax.Array, base: Callable[[jax.Array], jax.Array], kernel) -> jax.Array:
        """Optional. The layer with adapters switched off, i.e. the original model (absent: base(x))."""

    def merge(self, kernel: jax.Array) -> jax.Array:
        """The adapted kernel [L, in, out] in fp32 (merged / GGUF export)."""

    def merge_bias(self, bias: jax.Array) -> jax.Array:
        """Optional. The adapted bias [L, out] in fp32 (merged export; absent: unchanged)."""

    def peft_tensors(self, name: str, layer: int) -> dict[str, np.ndarray]:
        """PEFT tensors of layer `layer` under module name `name` (PyTorch layouts, fp32)."""
