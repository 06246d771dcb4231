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
from pathlib import Path

from jaxft.adapters import METHODS, method_of
from jaxft.adapters.ia3 import feedforward
from jaxft.config import RunConfig
from jaxft.errors import JaxftError
from jaxft.example import example_model
from jaxft.formats.gguf import GGUFSource
from jaxft.losses import LOGITS_TOKENS
from jaxft.models.config import DecoderConfig
from jaxft.models.names import PROJECTIONS
from jaxft.quant import BLOCK, BLOCK2, should_quantize

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


def _params(cfg: DecoderConfig) -> list[tuple[tuple[str, ...], int, tuple[int, int] | None]]:
    """(path, element count, (in, out) for kernels) of every parameter, layer parameters stacked."""
    L, D, V, H = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    out = [(("model", "embed_tokens", "embedding"), V * D, None), (("model", "norm", "scale"), D, None)]
    lay = ("model", "layers")
    for name, (i, o) in linears(cfg).items():
        block = PROJECTIONS[name][0]
        mod = (block, name)
        out.append((lay + mod + ("kernel",), L * i * o, (i, o)))
        bias = cfg.o_bias if name == "o_proj" else cfg.qkv_bias if block == "self_attn" else cfg.mlp_bias
        if bias:
            out.append((lay + mod + ("bias",), L * o, None))
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if cfg.sandwich_norm else []
    out += [(lay + (n, "scale"), L * D, None) for n in norms]
    if cfg.qk_norm:
        out += [(lay + ("self_attn", n, "scale"), L * H, None) for n in ("q_norm", "k_norm")]
    if not cfg.tie_word_embeddings:
        out.append((("lm_head", "kernel"), D * V, (D, V)))
    return out


@dataclasses.dataclass
class Plan:
    base: int
    trainable: int
    optimizer: int
    gradients: int
    activations: int
    notes: list[str]

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.optimizer + self.gradients + self.activations


def plan(cfg: DecoderConfig, run: RunConfig) -> Plan:
    c = 2 if run.model.dtype == "bf16" else 4
    lo, q = run.lora, run.quant
    method = method_of(lo)
    names = METHODS[method].target_names(lo, cfg.model_type)
    wanted = set(linears(cfg)) if "all-linear" in names else set(names)
    base = trainable = dequant = 0
    for path, n, io in _params(cfg):
        saved = lo.enabled and any(m in path for m in lo.modules_to_save)
        if not lo.enabled or saved:
            trainable += 4 * n
        elif should_quantize(path, q):
            layers = cfg.num_layers if path[:2] == ("model", "layers") else 1
            base += layers * kernel_bytes(*io, q.base, q.double_quant, c)
            dequant += io[0] * io[1] * c if layers > 1 else 0
        else:
            base += c * n
        if lo.enabled and io is not None and path[:2] == ("model", "layers") and path[-2] in wanted:
            L = cfg.num_layers
            if method == "ia3":  # one fp32 scale per input (feed-forward modules) or per output
                trainable += 4 * L * (io[0] if path[-2] in feedforward(lo) else io[1])
            else:
                trainable += 4 * L * lo.r * sum(io) + (4 * L * io[1] if method == "dora" else 0)  # DoRA: + m
            if method == "pissa":  # the initial factors, frozen (for the original model and the export)
                base += 4 * L * lo.r * sum(io)
    return Plan(base, trainable, 2 * trainable, 2 * trainable, activations(cfg, run, c) + dequant,
                [f"activations: remat {run.model.remat}, micro-batch {run.train.batch_size} x {run.data.max_length}"
                 f" tokens, {run.train.grad_accum} micro-batch(es) per step (run one after another)"])


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
    lines = [head] + [f"  {k:<26}{v / GiB:>10.3f} GiB" for k, v in rows] + [f"  {n}" for n in p.notes]
    return "\n".join(lines)
