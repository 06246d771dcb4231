"""DecoderConfig: the switches of the one parametric decoder, derived from a checkpoint's config.json.

Every supported family is a point in this small space:

    family       norm       act        bias      qk-norm  extra
    llama        x*w        silu       opt.      -        llama3 / linear rope scaling
    mistral      x*w        silu       -         -        sliding window on every layer
    qwen2        x*w        silu       q,k,v     -        (sliding layers from layer_types)
    qwen3        x*w        silu       opt.      rms      -
    gemma        x*(1+w)    gelu-tanh  opt.      -        embeddings * sqrt(D), tied
    gemma2       x*(1+w)    gelu-tanh  opt.      -        sandwich norms, soft-caps, sliding/global
    gemma3_text  x*(1+w)    gelu-tanh  opt.      (1+w)    sandwich norms, local/global rope

A value the decoder does not implement raises JaxftError naming the key: a config is never
silently turned into a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxft.errors import JaxftError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. `kind`: default | linear | llama3 (HF rope_type)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    act: str = "silu"  # silu | gelu_tanh | gelu
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma 2/3: post-attention, pre/post-feedforward norms
    query_scale: float | None = None  # None → head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "full_attention" | "sliding_attention" per layer
    rope: RopeConfig = RopeConfig()  # full-attention layers
    rope_local: RopeConfig | None = None  # sliding layers, when they differ (Gemma 3)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    model_type: str = "llama"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise JaxftError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise JaxftError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @classmethod
    def from_hf(cls, source: Any) -> "DecoderConfig":
        """From a model directory, a config.json path, a dict or a transformers PretrainedConfig.

        >>> DecoderConfig.from_hf("path/to/SmolLM2").num_kv_heads
        3
        """
        where = _where(source)
        try:
            cfg = _from_hf_config(_as_hf_config(source), where)
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
            cause = str(e).splitlines()[0][:120] if str(e) else ""  # a damaged config: a value of the wrong kind
            raise JaxftError(f"{where}: not a usable model config ({type(e).__name__}: {cause})") from None
        _check_sizes(cfg, where)
        return cfg


def _check_sizes(c: "DecoderConfig", where: str) -> None:
    """Sizes a damaged or hand-edited config.json (or GGUF header) can get wrong, each a one-line error before
    any shape is built from them."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings"):
        v = getattr(c, key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 2**31 - 1:
            raise JaxftError(f"{where}: {key}={v!r}: expected a positive integer")
    if c.num_heads % c.num_kv_heads:
        raise JaxftError(f"{where}: num_attention_heads={c.num_heads} is not a multiple of "
                         f"num_key_value_heads={c.num_kv_heads}")
    if not (isinstance(c.rms_norm_eps, float) and math.isfinite(c.rms_norm_eps) and c.rms_norm_eps >= 0):
        raise JaxftError(f"{where}: rms_norm_eps={c.rms_norm_eps!r}: expected a finite number >= 0")


def _where(source: Any) -> str:
    if isinstance(source, (str, Path)):
        p = Path(source)
        return str(p / "config.json" if p.is_dir() else p)
    return "config"


def _as_hf_config(source: Any):
    """transformers normalizes old and new config.json spellings (rope_scaling → rope_parameters...)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    where = _where(source)
    if isinstance(source, (str, Path)):
        p = Path(source)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise JaxftError(f"{p}: no such file (expected a Hugging Face model directory with config.json)")
        try:
            source = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JaxftError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(source, dict):
        raise JaxftError(f"cannot build a DecoderConfig from {type(source).__name__}")
    model_type = source.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise JaxftError(f"{where}: unsupported model_type {model_type!r}; "
                         f"jaxft supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    d = {k: v for k, v in source.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type].from_dict(d)
    except Exception as e:  # transformers' own validation (e.g. bad rope parameters)
        raise JaxftError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _rope(params: dict, where: str, key: str) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise JaxftError(f"{where}: {key}.rope_type={kind!r} is not implemented (jaxft supports "
                         f"{', '.join(_ROPE_TYPES)})")
    prf = params.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1.0):
        raise JaxftError(f"{where}: {key}.partial_rotary_factor={prf} is not implemented")
    out = RopeConfig(theta=float(params.get("rope_theta", 10000.0)), kind=kind,
                     factor=float(params.get("factor", 1.0)))
    if kind == "llama3":
        out = dataclasses.replace(
            out, low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    elif kind == "default" and params.get("factor", 1.0) not in (None, 1.0):
        raise JaxftError(f"{where}: {key}.factor given for rope_type 'default'")
    return out


def _from_hf_config(c, where: str) -> DecoderConfig:
    mt = c.model_type
    gemma = mt.startswith("gemma")
    get = lambda k, default=None: getattr(c, k, default)  # noqa: E731

    act_key = "hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"  # what HF's modeling reads
    act_name = get(act_key)
    if act_name not in _ACTIVATIONS:
        raise JaxftError(f"{where}: {act_key}={act_name!r} is not implemented "
                         f"(jaxft supports {', '.join(_ACTIVATIONS)})")
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop"):
        if get(key) not in (None, 0, 0.0):
            raise JaxftError(f"{where}: {key}={get(key)} is not implemented (dropout inside the base model)")
    if get("use_bidirectional_attention"):
        raise JaxftError(f"{where}: use_bidirectional_attention=true is not implemented")
    if get("pretraining_tp", 1) not in (None, 1):
        raise JaxftError(f"{where}: pretraining_tp={get('pretraining_tp')} is not implemented")
    if get("layer_types") and set(get("layer_types")) - {"full_attention", "sliding_attention"}:
        raise JaxftError(f"{where}: layer_types {sorted(set(get('layer_types')))} are not implemented")

    rp = get("rope_parameters") or {}
    if "full_attention" in rp:  # per-layer-type rope (Gemma 3)
        rope = _rope(rp["full_attention"], where, "rope_parameters.full_attention")
        rope_local = _rope(rp.get("sliding_attention", rp["full_attention"]), where,
                           "rope_parameters.sliding_attention")
    else:
        rope, rope_local = _rope(rp, where, "rope_parameters"), None

    heads = c.num_attention_heads
    head_dim = get("head_dim") or c.hidden_size // heads
    sliding = get("sliding_window")
    layer_types = tuple(get("layer_types") or ())
    if not layer_types:  # Mistral: a window on every layer when sliding_window is set
        layer_types = (("sliding_attention" if sliding else "full_attention"),) * c.num_hidden_layers
    if "sliding_attention" not in layer_types:
        sliding = None
    elif not sliding:
        raise JaxftError(f"{where}: sliding_attention layers without a sliding_window")

    attn_bias = bool(get("attention_bias", False))
    return DecoderConfig(
        model_type=mt,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.rms_norm_eps),
        act=_ACTIVATIONS[act_name],
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        qkv_bias=attn_bias or mt == "qwen2",
        o_bias=attn_bias,
        mlp_bias=bool(get("mlp_bias", False)),
        qk_norm=mt in ("qwen3", "gemma3_text"),
        sandwich_norm=mt in ("gemma2", "gemma3_text"),
        query_scale=(get("query_pre_attn_scalar") ** -0.5) if get("query_pre_attn_scalar") else None,
        attn_softcap=get("attn_logit_softcapping"),
        final_softcap=get("final_logit_softcapping"),
        sliding_window=sliding,
        layer_types=layer_types,
        rope=rope,
        rope_local=rope_local,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        max_position_embeddings=int(get("max_position_embeddings") or 8192),
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies [head_dim // 2] (float32), as transformers' ROPE_INIT_FUNCTIONS compute them."""
    import numpy as np

    inv = 1.0 / (np.float32(rope.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    if rope.kind == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv
