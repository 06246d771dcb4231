"""Run configuration: frozen dataclasses, YAML files, `key=value` overrides, validation up front.

    run = load_config("configs/sft_lora.yaml", ["train.steps=10", "lora.r=8"])

The whole config is checked before any model is loaded: an unknown key, a wrong type or an
impossible value is a one-line JaxftError naming the key (and the file). Architecture never appears
here: it comes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxft.errors import JaxftError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "example"  # HF directory, .gguf file, or "example" (the embedded SmolLM2-135M-Instruct)
    dtype: Literal["fp32", "bf16"] = "fp32"  # parameter storage and compute dtype
    remat: Literal["none", "proj", "dots", "full"] = "proj"  # jaxft.models.decoder.REMAT_POLICIES
    cpu_tuned: bool = True  # layouts tuned on XLA:CPU (jaxft.models.decoder.Tuning); false = the plain forms


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


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Preference optimization (objective: dpo); see jaxft/dpo.py for the losses (TRL's definitions)."""

    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO (sigmoid), robust, SimPO
    simpo_gamma: float = 0.5  # SimPO target margin
    orpo_lambda: float = 0.1  # ORPO weight of the odds-ratio term
    reference: Literal["lora_base", "cache"] = "lora_base"  # the adapter switched off, or cached log-probs
    cache_dir: str | None = None  # reference log-prob cache (default <train.out_dir>/reference)
    max_prompt_length: int | None = None  # prompts longer than this keep their last tokens
    truncate_prompt: bool = True  # over-length pairs cut the prompt first (else they are dropped)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward model (objective: reward); see jaxft/objectives/reward_model.py (TRL RewardTrainer's keys)."""

    center_rewards_coefficient: float | None = None  # + c · mean((r_c + r_r)²); the paper's value: 0.01


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
class RolloutConfig:
    """On-policy sampling and rewards, shared by the RL objectives (jaxft/objectives/rollout.py, reward_funcs.py).

    train.batch_size counts completions per micro-batch (TRL's per_device_train_batch_size); a step's
    generation batch is batch_size × grad_accum completions = that / num_generations prompts."""

    num_generations: int | None = None  # G completions per prompt; None = the objective's default (grpo 8, rloo 2)
    max_completion_length: int = 256  # new tokens per completion (TRL: 512)
    temperature: float = 1.0  # sampling AND training log-probs (TRL); > 0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    reward_funcs: tuple[str, ...] = ("json_fields",)  # built-in names, module:function or path/to/file.py:function
    reward_weights: tuple[float, ...] | None = None  # one per reward function; None = all 1.0
    mask_truncated_completions: bool = False  # completions without EOS: no loss (still in the group statistics)


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """GRPO and its variants (objective: grpo); TRL 1.16 GRPOConfig's names and defaults."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] = "dapo"
    beta: float = 0.0  # k3 KL coefficient; 0 = no reference forward at all
    epsilon: float = 0.2  # clip range (low)
    epsilon_high: float | None = None  # None = epsilon (DAPO: 0.28; CISPO: the ratio cap, e.g. 5.0)
    delta: float | None = None  # two-sided clip: the ratio capped at delta (INTELLECT-2)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    use_bias_correction_kl: bool = True  # KL multiplied by the (differentiable) ratio
    num_iterations: int = 1  # optimizer steps per generation batch (μ); > 1 stores the old log-probs
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


@dataclasses.dataclass(frozen=True)
class RlooConfig:
    """RLOO (objective: rloo); TRL 1.16 RLOOConfig's names and defaults."""

    beta: float = 0.05  # sequence-level k1 KL subtracted from the reward
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, ...] | None = None  # (low, high)


@dataclasses.dataclass(frozen=True)
class PpoConfig:
    """PPO with a reward model (objective: ppo); see jaxft/objectives/ppo.py (TRL 1.12 PPOConfig's keys)."""

    reward_model: str | None = None  # a jaxft reward run directory or a *ForSequenceClassification model
    value_init: Literal["reward", "random"] = "reward"  # value head from the reward model's score (TRL's example)
    num_ppo_epochs: int = 4  # optimizer passes over each rollout batch
    num_mini_batches: int = 1  # rollout batch = train.batch_size * train.grad_accum * num_mini_batches prompts
    # sampling: rollout.max_completion_length (TRL's response_length, 53) and rollout.temperature (TRL: 0.7)
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None  # subtracted from the score of a response without EOS


