"""Weight-only quantization of the frozen base under LoRA (QLoRA): NF4 with double quantization, int8.

NF4 (Dettmers et al. 2023; bitsandbytes `quant_type="nf4"`): every block of 64 weights is divided by
its absmax and each value becomes the index of the nearest of 16 code values (quantiles of N(0, 1)
normalised to [-1, 1], with an exact zero); two 4-bit indices are packed per uint8, the first in the
high nibble. Double quantization: the fp32 absmax scales (one per block) lose their mean (`offset`),
then blocks of 256 of them are divided by their own absmax and rounded to bitsandbytes' signed 8-bit
dynamic code. Storage: 4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight.

int8: per output channel, scale = absmax / 127, symmetric, round to nearest.

Layout. A kernel [.., in, out] (HF's weight [out, in] transposed) is blocked along `in`: a block is
64 consecutive input weights of one output column — the very blocks bitsandbytes forms from HF's
row-major [out, in] weight when in % 64 == 0 (otherwise `in` is zero-padded per column).

    codes   uint8 [.., nb, 32, out]    nb = ceil(in / 64); row 2j in the high nibble, 2j+1 in the low
    absmax  fp32  [.., nb, out]        single quantization; or, double quantized:
    qabsmax uint8 [.., m]              m = nb·out padded to a multiple of 256 (order [out, nb], as bitsandbytes)
    absmax2 fp32  [.., m / 256]        per block of 256 scales
    offset  fp32  [..]                 mean of the scales

Quantization runs on the host (numpy), one HF tensor at a time, while the checkpoint streams in
(`jaxft.formats.hf.load_pretrained(..., quant=...)`); the device only ever holds the quantized arrays.
On a mesh each process quantizes only the blocks its devices hold (`quantize_sharded`), the arrays split
like their kernel (`layout`), and each layer's codes are gathered as codes before it is dequantized.
Dequantization runs inside the jitted forward, per layer inside the layers' scan, in the compute
dtype, and under `jax.checkpoint` with the matmul so that the backward pass keeps the 4-bit codes
(not a dequantized copy of every layer) and dequantizes again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.models.names import BATCH_AXES
from jaxft.distributed import max_over_processes
from jaxft.sharding import to_host


# The 16 NF4 values of the QLoRA paper, as bitsandbytes stores them (its `get_4bit_type("nf4")`).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
BLOCK = 64  # weights per NF4 absmax
BLOCK2 = 256  # absmax values per second-level scale (double quantization)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`): 256 sorted values in [-1, 1].

    Exponent i = 0..6 gives 2^i magnitudes 10^(i-6) · (midpoints of linspace(0.1, 1, 2^i + 1)), both
    signs, plus 0 and 1.
    """
    vals = [0.0, 1.0]
    for i in range(7):
        b = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = (b[:-1] + b[1:]) / 2.0
        vals += list(np.float32(10.0 ** (i - 6)) * means) + list(-np.float32(10.0 ** (i - 6)) * means)
    return np.sort(np.array(vals, np.float32))


CODE8 = dynamic_code()


