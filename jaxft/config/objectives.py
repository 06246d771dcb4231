"""Each objective's config section, the head it trains, and its cross-section checks, side by side.

The objectives (jaxft.objectives) read these sections; validation (jaxft.config.checks) runs `CHECKS[objective]`
before anything loads. A check is a row `(ok, key, message)`: a failed row becomes the one-line error
"key: message". Plain Python: nothing here imports jax or an objective.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxft.config.sections import show


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Preference optimization (objective: dpo); see jaxft/objectives/dpo.py for the losses (TRL's definitions)."""

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


# ---------------------------------------------------------------- facts the objectives and their checks share

REFERENCE_FREE = ("simpo", "orpo")  # DPO-family losses without a reference model
DEFAULT_G = {"grpo": 8, "rloo": 2}  # rollout.num_generations when null
# The model head each objective trains beside the backbone (jaxft.models.heads: ScoreModel, PolicyWithValue);
# every other objective trains the causal LM ("lm"). jaxft.setup.build reads it.
HEADS = {"reward": "score", "ppo": "value"}


def head_of(run) -> str:
    return HEADS.get(run.objective, "lm")


def group_size(run) -> int:
    """G: completions per prompt of grpo / rloo."""
    return run.rollout.num_generations or DEFAULT_G[run.objective]


def iterations(run) -> int:
    """μ: optimizer steps per generation batch of grpo / rloo."""
    return run.grpo.num_iterations if run.objective == "grpo" else run.rloo.num_iterations


# ---------------------------------------------------------------- cross-section checks, per objective


def sft_checks(run) -> list[tuple[bool, str, str]]:
    return []


def dpo_checks(run) -> list[tuple[bool, str, str]]:
    lora = run.lora
    return [(run.dpo.reference != "lora_base" or run.dpo.loss_type in REFERENCE_FREE
             or (lora.enabled and not lora.modules_to_save), "dpo.reference",
             "lora_base needs LoRA without modules_to_save (their base weights are trained); use dpo.reference=cache")]


def reward_checks(run) -> list[tuple[bool, str, str]]:
    return [(run.eval.file is None, "eval.file", "a reward model generates nothing: objective reward has no "
                                                 "generation metric (its held-out measure is eval_accuracy)")]


def group_checks(run) -> list[tuple[bool, str, str]]:
    """grpo and rloo: a generation batch holds whole groups; checkpoints fall at the end of one."""
    G, t, mu = group_size(run), run.train, iterations(run)
    n = t.batch_size * t.grad_accum
    return [
        (n % G == 0, "train.batch_size",
         f"batch_size × grad_accum = {n} completions is not a multiple of num_generations = {G}"),
        (mu == 1 or t.save_every % mu == 0, "train.save_every",
         f"with num_iterations = {mu} a checkpoint must fall at the end of a generation batch (a multiple of {mu})"),
    ]


def ppo_checks(run) -> list[tuple[bool, str, str]]:
    c, lora, r = run.ppo, run.lora, run.rollout
    return [
        (c.reward_model is not None, "ppo.reward_model", "is required: a jaxft reward run directory or a "
                                                         "*ForSequenceClassification model"),
        (lora.enabled and not lora.modules_to_save, "lora.enabled",
         "PPO trains a LoRA policy: its reference is the adapter switched off (no modules_to_save)"),
        (lora.dropout == 0, "lora.dropout", "must be 0 for ppo (TRL disables dropout: the first ratio must be 1)"),
        (run.train.batch_size * run.train.grad_accum * c.num_mini_batches >= 2, "train.batch_size",
         "a rollout batch (batch_size * grad_accum * num_mini_batches) needs >= 2 rows to whiten advantages"),
        (r.num_generations is None, "rollout.num_generations", "ppo samples one response per prompt (leave null)"),
        (r.reward_funcs == RolloutConfig.reward_funcs and r.reward_weights is None, "rollout.reward_funcs",
         "ppo scores with ppo.reward_model (token level, TRL's); reward functions are for grpo / rloo"),
        (not r.mask_truncated_completions, "rollout.mask_truncated_completions",
         "not a PPO option; use ppo.missing_eos_penalty"),
    ]


# objective name → its cross-section checks: the objectives a run can name (jaxft.objectives.OBJECTIVES has
# the same keys)
CHECKS = {"sft": sft_checks, "dpo": dpo_checks, "reward": reward_checks, "grpo": group_checks, "rloo": group_checks,
          "ppo": ppo_checks}


def rl_ranges(run) -> list[tuple[bool, str, str]]:
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
           f"{show(f)} is not a built-in (json_fields, json_valid, exact_match, length_penalty, regex:PATTERN, "
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