@dataclasses.dataclass(frozen=True)
class CaiConfig:
    """Constitutional AI data stages (`jaxft cai revise | label | run`); see jaxft/commands/cai.py."""

    constitution: str = "configs/constitutions/default.yaml"  # YAML, or a released JSON layout (jaxft/data/constitution.py)
    feedback_constitution: str | None = None  # the comparison questions `label` asks (default: constitution)
    prompts: str = ""  # prompts: chat rows (turns after the last user turn are dropped) or `prompt` rows
    label_prompts: str | None = None  # prompts of the feedback stage (default: prompts)
    heldout: str | None = None  # held-out rows (prompt + reference answer) for `cai run`'s summary table
    max_prompts: int = 0  # use the first N prompts (0 = all)
    out_dir: str = "runs/cai"  # one folder per stage: revise/ sft/ label/ dpo/ (or reward/) summary/
    revisions: int = 1  # critique → revision rounds per prompt, a principle drawn for each
    few_shot: bool = True  # the constitution's worked examples as earlier chat turns
    batch_size: int = 16  # prompts per generation call; also the unit of resume (one chunk)
    max_new_tokens: int = 128
    temperature: float = 0.7  # sampling of answers, critiques and revisions (0 = greedy)
    top_p: float = 1.0
    seed: int = 0
    feedback_model: str | None = None  # the judge (any supported model); None = the policy that answered
    principles_per_pair: int = 4  # comparison questions asked per pair (drawn without replacement)
    both_orders: bool = True  # ask with (A, B) and (B, A), cancelling the judge's position bias
    clamp: tuple[float, ...] = ()  # [lo, hi]: clip P(first answer better), e.g. [0.4, 0.6]
    label_batch_size: int = 16  # feedback prompts per scoring call
    final: Literal["dpo", "reward"] = "dpo"  # `cai run`'s last stage: DPO on the pairs, or a reward model
    sft: tuple[str, ...] = ()  # key=value overrides of the SFT stage's run (`cai run`)
    dpo: tuple[str, ...] = ()  # key=value overrides of the DPO / reward stage's run


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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    objective: str = "sft"  # a key of jaxft.objectives.OBJECTIVES
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dpo: DpoConfig = DpoConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GrpoConfig = GrpoConfig()
    rloo: RlooConfig = RlooConfig()
    ppo: PpoConfig = PpoConfig()
    cai: CaiConfig = CaiConfig()
    mesh: MeshConfig = MeshConfig()
    adapters: tuple[AdapterSpec, ...] = ()  # several adapters trained at once (jaxft.adapters.bank)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


INT_RANGE = (-2**31, 2**31 - 1)  # every integer key: counts, sizes and seeds all fit int32 (JAX's default)
# paths / addresses: "" would silently mean the current directory
NONEMPTY = ("model.path", "train.out_dir", "data.validation", "eval.file", "lora.init_adapter", "dpo.cache_dir",
            "mesh.coordinator_address", "ppo.reward_model", "cai.out_dir")