def _nearest(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest code value for each x (ties go to the lower value, as bitsandbytes)."""
    mids = (code[1:] + code[:-1]) / 2
    return np.searchsorted(mids, x, side="left").astype(np.uint8)


def _blockwise(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [n] → (x zero-padded to [k, block], absmax [k])."""
    k = -(-x.size // block)
    xb = np.zeros((k * block,), np.float32)
    xb[:x.size] = x
    xb = xb.reshape(k, block)
    return xb, np.abs(xb).max(axis=1)


def _safe(absmax: np.ndarray) -> np.ndarray:
    return np.where(absmax == 0, 1.0, absmax).astype(np.float32)


def nf4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [in, out] (float) → (codes [nb, 32, out], absmax [nb, out]): each block of 64 on its own, so a
    slice of rows starting on a block boundary quantizes to the same rows of codes as the whole kernel."""
    w = np.asarray(w, np.float32)
    d_in, d_out = w.shape
    nb = -(-d_in // BLOCK)
    blocks = np.zeros((nb * BLOCK, d_out), np.float32)
    blocks[:d_in] = w
    blocks = blocks.reshape(nb, BLOCK, d_out)
    absmax = np.abs(blocks).max(axis=1)  # [nb, out]
    idx = _nearest(NF4, blocks / _safe(absmax)[:, None, :])  # [nb, 64, out]
    return (idx[:, 0::2] << 4) | idx[:, 1::2], absmax


def double_quantize(absmax: np.ndarray) -> dict[str, np.ndarray]:
    """A kernel's whole absmax [nb, out] → qabsmax, absmax2, offset (the offset is a mean over all of it)."""
    offset = absmax.mean(dtype=np.float32)
    blocks2, absmax2 = _blockwise((absmax - offset).T.reshape(-1), BLOCK2)  # [m/256, 256], [m/256]
    qabsmax = _nearest(CODE8, blocks2 * (1 / _safe(absmax2))[:, None]).reshape(-1)  # x·(1/a), as bitsandbytes
    return dict(qabsmax=qabsmax, absmax2=absmax2, offset=np.asarray(offset, np.float32))


def nf4_quantize(w: np.ndarray, double_quant: bool = True) -> dict[str, np.ndarray]:
    """w [in, out] (float) → the NF4 arrays of the module docstring (without the leading layer axis)."""
    codes, absmax = nf4_blocks(w)
    return dict(codes=codes, **(double_quantize(absmax) if double_quant else dict(absmax=absmax)))


def int8_codes(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w [in, out] on the per-output-channel grid `scale` [out] → int8 [in, out]."""
    return np.clip(np.rint(np.asarray(w, np.float32) / scale), -127, 127).astype(np.int8)


def int8_scale(colmax: np.ndarray) -> np.ndarray:
    """absmax of each output channel [out] → its scale (absmax / 127; 1 for an all-zero channel)."""
    return _safe(colmax / 127.0)


def int8_quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """w [in, out] → int8 codes [in, out] and scale [out] (absmax / 127 per output channel)."""
    w = np.asarray(w, np.float32)
    scale = int8_scale(np.abs(w).max(axis=0))
    return dict(q=int8_codes(w, scale), scale=scale)


def nf4_absmax(q: dict, nb: int, d_out: int) -> jax.Array:
    """The fp32 block scales [.., nb, out]: stored, or rebuilt from their double quantization."""
    if "absmax" in q:
        return q["absmax"]
    lead = q["qabsmax"].shape[:-1]
    a = jnp.asarray(CODE8)[q["qabsmax"].astype(jnp.int32)].reshape(*lead, -1, BLOCK2)
    a = a * q["absmax2"][..., None] + q["offset"][..., None, None]
    return a.reshape(*lead, -1)[..., :nb * d_out].reshape(*lead, d_out, nb).swapaxes(-1, -2)


def nf4_dequantize(q: dict, d_in: int, dtype) -> jax.Array:
    """NF4 arrays → the kernel [.., in, out] in `dtype` (code value × block scale, both in dtype)."""
    codes = q["codes"]  # [.., nb, 32, out]
    *lead, nb, half, d_out = codes.shape
    idx = jnp.stack([codes >> 4, codes & 15], axis=-2).astype(jnp.int32)  # [.., nb, 32, 2, out]
    vals = jnp.asarray(NF4, dtype)[idx].reshape(*lead, nb, 2 * half, d_out)
    w = vals * nf4_absmax(q, nb, d_out).astype(dtype)[..., None, :]
    return w.reshape(*lead, nb * 2 * half, d_out)[..., :d_in, :]


def int8_dequantize(q: dict, d_in: int, dtype) -> jax.Array:
    return q["q"].astype(dtype) * q["scale"].astype(dtype)[..., None, :]


CODECS = {"nf4": (nf4_quantize, nf4_dequantize), "int8": (int8_quantize, int8_dequantize)}


class QuantState(nnx.Variable):
    """A quantized base weight's array: never a Param, so never trainable or differentiated. Its `axes`
    metadata (from the kernel's, `layout`) lets jaxft.sharding split it like the kernel it encodes."""


FLAT = ("qabsmax", "absmax2", "scale")  # small scales split evenly over the kernel's mesh axes, gathered whole


def layout(mode: str, d_in: int, d_out: int, double_quant: bool, axes=(None, None)) -> dict:
    """name → (per-layer shape, logical axes) of the arrays that encode a kernel [in, out] whose logical
    axes are `axes` = (in axis, out axis). Blocks run along `in`, so codes and absmax take the in axis on
    their block dimension; the scales in FLAT take both (jaxft.sharding splits them over both mesh axes,
    so that an FSDP split of `in` divides them too)."""
    i, o = axes
    flat = tuple(a for a in (o, i) if a is not None)
    if mode == "int8":
        return dict(q=((d_in, d_out), (i, o)), scale=((d_out,), (flat,)))
    nb = -(-d_in // BLOCK)
    out = dict(codes=((nb, BLOCK // 2, d_out), (i, None, o)))
    if not double_quant:
        return dict(out, absmax=((nb, d_out), (i, o)))
    m = -(-nb * d_out // BLOCK2) * BLOCK2
    return dict(out, qabsmax=((m,), (flat,)), absmax2=((m // BLOCK2,), (flat,)), offset=((), ()))


class QuantKernel(nnx.Module):
    """A Linear's frozen kernel, quantized. Reads like the kernel it replaces:

    `shape` is the logical [L, in, out] (or [in, out]); `k[...]` is the dequantized kernel; `dot(x)` is
    x @ kernel with the kernel dequantized under jax.checkpoint (the backward pass recomputes it from
    the codes instead of keeping it).

    On a mesh the arrays are split like the kernel (FSDP); `dot` first gathers one layer's codes and
    scales over the batch mesh axes — 4 / 8-bit codes cross the interconnect, never the dequantized
    kernel — keeping a tensor-parallel split of the output dimension where the kernel has one.
    """

    def __init__(self, mode: str, arrays: dict, shape: tuple[int, ...], dtype, axes: dict | None = None):
        self.mode, self.shape, self.dtype = mode, tuple(shape), dtype
        self.arrays = nnx.data({k: QuantState(v, axes=(axes or {}).get(k)) for k, v in arrays.items()})
        self.gather = _gathered(arrays)

    def _values(self) -> dict:
        return {k: v[...] for k, v in self.arrays.items()}

    def __getitem__(self, idx):
        return CODECS[self.mode][1](self._values(), self.shape[-2], self.dtype)[idx]

    def dot(self, x):
        dequant, d_in, dtype, gather = CODECS[self.mode][1], self.shape[-2], self.dtype, self.gather

        @jax.checkpoint  # the gather too: the backward pass gathers the codes again rather than keep them
        def f(x, q):
            if gather is not None:
                mesh, keep = gather[0], dict(gather[1])
                q = {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, P(*keep[k][len(keep[k]) - v.ndim:])))
                     for k, v in q.items()}
            return jnp.dot(x.astype(dtype), dequant(q, d_in, dtype))

        return f(x, self._values())

    @property
    def nbytes(self) -> int:
        return int(sum(v[...].nbytes for v in self.arrays.values()))


def _gathered(arrays: dict):
    """(mesh, ((name, spec entries once gathered), ...)) when some array is split over the batch mesh axes
    (a static, hashable attribute: it is part of the graph, not of the state), else None."""
    shardings = [getattr(v, "sharding", None) for v in arrays.values()]
    if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
        return None
    keep, changed = {}, False
    for (k, v), s in zip(arrays.items(), shardings):
        spec = tuple(s.spec) + (None,) * (v.ndim - len(s.spec))
        kept = tuple(None if k in FLAT else _without_batch_axes(e) for e in spec)
        keep[k], changed = kept, changed or kept != spec
    return (shardings[0].mesh, tuple(keep.items())) if changed else None  # hashable: static in the graph


def _without_batch_axes(entry):
    names = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in BATCH_AXES)
    return names[0] if len(names) == 1 else (names or None)


def quantized_kernels(model) -> list[tuple[tuple, QuantKernel]]:
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, QuantKernel)]


def quantize_sharded(read, shape: tuple[int, ...], mode: str, double_quant: bool, axes, dtype, where) -> QuantKernel:
    """The QuantKernel of a kernel `shape` [L, in, out] (or [in, out]), quantized on the host straight into
    its shards. read(i, rows, cols) → layer i's block [rows, cols] of the kernel (fp32 numpy; rows and
    cols are (start, stop)); where(name, shape, axes) → the Sharding of each quantized array (`layout`).

    Only the blocks this process's devices hold are read and quantized (a block row starts on an NF4
    block boundary: `where` refuses a split that does not). What depends on a whole layer — double
    quantization's offset and second-level blocks, int8's absmax over every input — is combined across
    processes first (jaxft.distributed.max_over_processes), so each process computes the same values with the
    same numpy operations: the arrays equal quantizing the whole kernel on one host, bit for bit."""
    stacked = len(shape) == 3
    lead, (d_in, d_out) = tuple(shape[:1]) if stacked else (), shape[-2:]
    lay = layout(mode, d_in, d_out, double_quant, axes)
    shard = {k: where(k, lead + shp, ax) for k, (shp, ax) in lay.items()}
    main = "codes" if mode == "nf4" else "q"
    main_shape = lead + lay[main][0]

    def region(idx):  # an index of the main array → ((row start, stop), (col start, stop)) of the kernel
        idx = idx[len(lead):]
        r0, r1, _ = idx[0].indices(main_shape[len(lead)])
        c0, c1, _ = idx[-1].indices(d_out)
        if mode == "nf4":
            r0, r1 = r0 * BLOCK, min(r1 * BLOCK, d_in)
        return (r0, r1), (c0, c1)

    regions = sorted({region(i) for i in shard[main].addressable_devices_indices_map(main_shape).values()})
    pieces = {r: [] for r in regions}
    small = []
    for i in range(shape[0] if stacked else 1):
        blocks = {(rows, cols): read(i, rows, cols) for rows, cols in regions}
        if mode == "nf4":
            absmax = np.full((-(-d_in // BLOCK), d_out), -1, np.float32)  # -1: held by another process
            for (rows, cols), w in blocks.items():
                codes, absmax[rows[0] // BLOCK:-(-rows[1] // BLOCK), cols[0]:cols[1]] = nf4_blocks(w)
                pieces[(rows, cols)].append(codes)
            small.append(double_quantize(max_over_processes(absmax)) if double_quant else dict(absmax=absmax))
        else:
            colmax = np.zeros(d_out, np.float32)
            for (_, (c0, c1)), w in blocks.items():
                colmax[c0:c1] = np.maximum(colmax[c0:c1], np.abs(w).max(axis=0))
            scale = int8_scale(max_over_processes(colmax))
            for (rows, (c0, c1)), w in blocks.items():
                pieces[(rows, (c0, c1))].append(int8_codes(w, scale[c0:c1]))
            small.append(dict(scale=scale))
        del blocks
    stack = (lambda xs: np.stack(xs)) if stacked else (lambda xs: xs[0])
    host = {r: stack(p) for r, p in pieces.items()}
    arrays = {main: jax.make_array_from_callback(main_shape, shard[main], lambda idx: host[region(idx)])}
    for k in small[0]:
        v = stack([s[k] for s in small])
        arrays[k] = jax.make_array_from_callback(v.shape, shard[k], lambda idx, v=v: v[idx])
    return QuantKernel(mode, arrays, shape, dtype, {k: ax for k, (_, ax) in lay.items()})


def should_quantize(path: tuple[str, ...], cfg) -> bool:
    """Whether the parameter at `path` is quantized under QuantConfig cfg: layer linears (minus
    cfg.skip_modules), lm_head with cfg.lm_head; never embeddings, norms or biases."""
    if cfg is None or cfg.base == "none" or path[-1] != "kernel":
        return False
    if path[:2] == ("model", "layers"):
        return path[-2] not in cfg.skip_modules
    return path[:-1] == ("lm_head",) and cfg.lm_head


def quantize_loaded(model, cfg, compute_dtype, place=None) -> None:
    """Quantize, in place, every kernel of a loaded full-precision model that `cfg` names (should_quantize).

    The path for PiSSA / OLoRA on a quantized base: the SVD / QR needs the full-precision W, and what gets
    quantized is the residual W_res they leave in the kernel (PEFT's advice: "re-quantize the residual").
    Each layer's kernel comes to the host (gathered over processes) and goes through the same codec as a
    streamed load (quantize_sharded). place(path, shape, axes, exact) → the Sharding of one quantized array
    (jaxft.sharding.param_sharding; default: the kernel's first device)."""
    for path, var in list(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        path = tuple(str(p) for p in path)
        if not should_quantize(path, cfg):
            continue
        mod = model
        for k in path[:-1]:
            mod = getattr(mod, k)
        w = mod.kernel[...]
        first = next(iter(w.devices()))
        layer = {}  # the one layer on the host at a time

        def read(i, rows, cols, w=w, layer=layer):
            if i not in layer:
                layer.clear()
                layer[i] = to_host(w if w.ndim == 2 else w[i]).astype(np.float32)
            return layer[i][slice(*rows), slice(*cols)]

        where = ((lambda k, shp, ax, path=path: place(path + (k,), shp, ax, exact=True)) if place
                 else (lambda k, shp, ax, d=first: jax.sharding.SingleDeviceSharding(d)))
        mod.kernel = quantize_sharded(read, w.shape, cfg.base, cfg.double_quant,
                                      var.get_metadata().get("axes") or (None, None), compute_dtype, where)
        del w, layer


def original_base_run(run):
    """The run as a merged export needs it: a quantized base is re-read from the checkpoint in fp32.

    Merging W + s·B·A into the 4-bit weights would round the adapter's (small) change away; the
    trainable tree (LoRA factors, modules_to_save) is the same either way, so the run's checkpoint
    restores into this model unchanged."""
    if run.quant.base == "none":
        return run
    return dataclasses.replace(run, quant=dataclasses.replace(run.quant, base="none"),
                               model=dataclasses.replace(run.model, dtype="fp32"))
