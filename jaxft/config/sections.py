"""The run's general sections (model, lora, quant, data, optim, train, eval, mesh, adapters): frozen
dataclasses whose defaults are the documented defaults. Architecture never appears here: it comes from the
checkpoint. Plain Python, as is the whole config package: importing it imports no jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "example"  # HF directory, .gguf file, or "example" (the embedded SmolLM2-135M-Instruct)
    dtype: Literal["fp32", "bf16"] = "fp32"  # parameter storage and compute dtype
    remat: Literal["none", "proj", "dots", "full"] = "proj"  # jaxft.models.decoder.REMAT_POLICIES
    cpu_tuned: bool = True  # layouts tuned on XLA:CPU (jaxft.models.decoder.Tuning); false = the plain forms
    # the attention kernel (jaxft.models.attention; docs/models.md): auto picks per backend and sequence length
    attention: Literal["auto", "xla", "blockwise", "cudnn", "splash"] = "auto"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True  # false = full fine-tuning (everything trainable)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    target_modules: tuple[str, ...] = ("all-linear",)  # HF module names (q_proj, ...) or all-linear
    modules_to_save: tuple[str, ...] = ()  # trained in full next to LoRA, e.g. (embed_tokens, lm_head)
    init_adapter: str | None = None  # a PEFT LoRA directory to start from (its target modules are used)
    method: Literal["lora", "ia3"] = "lora"  # ia3: learned scaling vectors instead of low-rank factors
    use_dora: bool = False  # DoRA: LoRA + a learned magnitude per output row (jaxft.adapters.dora)
    init: str = "kaiming"  # kaiming | gaussian | pissa | pissa_niter_K | olora (PEFT's init_lora_weights)
    feedforward_modules: tuple[str, ...] | None = None  # ia3: input-scaled modules; None = PEFT's default


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    base: Literal["none", "nf4", "int8"] = "none"  # frozen base linear weights, quantized as they load (QLoRA)
    double_quant: bool = True  # nf4: quantize the block scales too (8-bit, blocks of 256)
    skip_modules: tuple[str, ...] = ()  # layer linears kept in the compute dtype, e.g. (down_proj)
    lm_head: bool = False  # also quantize lm_head (untied models); embeddings and norms never are


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # JSONL / JSON / Parquet / CSV file or a datasets save_to_disk directory
    validation: str | None = None  # same kinds; None = split validation_fraction off train
    validation_fraction: float = 0.0
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = "auto"
    max_length: int = 1024  # tokens per example / packed row
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    train_on_prompt: bool = False  # loss on prompt / user tokens too
    system_prompt: str | None = None  # added to chat examples that have none
    strict: bool = False  # a bad row stops the run instead of being skipped and counted
    seed: int = 0
    # read data.train lazily (JSONL, Parquet, save_to_disk folders; SFT only): tokenized and packed on the fly
    streaming: bool = False
    stream_window: int = 8192  # streaming: rows read, shuffled and packed together (the memory held)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.0  # applied to matrices only (not norms, biases)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping; None = off
    lora_b_lr_ratio: float = 1.0  # LoRA+: lr of the B matrices = lr * ratio


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4  # sequences (packed rows) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    eval_every: int = 0  # validation loss every N steps (0 = only at the end)
    eval_batches: int = 8  # validation batches (of batch_size rows) per evaluation, in training and `jaxft eval` (0 = all)
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    keep: int = 3  # checkpoints kept
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    out_dir: str = "runs/default"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    file: str | None = None  # held-out examples for the generation metric (default: data.validation)
    metric: Literal["exact_match", "json_fields", "none"] = "exact_match"
    max_examples: int = 64
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts per generation batch
    few_shot: int = 0  # K > 0: one more column, base_<K>shot: the base with K training rows as earlier chat turns
    few_shot_seed: int = 0  # which K training rows
    # the regression check (jaxft.regression): tuned vs base on the base's greedy answers to general prompts
    regression: bool = True
    regression_file: str | None = None  # prompts (JSONL rows with prompt / messages); default: the shipped 100
    regression_prompts: int = 32  # the first N prompts (0 = all): 32 keeps a CPU evaluation quick
    regression_new_tokens: int = 48  # length of the base's greedy answers (the compared tokens)
    regression_text: str | None = None  # plain UTF-8 text: reg_text_* (cross-entropy change), windows of the above
    max_kl: float | None = None  # gate: `jaxft eval` exits 3 when a variant's reg_kl_mean exceeds it
    max_ce_increase: float | None = None  # gate: ... when a variant's reg_ce_increase (nats / token) exceeds it
    regression_after_training: bool = False  # `jaxft train` ends with the check too (<out_dir>/regression.json)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a multi-adapter run (`adapters:`, jaxft.adapters.bank): unset keys inherit lora.* /
    optim.lr / train.seed. Every adapter trains on its own data against the one frozen base."""

    name: str = ""  # its output name: metrics loss_<name>, export folder <out>/<name>
    train: str = ""  # its training file (as data.train; the other data.* keys are shared)
    validation: str | None = None  # its validation file (eval loss per adapter)
    r: int | None = None
    alpha: float | None = None
    rslora: bool | None = None
    target_modules: tuple[str, ...] | None = None
    lr: float | None = None
    seed: int | None = None  # its adapter's init (the train.seed of its one-adapter run; default train.seed)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # devices per mesh axis; -1 fills the remaining devices (e.g. fsdp: -1)
    fsdp: int = 1
    tensor: int = 1
    strategy: Literal["dp", "fsdp", "fsdp_tp"] = "fsdp"  # which logical axes shard (jaxft.sharding.RULES)
    distributed: bool = False  # multi-host: jax.distributed.initialize before anything else
    coordinator_address: str | None = None  # host:port of process 0; None = environment / auto (Cloud TPU)
    num_processes: int | None = None
    process_id: int | None = None


def residual_init(init: str) -> bool:
    """Whether lora.init moves the adapter's start out of the base weights (PiSSA, OLoRA: W_res = W - sBA)."""
    return init == "olora" or init.startswith("pissa")


def show(value: Any) -> str:
    """repr(value), cut to 60 characters (an error line stays readable whatever was passed)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"
