"""Adapter arithmetic: several LoRA adapters → one, as PEFT's `LoraModel.add_weighted_adapter` (peft 0.21.2).

    jaxft merge-adapters runs/a runs/b --weights 1 -0.5 --method ties --density 0.5 --out merged/

Conventions: PyTorch layout as on disk, A [r, in], B [out, r], ΔW = s·B A [out, in]; n adapters stacked
on axis 0 ([n, r, in]); everything fp32 as PEFT computes it. w_i is the user's weight (may be negative),
s_i = alpha / r (rsLoRA: alpha / √r) the adapter's own scaling.

    cat          A = concat_rows(w_i s_i A_i), B = concat_cols(B_i)       r = Σ r_i   (BA = Σ w_i ΔW_i exactly)
    svd          ΔW = Σ w_i ΔW_i;  U S Vh = svd(ΔW);  B = U_k S_k, A = Vh_k  r = svd_rank or max r_i
    linear, ties, dare_linear, dare_ties, magnitude_prune   (all r_i equal)
                 the method runs twice, on the stacked A's with weights sign(w_i s_i)·√|w_i s_i| and on the
                 stacked B's with weights √|w_i s_i| — not on ΔW (PEFT's docstring: a rough approximation)
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                 the method on the full ΔW_i with weights w_i, then the svd step

The merged adapter's scaling is 1 (r = lora_alpha); its other config keys come from the first adapter
(PEFT's `replace(peft_config[adapters[0]], ...)`), with one intended difference: `use_rslora` is written
false. PEFT 0.21.2 inherits it, so its in-memory merge of rsLoRA adapters is scaled by √r instead of 1
(peft#3449); the tensors here are PEFT's, tensor for tensor, and the file means BA.

The dare methods drop entries with torch.bernoulli on torch's CPU generator. That generator is an
MT19937 seeded with the low 32 bits of the seed, one 32-bit draw per element, kept iff its low 24 bits
/ 2^24 < density; numpy's MT19937 with the same key yields the same words, so `seed=S` reproduces
`torch.manual_seed(S); model.add_weighted_adapter(...)` without torch: the draws PEFT spends creating the
new adapter's layers come first (`_init_draws`), then one mask per tensor in PEFT's module order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError
from jaxft.formats.peft import adapter_files, base_identity, read_adapter
from jaxft.models.names import PROJECTIONS

BY_FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on A's and B's, equal ranks
BY_DELTA = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # on ΔW, then svd
METHODS = ("cat", *BY_FACTOR, *BY_DELTA)
PRUNED = tuple(m for m in METHODS if m.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune"))
RANDOM = tuple(m for m in METHODS if m.startswith("dare"))
SIGN_METHODS = ("total", "frequency")
_MODULE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """One input: its adapter_config.json (as read), its tensors (fp32) and where it came from."""
    config: dict
    tensors: dict[str, np.ndarray]
    where: str

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


# ---------------------------------------------------------------- torch's CPU generator, without torch


class TorchDraws:
    """torch.bernoulli(torch.full_like(t, p)) masks as torch's default CPU generator draws them after
    torch.manual_seed(seed): one MT19937 word per element, row-major, kept iff (word & 0xFFFFFF) / 2^24 < p."""

    def __init__(self, seed: int):
        state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)  # init_genrand(seed), as torch
        self.bits = np.random.MT19937()
        self.bits.state = state

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, 1 << 22)
            self.bits.random_raw(k)
            n -= k

    def bernoulli(self, shape: tuple[int, ...], p: float) -> np.ndarray:
        words = self.bits.random_raw(math.prod(shape))
        return ((words & 0xFFFFFF) < float(_F32(p)) * 2.0**24).reshape(shape).astype(_F32)


def _init_draws(init, r: int, d_in: int, d_out: int) -> int:
    """Generator draws PEFT 0.21.2 spends making one new LoRA layer (`update_layer`): nn.Linear(in, r) and
    nn.Linear(r, out) each draw their weight, then `reset_lora_parameters` redraws A (kaiming: one draw per
    element; gaussian: normal_'s fill, 16 more when the size is not a multiple of 16)."""
    n = r * d_in
    if init is False:
        redraw = 0
    elif init is True:
        redraw = n
    elif isinstance(init, str) and init.lower() == "gaussian" and n >= 16:
        redraw = n + (16 if n % 16 else 0)
    else:
        raise JaxftError(f"init_lora_weights={init!r} of the first adapter: the draws PEFT makes for it are not "
                         "reproduced, so a seeded dare merge would not equal PEFT's")
    return n + d_out * r + redraw


# ---------------------------------------------------------------- PEFT's merge functions (utils/merge_utils.py)


def _prune(t: np.ndarray, density: float, how: str, draws: TorchDraws | None) -> np.ndarray:
    if density >= 1:  # PEFT: a warning and the tensor unchanged (no draws either)
        return t
    if how == "magnitude":  # keep the k = int(d·numel) largest |t| (torch.topk over the flat tensor)
        keep = np.argsort(-np.abs(t).ravel(), kind="stable")[:int(density * t.size)]
        mask = np.zeros(t.size, _F32)
        mask[keep] = 1
        return t * mask.reshape(t.shape)
    return t * draws.bernoulli(t.shape, density) / _F32(density)  # rescaled: same expected value


def _weighted(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return stack * weights.reshape(weights.shape + (1,) * (stack.ndim - 1))


def _disjoint_mean(stack: np.ndarray, weights: np.ndarray, sign_method: str) -> np.ndarray:
    """TIES' sign election on the unweighted (pruned) tensors, then the mean of the weighted entries
    that agree with it; the majority sign of a tie is +."""
    sign = np.sign(stack)
    majority = np.where((stack.sum(0) if sign_method == "total" else sign.sum(0)) >= 0, 1, -1)
    agree = (sign == majority).astype(_F32)  # [n, ...]
    return (_weighted(stack, weights) * agree).sum(0) / np.maximum(agree.sum(0), _F32(1))


def combine_tensors(tensors: list[np.ndarray], weights: np.ndarray, method: str, density: float | None = None,
                    sign_method: str = "total", draws: TorchDraws | None = None) -> np.ndarray:
    """One of PEFT's merge functions over n same-shape tensors (weights [n] fp32); `method` without _svd."""
    if method == "linear" or method == "svd":  # task_arithmetic
        return _weighted(np.stack(tensors), weights).sum(0)
    how = "random" if method.startswith("dare") else "magnitude"
    stack = np.stack([_prune(t, density, how, draws) for t in tensors])  # [n, ...]
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stack, weights, sign_method)
    return _weighted(stack, weights).sum(0)  # magnitude_prune, dare_linear


# ---------------------------------------------------------------- the merge of one module, and of all


def _module_order(name: str) -> tuple[int, int]:
    """PEFT walks `named_modules()`: layer by layer, q k v o gate up down (the dict order of PROJECTIONS,
    which is how every supported family registers them); the dare masks are drawn in that order."""
    m = _MODULE.match(name)
    return int(m.group(1)), list(PROJECTIONS).index(m.group(3))


def _factors(ad: PeftAdapter, module: str) -> tuple[np.ndarray, np.ndarray]:
    return ad.tensors[f"{module}.lora_A.weight"], ad.tensors[f"{module}.lora_B.weight"]  # [r, in], [out, r]


def _svd_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A = Vh_k [k, in], B = U_k S_k [out, k] of ΔW [out, in] (fp32 LAPACK gesdd, like torch on CPU). The
    signs of singular vectors are the library's choice, so only B A and (A, B) up to a sign per
    component are comparable across libraries."""
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return np.ascontiguousarray(vh[:rank]), np.ascontiguousarray(u[:, :rank] * s[:rank])


def _merge_module(ads: list[PeftAdapter], weights: list[float], module: str, method: str, rank: int, density,
                  sign_method: str, draws) -> tuple[np.ndarray, np.ndarray]:
    """(A [rank, in], B [out, rank]) of the merged adapter for one module."""
    if method == "cat":
        a = np.concatenate([_factors(ad, module)[0] * _F32(w) * _F32(ad.scaling) for ad, w in zip(ads, weights)])
        return a, np.concatenate([_factors(ad, module)[1] for ad in ads], axis=1)
    if method in BY_DELTA:
        deltas = [(_factors(ad, module)[1] @ _factors(ad, module)[0]) * _F32(ad.scaling) for ad in ads]
        delta = combine_tensors(deltas, np.asarray(weights, _F32), method.removesuffix("_svd"), density,
                                sign_method, draws)
        return _svd_factors(delta, rank)
    ws = [w * ad.scaling for ad, w in zip(ads, weights)]  # the sign on A's side only, else it would cancel
    w_a = np.asarray([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws], _F32)
    w_b = np.asarray([math.sqrt(abs(w)) for w in ws], _F32)
    a = combine_tensors([_factors(ad, module)[0] for ad in ads], w_a, method, density, sign_method, draws)
    b = combine_tensors([_factors(ad, module)[1] for ad in ads], w_b, method, density, sign_method, draws)
    return a, b


def combine(ads: list[PeftAdapter], weights: list[float], method: str, *, density: float | None = None,
            sign_method: str = "total", svd_rank: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """PEFT's add_weighted_adapter over adapters read from disk → (adapter_config dict, tensors)."""
    modules = check(ads, weights, method, density=density, sign_method=sign_method, svd_rank=svd_rank)
    if len(ads) == 1:  # PEFT: one adapter can only be scaled, whatever the method
        method, svd_rank = "linear", None
    ranks = [ad.config["r"] for ad in ads]
    rank = sum(ranks) if method == "cat" else (svd_rank or max(ranks)) if method in BY_DELTA else ranks[0]
    draws = None
    if method in RANDOM and density < 1:
        draws = TorchDraws(seed)
        init = ads[0].config.get("init_lora_weights", True)
        draws.skip(sum(_init_draws(init, rank, _factors(ads[0], m)[0].shape[1], _factors(ads[0], m)[1].shape[0])
                       for m in modules))
    tensors = {}
    for module in modules:
        a, b = _merge_module(ads, weights, module, method, rank, density, sign_method, draws)
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a, _F32)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b, _F32)
    return merged_config(ads, rank), tensors


