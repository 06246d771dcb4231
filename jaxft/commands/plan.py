"""`jaxft plan CONFIG`: the device memory a training run will need, from the model's shape alone.

    jaxft plan configs/qlora.yaml                        # the config's model (config.json / GGUF metadata only)
    jaxft plan configs/qlora.yaml --model llama3-70b     # a shape preset, or an HF directory with config.json

Exact (the sizes of the arrays jaxft allocates; tested against a loaded model):
    base weights   every frozen parameter: quantized linears (jaxft.quant layouts) + the rest in the
                   compute dtype (LoRA) or nothing (full fine-tuning: everything trains)
    trainable      LoRA factors fp32, L·r·(in + out) per target (+ modules_to_save, fp32); full FT: all fp32
    optimizer      AdamW mu + nu: 2 × trainable (fp32)
Estimates (what XLA keeps; the formulas below, c = compute dtype bytes, T = batch·seq tokens):
    gradients      2 × trainable: the accumulator and one micro-batch's gradient
    activations    saved for the backward pass, per remat policy, for ONE micro-batch (accumulation
                   runs micro-batches one after another):
                     none: L · layer                      full: L·T·D·c + layer
                     proj: L·T·c·(D+2q+k+v+o+2F) + layer  dots: L·T·c·(D+q+k+v+o+2F+D) + layer
                   (`python scripts/ab_grad.py --remat proj` prints the compiled temp to compare with;
                    the README's memory-plan section quotes both)
                   layer = T·c·(6D + 3·N·H + 4·K·H + 4F) + B·N·A·(8 + c)   (projections, fp32 attention scores)
                   A = S² with model.attention xla, else one blockwise tile's min(S, 256)² (jaxft.models.attention)
                   + logits chunk 512·V·4·3 + final hidden T·D·4 + one layer's dequantized kernels (quantized)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from pathlib import Path

from jaxft.adapters import METHODS, method_of
from jaxft.adapters.ia3 import feedforward
from jaxft.config import RunConfig
from jaxft.errors import JaxftError
from jaxft.example import example_model
from jaxft.formats.gguf import GGUFSource
from jaxft.losses import LOGITS_TOKENS
from jaxft.models.config import DecoderConfig
from jaxft.models.names import BATCH_AXES, HEAD_AXES, PROJECTIONS
from jaxft.quant import BLOCK, BLOCK2, layout, should_quantize
from jaxft.sharding import spec

# Shapes of well-known checkpoints (their config.json values), to plan without downloading them.
PRESETS = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
}
GiB = 1 << 30


def model_config(model: str) -> DecoderConfig:
    """A preset name, an HF directory (config.json only) or a .gguf file (metadata only) → DecoderConfig."""
    if model in PRESETS:
        return DecoderConfig.from_hf(dict(PRESETS[model]))
    if model == "example":
        model = str(example_model())
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        return DecoderConfig.from_hf(GGUFSource(p).hf_config)
    if not p.exists():
        raise JaxftError(f"{model}: not a model directory, .gguf file or preset ({', '.join(PRESETS)})")
    return DecoderConfig.from_hf(p)


def linears(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """Each layer linear's (in, out)."""
    size = dict(embed=cfg.hidden_size, mlp=cfg.intermediate_size, heads=cfg.num_heads * cfg.head_dim,
                kv=cfg.num_kv_heads * cfg.head_dim)  # each logical axis's length
    return {name: (size[i], size[o]) for name, (_, (i, o)) in PROJECTIONS.items()}


