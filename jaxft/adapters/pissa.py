"""PiSSA and OLoRA initialization (PEFT `init_lora_weights="pissa" | "pissa_niter_K" | "olora"`).

The adapter starts at the principal part of W and the base kernel becomes the residual:

    PiSSA  W [out, in] = V S Uh,  S_r = S[:r] / s,  A0 = diag(√S_r) Uh[:r],  B0 = V[:, :r] diag(√S_r)
    OLoRA  Q, R = qr(W),          A0 = R[:r],                                B0 = Q[:, :r]
    both   kernel ← W_res = W − s·B0 A0   (in jaxft's [in, out] layout: a0 = A0ᵀ [in, r], b0 = B0ᵀ [r, out])

so at step 0 the model is unchanged and training moves A, B from (A0, B0). The initial factors stay
as frozen (non-Param) variables, for two reasons:
  - "adapters off" (Ctx(enabled=False): the DPO / RL reference) must be the ORIGINAL model, not the
    residual: `off` adds s·x A0 B0 back onto base(x) = x W_res;
  - the export converts to a plain rank-2r LoRA against the original base exactly as PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)`: A' = [A; A0], B' = [B, −B0],
    r' = 2r, lora_alpha' = 2α (rsLoRA: α√2), so s'·B'A' = s(BA − B0A0) and PEFT / vLLM / llama.cpp
    load it over the unmodified base.
A merged export is W_res + s·A B: the trained model itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.adapters.lora import LoRA, scale
from jaxft.errors import JaxftError


class InitFactor(nnx.Variable):
    """A PiSSA / OLoRA initial factor: frozen (not a Param), kept for `off` and the export's conversion."""


def _svd_lowrank(w: jax.Array, r: int, niter: int, key: jax.Array):
    """torch.svd_lowrank(w, q=r, niter) (Halko et al. 2009, Alg. 4.4): w [.., m, n] → U [.., m, r], S [.., r],
    V [.., n, r]; randomized, so only its reconstruction matches PEFT's, not its factors."""
    q = jnp.linalg.qr(w @ jax.random.normal(key, (*w.shape[:-2], w.shape[-1], r), w.dtype))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(jnp.swapaxes(w, -1, -2) @ q)[0]
        q = jnp.linalg.qr(w @ q)[0]
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w, full_matrices=False)
    return q @ u, s, jnp.swapaxes(vh, -1, -2)


def initial_factors(kernel: jax.Array, cfg, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a0 [L, in, r], b0 [L, r, out]) of lora.init for a stacked kernel [L, in, out], fp32, PEFT's formulas."""
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)  # [L, out, in]: PEFT's W
    r, s = cfg.r, scale(cfg)
    if cfg.init == "olora":
        q, rr = jnp.linalg.qr(w)
        big_a, big_b = rr[:, :r], q[:, :, :r]  # A (r, in), B (out, r)
    else:
        if cfg.init == "pissa":
            v, sv, uh = jnp.linalg.svd(w, full_matrices=False)
            v, sv, uh = v[:, :, :r], sv[:, :r], uh[:, :r]
        else:  # pissa_niter_K
            v, sv, u = _svd_lowrank(w, r, int(cfg.init.removeprefix("pissa_niter_")), key)
            uh = jnp.swapaxes(u, -1, -2)
        root = jnp.sqrt(sv / s)  # [L, r]
        big_a, big_b = root[:, :, None] * uh, v * root[:, None, :]
    return jnp.swapaxes(big_a, -1, -2), jnp.swapaxes(big_b, -1, -2)


class PiSSA(LoRA):
    method = "pissa"

    def __init__(self, a, b, a0, b0, scale: float, dropout: float = 0.0, axes=(None, None)):
        super().__init__(a, b, scale, dropout, axes)
        self.a0 = InitFactor(a0, axes=(axes[0], "rank"))  # [L, in, r]
        self.b0 = InitFactor(b0, axes=("rank", axes[1]))  # [L, r, out]

    @classmethod
    def init(cls, lin, cfg, key: jax.Array) -> PiSSA:
        """The adapter at the principal part of lin's kernel; the kernel is rewritten (in place) to W_res."""
        if not isinstance(lin.kernel, nnx.Param):
            raise JaxftError(f"lora.init={cfg.init}: {lin.name} has a quantized kernel; PiSSA / OLoRA need the "
                             "full-precision base (quant.base=none)")
        a0, b0 = initial_factors(lin.kernel[...], cfg, key)
        s = scale(cfg)
        w = lin.kernel[...]
        lin.kernel[...] = (w.astype(jnp.float32) - s * jnp.einsum("lir,lro->lio", a0, b0)).astype(w.dtype)
        # the trained factors get their own buffers: the train state is donated, the initial ones are not
        return cls(jnp.copy(a0), jnp.copy(b0), a0, b0, s, cfg.dropout, lin.axes)

    def off(self, x, base, kernel):
        """The ORIGINAL layer: x W_res + s·x A0 B0 = x W (what DPO / RL compare against)."""
        y = base(x)
        xa = jnp.dot(x, self.a0[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
        return y + jnp.dot(xa, self.b0[...].astype(x.dtype)).astype(y.dtype)

    # ---------------------------------------------------------------- PEFT layout: the converted LoRA

    def peft_tensors(self, name: str, layer: int) -> dict[str, np.ndarray]:
        a = np.concatenate([np.asarray(self.a[layer], np.float32), np.asarray(self.a0[layer], np.float32)], axis=1)
        b = np.concatenate([np.asarray(self.b[layer], np.float32), -np.asarray(self.b0[layer], np.float32)], axis=0)
        return {f"{name}.lora_A.weight": np.ascontiguousarray(a.T), f"{name}.lora_B.weight": np.ascontiguousarray(b.T)}

    @staticmethod
    def peft_config(cfg, modules=()) -> dict:
        """PEFT's converted config: r ← 2r, lora_alpha ← 2α (rsLoRA α·√2, the same scale), init_lora_weights true."""
        out = LoRA.peft_config(cfg, modules)
        out.update(r=2 * cfg.r, lora_alpha=cfg.alpha * (math.sqrt(2) if cfg.rslora else 2))
        return out
