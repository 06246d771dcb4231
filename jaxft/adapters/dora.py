"""DoRA (Liu et al. 2024; PEFT `use_dora=True`): LoRA plus a learned magnitude per output row.

    y = x · (r ⊙ (W + s·A B)) + bias,   r = m / ‖W + s·A B‖  (one L2 norm per output column of the
                                                            jaxft kernel [in, out] = PEFT's row of W [out, in])

The norm is treated as a constant in the backward pass (stop_gradient; DoRA §4.3, and PEFT detaches
it), so m, A and B get exactly PEFT's gradients. `m` is [L, out] (PEFT's `lora_magnitude_vector`,
shape (out,), saved without a `.weight` suffix), starts at ‖W‖ (B = 0) and shards like the output.
With a quantized base (QLoRA) the norm is the dequantized kernel's, as PEFT's `dequantize_module_weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft.adapters.lora import LoRA
from jaxft.context import Ctx


def _column_norm(w: jax.Array) -> jax.Array:
    """‖w[..., :, o]‖ over the input axis, fp32: [.., in, out] → [.., out]."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


class DoRA(LoRA):
    method = "dora"

    def __init__(self, a, b, m, scale: float, dropout: float = 0.0, axes=(None, None)):
        super().__init__(a, b, scale, dropout, axes)
        self.m = nnx.LoRAParam(m, axes=(axes[1],))  # [L, out]: like the output axis

    @classmethod
    def init(cls, lin, cfg, key: jax.Array) -> DoRA:
        lora = LoRA.init(lin, cfg, key)  # B = 0, so W + sBA = W: m starts at the base's norm
        m = _column_norm(lin.kernel[...])
        return cls(lora.a[...], lora.b[...], m, lora.scale, lora.dropout, lin.axes)

    def __call__(self, x, base, kernel, ctx: Ctx):
        y = base(x)  # [N, out], bias included
        w = kernel[...].astype(jnp.float32) + self.scale * jnp.dot(self.a[...], self.b[...])  # [in, out]
        r = (self.m[...] / jax.lax.stop_gradient(_column_norm(w))).astype(y.dtype)  # [out]
        bias = base(jnp.zeros((1, x.shape[-1]), x.dtype))  # [1, out]: base(0) is the bias (zeros without one)
        xw = y - bias  # x W without the bias: DoRA rescales the weight, never the bias
        if self.dropout and ctx.dropout_key is not None:
            # PEFT (DoraLinearVariant.forward): in training with dropout, x is dropped for the whole DoRA
            # term and its x W is recomputed from the dropped x; the undropped base(x) stays as it is
            keep = jax.random.bernoulli(ctx.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
            xw = base(x) - bias
        xa = jnp.dot(x, self.a[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)  # [N, r]
        xa = checkpoint_name(xa, "proj")
        lora = jnp.dot(xa, self.b[...].astype(x.dtype)).astype(y.dtype)  # [N, out]
        return y + (r - 1) * xw + r * lora

    def merge(self, kernel: jax.Array) -> jax.Array:
        """PEFT's merge: W' = (m / ‖W + ΔW‖) (W + ΔW), ΔW = s·A B, the norm of the unmerged weight; fp32."""
        w = super().merge(kernel)  # [L, in, out]
        return w * (self.m[...] / _column_norm(w))[:, None, :]

    # ---------------------------------------------------------------- PEFT layout

    def peft_tensors(self, name: str, layer: int) -> dict[str, np.ndarray]:
        out = super().peft_tensors(name, layer)
        out[f"{name}.lora_magnitude_vector"] = np.asarray(self.m[layer], np.float32)  # (out,), no `.weight`
        return out

    @staticmethod
    def peft_shapes(cfg, d_in: int, d_out: int, name: str = "") -> dict[str, tuple[int, ...]]:
        return {**LoRA.peft_shapes(cfg, d_in, d_out), "lora_magnitude_vector": (d_out,)}

    @classmethod
    def from_peft(cls, per_layer, cfg, lin) -> DoRA:
        lora = LoRA.from_peft(per_layer, cfg, lin)
        m = jnp.asarray(np.stack([t["lora_magnitude_vector"] for t in per_layer]), jnp.float32)
        return cls(lora.a[...], lora.b[...], m, lora.scale, lora.dropout, lin.axes)
