"""An adapter bank: N named LoRA adapters over one frozen base, applied per row in one batched forward.

    bank.install(model, entries)                        # entries: [Entry(name, cfg, factors)]
    model(tokens, ctx=Ctx(adapter_ids=jnp.array([0, 1, -1])))   # row 0: adapter 0, row 1: 1, row 2: the base

Conventions (as jaxft.models.decoder): L layers · N adapters · M rows of the flattened input (B·S) ·
r the bank's rank (the largest of its adapters) · in / out the projection's dims.

Every adapted projection holds a `LoRABank` with `a [L, N, in, r]` and `b [L, N, r, out]` — the layers
lead, as for every stacked parameter (the layer scan slices them), then the adapter axis. Within a
layer the forward is two 2-D GEMMs over all adapters at once, with a one-hot per row:

    xa = x @ A_cat                     # [M, N·r]   A_cat = A laid side by side [in, N·r]
    xa = xa · (onehot(ids) · s)[:, :, None]   # keeps only the row's adapter, scaled by its own s
    y  = base(x) + xa @ B_cat          # [M, out]   B_cat [N·r, out]

so there is no loop over adapters and no merge (decode steps, with few rows, gather each row's A and B
instead: `GATHER_ROWS`); an id outside [0, N) (e.g. -1, PEFT's "__base__")
selects nothing: the base model. Adapters of smaller rank are zero-padded to r; the zeros add
nothing forward and get zero gradients (their partner factor is zero), so they stay zero in
training. All adapters of a bank share one rank bucket (`jaxft.config.rank_bucket`: vLLM's --max-lora-rank values), so
padding never costs more than the bucket.

Sources (PEFT directories, PEFT's multi-adapter folders, jaxft runs) are read by `jaxft.runs.load_bank`;
a bank's PEFT export is `jaxft.formats.peft.export_bank`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft import adapters
from jaxft.adapters.lora import LoRA, scale
from jaxft.config import VLLM_RANKS, LoraConfig, rank_bucket
from jaxft.context import Ctx
from jaxft.errors import JaxftError

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names=; id -1 here
# At most this many rows (B·S) gather each row's factors ([M, in, r], cheap for decode's M = B); more
# rows (prefill, training) run all N adapters as one [in, N·r] GEMM with a one-hot, never [M, in, r].
GATHER_ROWS = 64



class LoRABank(nnx.Module):
    """N LoRA adapters under one (stacked) Linear: a [L, N, in, r], b [L, N, r, out] (fp32)."""

    method = "bank"

    def __init__(self, a, b, configs: tuple[LoraConfig, ...], names: tuple[str, ...], present: tuple[bool, ...],
                 dropout: float = 0.0, axes: tuple[str | None, str | None] = (None, None)):
        self.a = nnx.LoRAParam(a, axes=("adapter", axes[0], "rank"))  # per layer; the scan adds `layers`
        self.b = nnx.LoRAParam(b, axes=("adapter", "rank", axes[1]))
        self.configs, self.names, self.present, self.dropout = tuple(configs), tuple(names), tuple(present), dropout
        self.scales = tuple(_scale(c) for c in configs)

    def off(self, x, base, kernel):
        return base(x)

    def merge_bias(self, bias):
        return bias

    def __call__(self, x, base, kernel, ctx: Ctx):
        if ctx.adapter_ids is None:
            raise JaxftError("an adapter bank needs Ctx(adapter_ids=...): one adapter id per row (-1 = the base)")
        y = base(x)
        if self.dropout and ctx.dropout_key is not None:
            keep = jax.random.bernoulli(ctx.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)  # [N, in, r], [N, r, out]
        N, d_in, r = a.shape
        x2 = x.reshape(-1, d_in)  # [M, in] (already flat with Tuning.flat_gemm; [B, S, in] otherwise)
        ids = ctx.adapter_ids
        if ids.shape[0] != x2.shape[0]:  # one id per sequence: repeat it over the sequence's positions
            ids = jnp.repeat(ids, x2.shape[0] // ids.shape[0])
        if x2.shape[0] <= GATHER_ROWS:  # decode: each row's own factors, gathered (BGMV), one LoRA's work
            s = jnp.where((ids >= 0) & (ids < N), jnp.asarray(self.scales, x.dtype)[jnp.clip(ids, 0, N - 1)], 0)
            k = jnp.clip(ids, 0, N - 1)
            xa = jnp.einsum("mi,mir->mr", x2, a[k]) * s[:, None]  # [M, r]
            return y + jnp.einsum("mr,mro->mo", xa, b[k]).reshape(y.shape).astype(y.dtype)
        pick = (ids[:, None] == jnp.arange(N)).astype(x.dtype) * jnp.asarray(self.scales, x.dtype)  # [M, N]
        xa = jnp.dot(x2, a.transpose(1, 0, 2).reshape(d_in, N * r))  # [M, N·r]
        xa = (xa.reshape(-1, N, r) * pick[:, :, None]).reshape(-1, N * r)
        xa = checkpoint_name(xa, "proj")  # kept under remat "proj", so x A never runs twice
        return y + jnp.dot(xa, b.reshape(N * r, -1)).reshape(y.shape).astype(y.dtype)

    def merge(self, kernel):
        raise JaxftError("an adapter bank has no single merged kernel; export or merge one adapter at a time")

    def view(self, n: int, lin):
        """Adapter n alone as a plain jaxft LoRA (its own rank, unpadded), or None where it adapts nothing."""
        if not self.present[n]:
            return None
        c = self.configs[n]
        return LoRA(self.a[:, n, :, :c.r], self.b[:, n, :c.r, :], self.scales[n], c.dropout, lin.axes)


def _scale(cfg: LoraConfig) -> float:
    return scale(cfg)


# ---------------------------------------------------------------- building a bank


@dataclasses.dataclass
class Entry:
    """One adapter of a bank: its name, LoRA settings, and factors per module path
    ({path: (a [L, in, r], b [L, r, out])}); `base` = the base model it was trained on ("" = unknown)."""

    name: str
    cfg: LoraConfig
    factors: dict[tuple, tuple[np.ndarray, np.ndarray]]
    base: str = ""
    source: str = ""


def check(entries: list[Entry]) -> None:
    """One-line errors for a set of adapters that cannot share a bank."""
    if not entries:
        raise JaxftError("an adapter bank needs at least one adapter")
    seen = set()
    for e in entries:
        where = f"adapter {e.name!r} ({e.source})" if e.source else f"adapter {e.name!r}"
        if not e.name or e.name == BASE or any(ch in e.name for ch in "/= ,"):
            raise JaxftError(f"{where}: not a usable adapter name (non-empty, not {BASE}, no '/', '=', ',' or space)")
        if e.name in seen:
            raise JaxftError(f"{where}: two adapters are named {e.name!r}")
        seen.add(e.name)
        if e.cfg.use_dora or e.cfg.method != "lora":
            raise JaxftError(f"{where}: only plain LoRA adapters can share a bank (DoRA / IA3 cannot be mixed per row, "
                             "as in PEFT)")
        if e.cfg.modules_to_save:
            raise JaxftError(f"{where}: modules_to_save={list(e.cfg.modules_to_save)} cannot be mixed per row")
    first = entries[0]
    for e in entries[1:]:
        if rank_bucket(e.cfg.r) != rank_bucket(first.cfg.r):
            raise JaxftError(f"adapter {e.name!r}: r={e.cfg.r} is outside the rank bucket of {first.name!r} "
                             f"(r={first.cfg.r}, bucket {rank_bucket(first.cfg.r)}); a bank pads every adapter to its "
                             f"largest rank, so its ranks must share one of {', '.join(map(str, VLLM_RANKS))}")
    bases = {e.base: e for e in entries if e.base}
    if len(bases) > 1:
        (b1, e1), (b2, e2) = list(bases.items())[:2]
        raise JaxftError(f"adapters {e1.name!r} and {e2.name!r} were trained on different bases ({b1} vs {b2})")


def install(model, entries: list[Entry], dropout: float = 0.0):
    """Put a LoRABank holding `entries` (in order: id n = entries[n]) under every projection any of them
    adapts; returns the model. Factors are zero-padded to the largest rank."""
    check(entries)
    r = max(e.cfg.r for e in entries)
    names, configs = tuple(e.name for e in entries), tuple(e.cfg for e in entries)
    paths = {p for e in entries for p in e.factors}
    unknown = [(e, p) for e in entries for p in e.factors if p not in dict(adapters.targets(model, ("all-linear",)))]
    if unknown:
        raise JaxftError(f"adapter {unknown[0][0].name!r}: module {'.'.join(map(str, unknown[0][1]))} is not a "
                         "projection of the base model")
    for path, lin in adapters.targets(model, ("all-linear",)):
        if path not in paths:
            lin.adapter = None
            continue
        L, d_in, d_out = lin.kernel.shape
        a, b = np.zeros((L, len(entries), d_in, r), np.float32), np.zeros((L, len(entries), r, d_out), np.float32)
        for n, e in enumerate(entries):
            if path in e.factors:
                fa, fb = (np.asarray(t, np.float32) for t in e.factors[path])
                if fa.shape != (L, d_in, e.cfg.r) or fb.shape != (L, e.cfg.r, d_out):
                    raise JaxftError(f"adapter {e.name!r}: {'.'.join(map(str, path))} has factors {list(fa.shape)} / "
                                     f"{list(fb.shape)}, the base needs {[L, d_in, e.cfg.r]} / {[L, e.cfg.r, d_out]} "
                                     "(adapters of a different base?)")
                a[:, n, :, :e.cfg.r], b[:, n, :e.cfg.r, :] = fa, fb
        present = tuple(path in e.factors for e in entries)
        lin.adapter = LoRABank(jnp.asarray(a), jnp.asarray(b), configs, names, present, dropout, lin.axes)
    return model


def banks(model) -> list[tuple[tuple, object]]:
    """(path, Linear) of every projection holding a LoRABank."""
    return [(p, lin) for p, lin in adapters.adapted(model) if isinstance(lin.adapter, LoRABank)]


def names_of(model) -> tuple[str, ...]:
    found = banks(model)
    return found[0][1].adapter.names if found else ()


def ids(model_or_names, rows: list[str | None], where: str = "adapter") -> np.ndarray:
    """Adapter names per row → ids [B] int32 (None / "__base__" / "base" → -1); an unknown name is an error."""
    names = model_or_names if isinstance(model_or_names, (tuple, list)) else names_of(model_or_names)
    out = []
    for name in rows:
        if name in (None, BASE, "base"):
            out.append(-1)
        elif name in names:
            out.append(names.index(name))
        else:
            raise JaxftError(f"{where}: unknown adapter {name!r} (known: {', '.join(names) or 'none'}, base)")
    return np.asarray(out, np.int32)


def views(model, n: int):
    """The model with adapter n alone under every projection, as plain LoRA modules (in place; returns the
    saved banks for `restore`)."""
    saved = {}
    for path, lin in banks(model):
        saved[path] = lin.adapter
        lin.adapter = lin.adapter.view(n, lin)
    return saved


def restore(model, saved: dict) -> None:
    for path, lin in adapters.targets(model, ("all-linear",)):
        if path in saved:
            lin.adapter = saved[path]


def harvest(model) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{path: (a, b)} of the plain LoRA adapters attached to the model (then detached)."""
    out = {}
    for path, lin in adapters.adapted(model):
        out[path] = (np.asarray(lin.adapter.a[...], np.float32), np.asarray(lin.adapter.b[...], np.float32))
        lin.adapter = None
    return out


# ---------------------------------------------------------------- multi-adapter training (config `adapters:`)


def spec_lora(run, spec) -> LoraConfig:
    """The LoraConfig of one `adapters:` entry: its own r / alpha / rslora / target_modules over `lora:`."""
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return dataclasses.replace(run.lora, r=pick(spec.r, run.lora.r), alpha=pick(spec.alpha, run.lora.alpha),
                               rslora=pick(spec.rslora, run.lora.rslora),
                               target_modules=pick(spec.target_modules, run.lora.target_modules), init_adapter=None)


def spec_seed(run, spec) -> int:
    return run.train.seed if spec.seed is None else spec.seed


def fresh_entries(model, run) -> list[Entry]:
    """Freshly initialised adapters of a multi-adapter run: adapter n is exactly what
    `jaxft.adapters.attach(model, its LoraConfig, key(its seed))` makes for a one-adapter run."""
    out = []
    for spec in run.adapters:
        cfg = spec_lora(run, spec)
        key = jax.random.key(spec_seed(run, spec))
        factors = {}
        for i, (path, lin) in enumerate(adapters.targets(model, cfg.target_modules)):
            m = LoRA.init(lin, cfg, jax.random.fold_in(key, i))
            factors[path] = (np.asarray(m.a[...]), np.asarray(m.b[...]))
        out.append(Entry(spec.name, cfg, factors))
    return out


def attach_for_training(model, run):
    """The bank a multi-adapter run trains (config `adapters:`), in place; returns the model."""
    return install(model, fresh_entries(model, run), dropout=run.lora.dropout)