def _show(value: Any) -> str:
    """repr(value), cut to 60 characters (an error line stays readable whatever was passed)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """value (from YAML or a key=value string) → type tp, or a JaxftError naming the key.

    Numbers are also checked by `_check_number` (see there)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if not isinstance(value, (str, int, float)) or value not in args:
            raise JaxftError(f"{key}: {_show(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple and dataclasses.is_dataclass(args[0]):  # a list of sections (adapters:)
        if not isinstance(value, (list, tuple)):
            raise JaxftError(f"{key}: expected a list of mappings, got {_show(value)}")
        return tuple(_build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value))
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise JaxftError(f"{key}: expected a list, got {_show(value)}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise JaxftError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:  # not a number, or an integer of more than 4300 digits
                raise JaxftError(f"{key}: expected {what}, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int if tp is int else (int, float)):
            raise JaxftError(f"{key}: expected {what}, got {_show(value)}")
        try:
            value = tp(value)
        except OverflowError:  # float() of an integer beyond 1.8e308
            raise JaxftError(f"{key}: {_show(value)} is out of range") from None
        _check_number(value, key)
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise JaxftError(f"{key}: expected a string, got {_show(value)}")
        value = str(value)
        if "\0" in value:
            raise JaxftError(f"{key}: contains a NUL character")
        if not value and key in NONEMPTY:
            raise JaxftError(f"{key}: is empty (give a value, or null where the key allows it)")
        return value
    raise TypeError(f"unhandled config type {tp}")


def _check_number(value: Any, key: str) -> None:
    """Every float finite and every integer within INT_RANGE, for every key (new ones included): NaN
    passes any check written as `not x < lo`, inf passes `> 0`, a 30-digit count passes `>= 1` and then
    overflows an int32 on the device."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise JaxftError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, int) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise JaxftError(f"{key}: {_show(value)} is out of range (an integer in [-2**31, 2**31 - 1])")


def _check_numbers(cfg: Any, prefix: str = "") -> None:
    """_check_number on every number of a (nested) config dataclass built in code, not by load_config."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                _check_numbers(v, f"{prefix}{f.name}[{i}].")
        else:
            _check_number(value, f"{prefix}{f.name}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise JaxftError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in fields)  # str: YAML keys may be numbers
    if unknown:
        raise JaxftError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: str):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise JaxftError(f"{dotted}: {p} is not a section")
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a >4300-digit int, deep nesting):
        node[leaf] = value                                # keep the text; the key's type check reports it


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + `section.key=value` overrides → a validated RunConfig."""
    tree: dict = {}
    where = ""
    if path is not None:
        p = Path(path)
        where = f"{p}: "
        if not p.is_file():
            raise JaxftError(f"{p}: no such config file")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JaxftError(f"{p}: invalid YAML ({first[:200]})") from None
    for o in overrides:
        if "=" not in o:
            raise JaxftError(f"override {o!r}: expected section.key=value")
        k, v = o.split("=", 1)
        _set(tree, k.strip(), v)
    try:
        run = _build(RunConfig, tree, "")
        validate(run)
    except JaxftError as e:
        raise JaxftError(f"{where}{e}") from None
    return run


def residual_init(init: str) -> bool:
    """Whether lora.init moves the adapter's start out of the base weights (PiSSA, OLoRA: W_res = W - sBA)."""
    return init == "olora" or init.startswith("pissa")


def _init_ok(init: str) -> bool:
    if init in ("kaiming", "gaussian", "pissa", "olora"):
        return True
    k = init.removeprefix("pissa_niter_")
    return init.startswith("pissa_niter_") and k.isdigit() and int(k) >= 1


def _override_ok(o: str) -> bool:
    key = o.split("=", 1)[0]
    return "=" in o and "." in key and all(part.isidentifier() for part in key.split("."))


def rl_checks(run: RunConfig) -> list[tuple[bool, str, str]]:
    """Ranges of the rollout / grpo / rloo / ppo sections, whatever the objective."""
    r, g, o, p = run.rollout, run.grpo, run.rloo, run.ppo
    return [
        (r.num_generations is None or r.num_generations >= 2, "rollout.num_generations", "must be >= 2 or null"),
        (r.max_completion_length >= 1, "rollout.max_completion_length", "must be >= 1"),
        (r.temperature > 0, "rollout.temperature", "must be > 0 (the log-probs are taken at this temperature)"),
        (r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)"),
        (0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]"),
        (bool(r.reward_funcs), "rollout.reward_funcs", "is empty"),
        *[(":" in f or f in ("json_fields", "json_valid", "exact_match", "length_penalty"), "rollout.reward_funcs",
           f"{_show(f)} is not a built-in (json_fields, json_valid, exact_match, length_penalty, regex:PATTERN, "
           f"overlong:CACHE, reward_model:PATH) nor module:function / file.py:function") for f in r.reward_funcs],
        (r.reward_weights is None or len(r.reward_weights) == len(r.reward_funcs), "rollout.reward_weights",
         f"has {len(r.reward_weights or ())} values for {len(r.reward_funcs)} reward functions"),
        (g.beta >= 0, "grpo.beta", "must be >= 0"),
        (0 <= g.epsilon < 1, "grpo.epsilon", "must be in [0, 1)"),
        (g.epsilon_high is None or g.epsilon_high >= 0, "grpo.epsilon_high", "must be >= 0 or null"),
        (g.delta is None or g.delta > 1, "grpo.delta", "must be > 1 or null"),
        (g.num_iterations >= 1, "grpo.num_iterations", "must be >= 1"),
        (g.sapo_temperature_pos > 0, "grpo.sapo_temperature_pos", "must be > 0"),
        (g.sapo_temperature_neg > 0, "grpo.sapo_temperature_neg", "must be > 0"),
        (o.beta >= 0, "rloo.beta", "must be >= 0"),
        (0 <= o.epsilon < 1, "rloo.epsilon", "must be in [0, 1)"),
        (o.epsilon_high is None or o.epsilon_high >= 0, "rloo.epsilon_high", "must be >= 0 or null"),
        (o.num_iterations >= 1, "rloo.num_iterations", "must be >= 1"),
        (p.num_ppo_epochs >= 1, "ppo.num_ppo_epochs", "must be >= 1"),
        (p.num_mini_batches >= 1, "ppo.num_mini_batches", "must be >= 1"),
        (p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0"),
        (p.cliprange > 0, "ppo.cliprange", "must be > 0"),
        (p.cliprange_value > 0, "ppo.cliprange_value", "must be > 0"),
        (p.vf_coef >= 0, "ppo.vf_coef", "must be >= 0"),
        (0 <= p.gamma <= 1, "ppo.gamma", "must be in [0, 1]"),
        (0 <= p.lam <= 1, "ppo.lam", "must be in [0, 1]"),
        (p.missing_eos_penalty is None or p.missing_eos_penalty >= 0, "ppo.missing_eos_penalty",
         "must be >= 0 or null (it is subtracted from the score)"),
        (o.reward_clip_range is None or (len(o.reward_clip_range) == 2
                                         and o.reward_clip_range[0] <= o.reward_clip_range[1]),
         "rloo.reward_clip_range", "must be [low, high] with low <= high, or null"),
    ]


def validate(run: RunConfig) -> None:
    """Impossible values, each a one-line error naming the key."""
    _check_numbers(run)
    checks = [
        (run.lora.r >= 1, "lora.r", "must be >= 1"),
        (run.lora.alpha > 0, "lora.alpha", "must be > 0"),
        (0 <= run.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (bool(run.lora.target_modules) or not run.lora.enabled, "lora.target_modules", "is empty"),
        (_init_ok(run.lora.init), "lora.init",
         f"{_show(run.lora.init)} is not kaiming, gaussian, pissa, pissa_niter_K (K >= 1) or olora"),
        (not (run.lora.use_dora and run.lora.init not in ("kaiming", "gaussian")), "lora.use_dora",
         f"DoRA with lora.init={run.lora.init} is not supported; use lora.init=kaiming or gaussian"),
        (run.lora.method == "lora" or not (run.lora.use_dora or run.lora.init != "kaiming"), "lora.method",
         "ia3 has no low-rank factors: lora.use_dora and lora.init apply to method lora only"),
        (run.lora.method == "ia3" or run.lora.feedforward_modules is None, "lora.feedforward_modules",
         "applies to lora.method=ia3 only"),
        (run.data.max_length >= 8, "data.max_length", "must be >= 8"),
        (0 <= run.data.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)"),
        (run.data.seed >= 0, "data.seed", "must be >= 0"),
        (run.optim.lr > 0, "optim.lr", "must be > 0"),
        (run.optim.eps > 0, "optim.eps", "must be > 0"),
        (run.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (0 <= run.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
        (run.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (run.optim.clip_norm is None or run.optim.clip_norm > 0, "optim.clip_norm", "must be > 0 or null"),
        (run.optim.lora_b_lr_ratio > 0, "optim.lora_b_lr_ratio", "must be > 0"),
        (0 <= run.optim.b1 < 1, "optim.b1", "must be in [0, 1)"),
        (0 <= run.optim.b2 < 1, "optim.b2", "must be in [0, 1)"),
        (run.train.steps >= 1, "train.steps", "must be >= 1"),
        (run.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (run.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (run.train.seed >= 0, "train.seed", "must be >= 0"),
        (run.train.eval_every >= 0, "train.eval_every", "must be >= 0"),
        (run.train.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0 = the whole validation split)"),
        (run.train.log_every >= 1, "train.log_every", "must be >= 1"),
        (run.train.save_every >= 0, "train.save_every", "must be >= 0"),
        (run.train.keep >= 1, "train.keep", "must be >= 1"),
        (run.train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1"),
        (run.eval.max_examples >= 0, "eval.max_examples", "must be >= 0"),
        (run.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
        (run.eval.batch_size >= 1, "eval.batch_size", "must be >= 1"),
        (run.dpo.beta > 0, "dpo.beta", "must be > 0"),
        (0 <= run.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)"),
        (run.dpo.simpo_gamma >= 0, "dpo.simpo_gamma", "must be >= 0"),
        (run.dpo.orpo_lambda >= 0, "dpo.orpo_lambda", "must be >= 0"),
        (run.reward.center_rewards_coefficient is None or run.reward.center_rewards_coefficient >= 0,
         "reward.center_rewards_coefficient", "must be >= 0 or null"),  # a range whatever the objective
        (run.dpo.max_prompt_length is None or run.dpo.max_prompt_length >= 1, "dpo.max_prompt_length",
         "must be >= 1 or null"),
        *rl_checks(run),
        (run.cai.max_prompts >= 0, "cai.max_prompts", "must be >= 0 (0 = all)"),
        *[(_override_ok(o), f"cai.{k}", f"{_show(o)} is not a section.key=value override")
          for k in ("sft", "dpo") for o in getattr(run.cai, k)],
        (run.cai.revisions >= 1, "cai.revisions", "must be >= 1"),
        (run.cai.batch_size >= 1, "cai.batch_size", "must be >= 1"),
        (run.cai.label_batch_size >= 1, "cai.label_batch_size", "must be >= 1"),
        (run.cai.max_new_tokens >= 1, "cai.max_new_tokens", "must be >= 1"),
        (run.cai.temperature >= 0, "cai.temperature", "must be >= 0 (0 = greedy)"),
        (0 < run.cai.top_p <= 1, "cai.top_p", "must be in (0, 1]"),
        (run.cai.seed >= 0, "cai.seed", "must be >= 0"),
        (run.cai.principles_per_pair >= 1, "cai.principles_per_pair", "must be >= 1"),
        (not run.cai.clamp or (len(run.cai.clamp) == 2 and 0 <= run.cai.clamp[0] <= 0.5 <= run.cai.clamp[1] <= 1),
         "cai.clamp", "must be [] or [lo, hi] with 0 <= lo <= 0.5 <= hi <= 1"),
    ]
    from jaxft.objectives import CHECKS  # each objective validates its own section against the others

    if run.objective not in CHECKS:
        raise JaxftError(f"objective: {run.objective!r} is not one of {', '.join(map(repr, CHECKS))}")
    checks += CHECKS[run.objective](run)
    sizes = (run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    checks += [(n >= 1 or n == -1, f"mesh.{axis}", "must be >= 1 or -1 (the remaining devices)")
               for axis, n in zip(("data", "fsdp", "tensor"), sizes)]
    checks += [(sizes.count(-1) <= 1, "mesh", "only one of data / fsdp / tensor may be -1"),
               (run.mesh.num_processes is None or run.mesh.num_processes >= 1, "mesh.num_processes",
                "must be >= 1 or null"),
               (run.mesh.process_id is None or run.mesh.process_id >= 0, "mesh.process_id", "must be >= 0 or null"),
               (None in (run.mesh.process_id, run.mesh.num_processes) or run.mesh.process_id < run.mesh.num_processes,
                "mesh.process_id", "must be < mesh.num_processes")]
    from jaxft.models.names import PROJECTIONS

    linears = (*PROJECTIONS, "all-linear")
    checks += [(m in linears, "lora.target_modules", f"{_show(m)} is not one of {', '.join(linears)}")
               for m in run.lora.target_modules]
    checks += [(m in linears[:-1] and m in (run.lora.target_modules if "all-linear" not in run.lora.target_modules
                                             else linears), "lora.feedforward_modules",
                f"{_show(m)} is not one of lora.target_modules (PEFT: a subset of target_modules)")
               for m in run.lora.feedforward_modules or ()]
    checks += [(m in ("embed_tokens", "lm_head"), "lora.modules_to_save", f"{_show(m)} is not embed_tokens or lm_head")
               for m in run.lora.modules_to_save]
    checks += [(m in linears[:-1], "quant.skip_modules", f"{_show(m)} is not one of {', '.join(linears[:-1])}")
               for m in run.quant.skip_modules]
    checks += [(run.quant.base == "none" or run.lora.enabled, "quant.base",
                "a quantized base cannot be fine-tuned in full; set lora.enabled=true or quant.base=none"),
               (not (run.quant.lm_head and "lm_head" in run.lora.modules_to_save), "quant.lm_head",
                "lm_head cannot be both quantized and trained (lora.modules_to_save)")]
    checks += adapter_checks(run)
    for ok, key, msg in checks:
        if not ok:
            raise JaxftError(f"{key}: {msg}")


def adapter_checks(run: RunConfig) -> list[tuple[bool, str, str]]:
    """The `adapters:` section (multi-adapter training, jaxft.adapters.bank): what one bank can hold."""
    if not run.adapters:
        return []
    from jaxft.adapters.bank import RANK_BUCKETS, bucket
    from jaxft.models.names import PROJECTIONS

    names = [a.name for a in run.adapters]
    r0 = run.adapters[0].r or run.lora.r
    rows = [(run.objective == "sft", "adapters", f"multi-adapter training supports objective sft, not {run.objective}"),
            (run.lora.enabled and run.lora.method == "lora" and not run.lora.use_dora and run.lora.init in
             ("kaiming", "gaussian"), "adapters", "needs plain LoRA (lora.enabled, method lora, no DoRA / PiSSA)"),
            (not run.lora.modules_to_save and not run.lora.init_adapter, "adapters",
             "lora.modules_to_save / lora.init_adapter do not apply to a multi-adapter run"),
            (not run.data.train, "data.train", "a multi-adapter run reads adapters[i].train instead; leave it empty")]
    for i, a in enumerate(run.adapters):
        k = f"adapters[{i}]"
        r = a.r or run.lora.r
        rows += [(bool(a.name) and not any(c in a.name for c in "/= ,") and a.name != "__base__", f"{k}.name",
                  f"{_show(a.name)}: give each adapter a name (no '/', '=', ',' or space)"),
                 (names.index(a.name) == i, f"{k}.name", f"{a.name!r} is used twice"),
                 (bool(a.train), f"{k}.train", "no training file given"),
                 (a.r is None or a.r >= 1, f"{k}.r", "must be >= 1"),
                 (a.alpha is None or a.alpha > 0, f"{k}.alpha", "must be > 0"),
                 (a.lr is None or a.lr > 0, f"{k}.lr", "must be > 0"),
                 (a.seed is None or a.seed >= 0, f"{k}.seed", "must be >= 0"),
                 *[(m in (*PROJECTIONS, "all-linear"), f"{k}.target_modules", f"{_show(m)} is not one of "
                    f"{', '.join(PROJECTIONS)}, all-linear") for m in a.target_modules or ()],
                 (bucket(r) == bucket(r0), f"{k}.r", f"r={r} is outside the rank bucket {bucket(r0)} of adapters[0] "
                  f"(r={r0}); one bank pads to its largest rank, so ranks share one of {RANK_BUCKETS}")]
    return rows


def check_files(run: RunConfig, training: bool = True) -> None:
    """The config is valid and the data files a run needs exist — checked before the (slow) model load.

    validate() again: a RunConfig built in code (not by load_config) is checked here too."""
    from pathlib import Path as P

    validate(run)
    needed = [("data.validation", run.data.validation), ("eval.file", run.eval.file)]
    needed += [(f"adapters[{i}].{k}", getattr(a, k)) for i, a in enumerate(run.adapters) for k in ("train", "validation")]
    if training and run.adapters:
        pass  # each adapter names its own training file (checked above)
    elif training:
        needed.insert(0, ("data.train", run.data.train or None))
        if not run.data.train:
            raise JaxftError("data.train: no training file given")
    for key, path in needed:
        if path and not P(path).expanduser().exists():
            raise JaxftError(f"{key}: {path}: no such file or directory")