def merged_config(ads: list[PeftAdapter], rank: int) -> dict:
    """adapters[0]'s config with r = lora_alpha = rank, the union of target modules, no patterns, and
    use_rslora false (see the module docstring)."""
    tms = [ad.config["target_modules"] for ad in ads]
    if all(isinstance(t, str) for t in tms):
        target = tms[0] if len(set(tms)) == 1 else "|".join(f"({t})" for t in tms)
    else:
        target = sorted(set().union(*tms))
    return {**ads[0].config, "r": rank, "lora_alpha": rank, "target_modules": target, "alpha_pattern": {},
            "rank_pattern": {}, "use_rslora": False, "inference_mode": True}


# ---------------------------------------------------------------- refusals


def _same_base(x: str, y: str) -> bool:
    if not x or not y or x == y:
        return True
    return base_identity(x) == base_identity(y)  # also: a GGUF and the HF directory jaxft wrote from it


def check(ads: list[PeftAdapter], weights: list[float], method: str, *, density, sign_method: str,
          svd_rank) -> list[str]:
    """Every refusal, before any arithmetic; returns the adapted modules in PEFT's order."""
    if method not in METHODS:
        raise JaxftError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if len(weights) != len(ads):
        raise JaxftError(f"--weights: {len(weights)} weight(s) for {len(ads)} adapter(s); give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise JaxftError(f"--weights: {weights} has a value that is not finite")
    if method in PRUNED:
        if density is None or not ((0 < density) if method in RANDOM else (0 <= density)) or density > 1:
            rng = "(0, 1]: dare divides by it" if method in RANDOM else "[0, 1]"
            raise JaxftError(f"--density {density}: --method {method} needs the kept fraction in {rng}")
    elif density is not None:
        raise JaxftError(f"--density: --method {method} prunes nothing (density applies to {', '.join(PRUNED)})")
    if sign_method not in SIGN_METHODS:
        raise JaxftError(f"--majority-sign-method {sign_method!r}: expected one of {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and method not in BY_DELTA:
        raise JaxftError(f"--svd-rank: --method {method} has no SVD step (svd methods: {', '.join(BY_DELTA)})")
    for ad in ads:
        c, where = ad.config, ad.where
        for key, bad in (("peft_type", c.get("peft_type", "LORA") != "LORA"), ("use_dora", c.get("use_dora")),
                         ("lora_bias", c.get("lora_bias"))):
            if bad:
                raise JaxftError(f"{where}: {key}={c.get(key)!r}: only plain LoRA adapters can be merged")
        if not _same_base(c.get("base_model_name_or_path") or "", ads[0].config.get("base_model_name_or_path") or ""):
            raise JaxftError(f"{where}: base model {c['base_model_name_or_path']!r} is not the first adapter's "
                             f"({ads[0].config['base_model_name_or_path']!r}); adapters of different bases "
                             "cannot be merged (the same model under two names: edit one adapter_config.json)")
        if type(c["target_modules"]) is not type(ads[0].config["target_modules"]):
            raise JaxftError(f"{where}: target_modules {c['target_modules']!r} mixes a regex string and a list "
                             f"with {ads[0].where}'s {ads[0].config['target_modules']!r} (PEFT refuses it too)")
    modules = _modules(ads)
    ranks = [ad.config["r"] for ad in ads]
    if method in BY_FACTOR and len(set(ranks)) > 1:
        raise JaxftError(f"ranks {ranks}: --method {method} needs adapters of one rank (PEFT's rule; cat and the "
                         "svd methods take any ranks)")
    if svd_rank is not None:
        limit = min(min(ads[0].tensors[f"{m}.lora_A.weight"].shape[1], ads[0].tensors[f"{m}.lora_B.weight"].shape[0])
                    for m in modules)
        if not 1 <= svd_rank <= limit:
            raise JaxftError(f"--svd-rank {svd_rank}: must be in [1, {limit}] (the smallest adapted matrix side)")
    return modules


def _adapted(ad: PeftAdapter) -> list[str]:
    """One adapter's modules in PEFT's order, each with an A [r, in] and a B [out, r]."""
    names = set()
    for key in ad.tensors:
        module, _, kind = key.rpartition(".lora_")
        m = _MODULE.match(module)
        if kind not in ("A.weight", "B.weight") or m is None or m.group(3) not in PROJECTIONS:
            raise JaxftError(f"{ad.where}: tensor {key} is not a LoRA factor of a decoder layer projection")
        names.add(module)
    for m in names:
        a, b = ad.tensors.get(f"{m}.lora_A.weight"), ad.tensors.get(f"{m}.lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or not a.shape[0] == b.shape[1] == ad.config["r"]:
            raise JaxftError(f"{ad.where}: module {m}: lora_A / lora_B are missing or not [r, in] / [out, r] "
                             f"with r={ad.config['r']}")
    return sorted(names, key=_module_order)


def _modules(ads: list[PeftAdapter]) -> list[str]:
    """The adapted modules, the same in every adapter with the same in / out sizes (one base)."""
    first, modules = ads[0], _adapted(ads[0])
    for ad in ads[1:]:
        names = _adapted(ad)
        diff = sorted(set(modules) ^ set(names), key=_module_order)
        if diff:
            raise JaxftError(f"{ad.where if diff[0] not in names else first.where}: does not adapt {diff[0]} "
                             "(the adapters target different modules)")
        for m in modules:
            (a0, b0), (a, b) = _factors(first, m), _factors(ad, m)
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise JaxftError(f"{ad.where}: module {m} is [{b.shape[0]}, {a.shape[1]}], {first.where}'s is "
                                 f"[{b0.shape[0]}, {a0.shape[1]}]: adapters of different bases")
    return modules


# ---------------------------------------------------------------- files


def read_peft(path) -> PeftAdapter:
    """A PEFT adapter directory as merge input, after jaxft's own refusals (patterns, modules_to_save, bias,
    residual inits, ...: jaxft.formats.peft.read_adapter)."""
    p = Path(path)
    read_adapter(p)  # the refusals
    config, tensors = adapter_files(p)
    return PeftAdapter(config, {k: np.asarray(v, _F32) for k, v in tensors.items()}, str(p))
