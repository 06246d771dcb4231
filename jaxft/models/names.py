"""The decoder's layer projections, their block and logical axes: the one copy of that list.

`PROJECTIONS[name] = (block, (in axis, out axis))` with HF's module names, so `target_modules`,
PEFT tensor names, sharding rules and the memory plan all read the same table.
"""

from __future__ import annotations

PROJECTIONS: dict[str, tuple[str, tuple[str, str]]] = {
    "q_proj": ("self_attn", ("embed", "heads")),
    "k_proj": ("self_attn", ("embed", "kv")),
    "v_proj": ("self_attn", ("embed", "kv")),
    "o_proj": ("self_attn", ("heads", "embed")),
    "gate_proj": ("mlp", ("embed", "mlp")),
    "up_proj": ("mlp", ("embed", "mlp")),
    "down_proj": ("mlp", ("mlp", "embed")),
}
HEAD_AXES = {"lm_head": ("embed", "vocab"), "score": ("embed", None),  # output heads beside the backbone
             "value_head": ("embed", None)}
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch (and activations) split over
# IA3's default targets per family (PEFT 0.21 TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING)
IA3_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
               **{t: ("q_proj", "v_proj", "down_proj") for t in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")}}
IA3_FEEDFORWARD = ("down_proj",)  # scaled on their input
SAVEABLE = ("embed_tokens", "lm_head")  # modules_to_save: trained in full next to an adapter
# new heads beside the backbone, always trained in full: a reward model's score (PEFT SEQ_CLS's modules_to_save)
# and PPO's value head (jaxft.models.heads.PolicyWithValue)
TRAINED_HEADS = ("score", "value_head")


def is_stacked(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` belongs to the scanned layers (a leading [L] axis); the path may
    sit inside a larger tree (an optimizer moment: opt_state/0/mu/model/layers/...)."""
    path = tuple(path)
    return any(path[i:i + 2] == ("model", "layers") for i in range(len(path) - 1))


def hf_module(path: tuple[str, ...]) -> str:
    """HF module name template of a layer module path: ('model','layers','self_attn','q_proj') →
    'model.layers.{i}.self_attn.q_proj'."""
    if is_stacked(path):
        return "model.layers.{i}." + ".".join(path[2:])
    return ".".join(path)