def kernel_bytes(d_in: int, d_out: int, mode: str, double_quant: bool, c: int) -> int:
    """Bytes of one (unstacked) kernel as jaxft.quant stores it."""
    if mode == "none":
        return d_in * d_out * c
    if mode == "int8":
        return d_in * d_out + 4 * d_out
    nb = -(-d_in // BLOCK)
    codes = nb * (BLOCK // 2) * d_out
    if not double_quant:
        return codes + 4 * nb * d_out
    m = -(-nb * d_out // BLOCK2)
    return codes + m * BLOCK2 + 4 * m + 4


def _params(cfg: DecoderConfig) -> list[tuple[tuple[str, ...], tuple[int, ...], tuple, tuple[int, int] | None]]:
    """(path, shape, logical axes, (in, out) for kernels) of every parameter, layer parameters stacked."""
    L, D, V, H = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    out = [(("model", "embed_tokens", "embedding"), (V, D), ("vocab", "embed"), None),
           (("model", "norm", "scale"), (D,), (None,), None)]
    lay = ("model", "layers")
    for name, (i, o) in linears(cfg).items():
        block, axes = PROJECTIONS[name]
        mod = (block, name)
        out.append((lay + mod + ("kernel",), (L, i, o), ("layers", *axes), (i, o)))
        bias = cfg.o_bias if name == "o_proj" else cfg.qkv_bias if block == "self_attn" else cfg.mlp_bias
        if bias:
            out.append((lay + mod + ("bias",), (L, o), ("layers", axes[1]), None))
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if cfg.sandwich_norm else []
    out += [(lay + (n, "scale"), (L, D), ("layers", None), None) for n in norms]
    if cfg.qk_norm:
        out += [(lay + ("self_attn", n, "scale"), (L, H), ("layers", None), None) for n in ("q_norm", "k_norm")]
    if not cfg.tie_word_embeddings:
        out.append((("lm_head", "kernel"), (D, V), HEAD_AXES["lm_head"], (D, V)))
    return out


@dataclasses.dataclass
class Plan:
    base: int
    trainable: int
    optimizer: int
    gradients: int
    activations: int
    notes: list[str]
    per_device: tuple[int, int, int, int, int] | None = None  # the rows above on the busiest device (a mesh)
    devices: int = 1

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.optimizer + self.gradients + self.activations


class _Mesh:
    """The mesh sizes jaxft.sharding.spec reads (no devices needed to plan for them)."""

    def __init__(self, mesh):
        self.shape = dict(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor)


def _split(spec_) -> tuple[str, ...]:
    return tuple(a for e in spec_ for a in ((e,) if isinstance(e, str) else e or ()))


def _held(shape, axes, mesh, strategy, where, exact=False, drop=()) -> float:
    """The fraction of an array a device holds under jaxft.sharding's rules (mesh axes in `drop` undone:
    gathered); a quantized array (`exact`) the mesh cannot split on whole blocks is refused, as the loader does."""
    if mesh is None:
        return 1.0
    with warnings.catch_warnings():  # replicated dims are what the loader warns about; here they only cost memory
        warnings.simplefilter("ignore")
        s = spec(axes, shape, mesh, strategy, where, exact)
    return 1.0 / int(math.prod(mesh.shape[a] for a in _split(s) if a not in drop))


def plan(cfg: DecoderConfig, run: RunConfig) -> Plan:
    c = 2 if run.model.dtype == "bf16" else 4
    lo, q = run.lora, run.quant
    method = method_of(lo)
    names = METHODS[method].target_names(lo, cfg.model_type)
    wanted = set(linears(cfg)) if "all-linear" in names else set(names)
    m = run.mesh
    mesh = _Mesh(m) if -1 not in (m.data, m.fsdp, m.tensor) and m.data * m.fsdp * m.tensor > 1 else None
    held = functools.partial(_held, mesh=mesh, strategy=m.strategy)
    base = trainable = dequant = 0
    dev = dict(base=0.0, trainable=0.0, dequant=0.0)
    for path, shape, axes, io in _params(cfg):
        n, where = math.prod(shape), "/".join(path)
        saved = lo.enabled and any(k in path for k in lo.modules_to_save)
        stacked = path[:2] == ("model", "layers")
        if not lo.enabled or saved:
            trainable += 4 * n
            dev["trainable"] += 4 * n * held(shape, axes, where=where)
        elif should_quantize(path, q):
            layers = cfg.num_layers if stacked else 1
            base += layers * kernel_bytes(*io, q.base, q.double_quant, c)
            for k, (shp, ax) in layout(q.base, *io, q.double_quant, axes[-2:]).items():
                size = math.prod(shp) * (4 if k in ("absmax", "absmax2", "offset", "scale") else 1)
                dev["base"] += layers * size * held((layers, *shp) if stacked else shp,
                                                    (("layers",) if stacked else ()) + ax, where=f"{where}/{k}",
                                                    exact=True)
            dequant += io[0] * io[1] * c if layers > 1 else 0
            dev["dequant"] += io[0] * io[1] * c * held(io, axes[-2:], where=where, drop=BATCH_AXES) if layers > 1 else 0
        else:
            base += c * n
            dev["base"] += c * n * held(shape, axes, where=where)
        if lo.enabled and io is not None and stacked and path[-2] in wanted:
            L, (i, o), (ai, ao) = cfg.num_layers, io, axes[-2:]
            if method == "ia3":  # one fp32 scale per input (feed-forward modules) or per output
                ff = path[-2] in feedforward(lo)
                trainable += 4 * L * (i if ff else o)
                dev["trainable"] += 4 * L * (i if ff else o) * held((L, i if ff else o), ("layers", ai if ff else ao),
                                                                    where=where)
            else:
                a, b = 4 * L * lo.r * i, 4 * L * lo.r * o
                fa = held((L, i, lo.r), ("layers", ai, None), where=where)
                fb = held((L, lo.r, o), ("layers", None, ao), where=where)
                mag = 4 * L * o if method == "dora" else 0  # DoRA: + m
                trainable += a + b + mag
                dev["trainable"] += a * fa + b * fb + mag * held((L, o), ("layers", ao), where=where)
                if method == "pissa":  # the initial factors, frozen (for the original model and the export)
                    base += a + b
                    dev["base"] += a * fa + b * fb
    acts = activations(cfg, run, c)
    plan_ = Plan(base, trainable, 2 * trainable, 2 * trainable, acts + dequant,
                 [f"activations: remat {run.model.remat}, micro-batch {run.train.batch_size} x {run.data.max_length}"
                  f" tokens, {run.train.grad_accum} micro-batch(es) per step (run one after another)"])
    if mesh is not None:
        rows = m.data * m.fsdp
        split = rows if run.train.batch_size % rows == 0 else 1  # the batch (activations) over data x fsdp
        t = int(dev["trainable"])
        plan_.per_device = (int(dev["base"]), t, 2 * t, 2 * t, acts // split + int(dev["dequant"]))
        plan_.devices = m.data * m.fsdp * m.tensor
        plan_.notes.append(f"per device: mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor} ({m.strategy}), "
                           f"the busiest device; quantized linears gathered one layer at a time as codes")
    elif -1 in (m.data, m.fsdp, m.tensor):
        plan_.notes.append("per device: give every mesh size (no -1) to see the bytes each device holds")
    return plan_


def activations(cfg: DecoderConfig, run: RunConfig, c: int) -> int:
    """The estimate of the module docstring, for one micro-batch."""
    B, S = run.train.batch_size, run.data.max_length
    T, L, D, F, V = B * S, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    A = S * S if run.model.attention == "xla" else min(S, 256) ** 2  # the scores held at once
    layer = T * c * (6 * D + 3 * NH + 4 * KH + 4 * F) + B * cfg.num_heads * A * (8 + c)
    saved = {"none": L * layer, "full": L * T * D * c + layer,
             "proj": L * T * c * (D + 2 * NH + 2 * KH + D + 2 * F) + layer,
             "dots": L * T * c * (D + NH + 2 * KH + D + 2 * F + D) + layer}[run.model.remat]
    return saved + min(LOGITS_TOKENS, T) * V * 4 * 3 + T * D * 4


def format_plan(p: Plan, cfg: DecoderConfig, run: RunConfig, name: str) -> str:
    lo = run.lora
    kind = "IA3" if lo.method == "ia3" else ("DoRA" if lo.use_dora else "LoRA") + f" r={lo.r}"
    what = (f"{kind} on {', '.join(lo.target_modules)}" if lo.enabled else "full fine-tuning")
    rows = [("base weights" + (f" ({run.quant.base})" if run.quant.base != "none" else f" ({run.model.dtype})"),
             p.base), ("trainable (fp32)", p.trainable), ("optimizer (AdamW, fp32)", p.optimizer),
            ("gradients (estimate)", p.gradients), ("activations (estimate)", p.activations), ("total", p.total)]
    head = (f"{name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
            f"heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}; {what}, compute {run.model.dtype}")
    if p.per_device is not None:
        dev = [*p.per_device, sum(p.per_device)]
        head += f"\n  {'':<26}{'all devices':>14}{f'per device (of {p.devices})':>24}"
        lines = [head] + [f"  {k:<26}{v / GiB:>10.3f} GiB{d / GiB:>20.3f} GiB" for (k, v), d in zip(rows, dev)]
    else:
        lines = [head] + [f"  {k:<26}{v / GiB:>10.3f} GiB" for k, v in rows]
    lines += [f"  {n}" for n in p.notes]
    return "\n".join(lines)
