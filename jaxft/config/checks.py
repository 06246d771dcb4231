"""Validation: every impossible value a one-line JaxftError naming its key, before any model loads.

    validate(run)          # ranges, cross-section rules, the objective's own checks (config/objectives.py)
    check_files(run)       # ... and the files the run reads exist and are not empty

Plain Python: functions of config values, no model, no I/O but `check_files`'s checks of the files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from jaxft.config.objectives import CHECKS, rl_ranges
from jaxft.config.run import RunConfig
from jaxft.config.sections import show
from jaxft.errors import JaxftError
from jaxft.models.names import PROJECTIONS

INT_RANGE = (-2**31, 2**31 - 1)  # every integer key: counts, sizes and seeds all fit int32 (JAX's default)
# vLLM's --max-lora-rank values: the ranks vLLM serves, and the buckets an adapter bank pads its ranks to
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def rank_bucket(r: int) -> int:
    """The rank bucket of rank r: the smallest vLLM --max-lora-rank value >= r."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def check_number(value: Any, key: str) -> None:
    """Every float finite and every integer within INT_RANGE, for every key (new ones included): NaN
    passes any check written as `not x < lo`, inf passes `> 0`, a 30-digit count passes `>= 1` and then
    overflows an int32 on the device."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise JaxftError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, int) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise JaxftError(f"{key}: {show(value)} is out of range (an integer in [-2**31, 2**31 - 1])")


def check_numbers(cfg: Any, prefix: str = "") -> None:
    """_check_number on every number of a (nested) config dataclass built in code, not by load_config."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                check_numbers(v, f"{prefix}{f.name}[{i}].")
        else:
            check_number(value, f"{prefix}{f.name}")


def init_ok(init: str) -> bool:
    if init in ("kaiming", "gaussian", "pissa", "olora"):
        return True
    k = init.removeprefix("pissa_niter_")
    return init.startswith("pissa_niter_") and k.isdigit() and int(k) >= 1


def override_ok(o: str) -> bool:
    key = o.split("=", 1)[0]
    return "=" in o and "." in key and all(part.isidentifier() for part in key.split("."))


def validate(run: RunConfig) -> None:
    """Impossible values, each a one-line error naming the key."""
    check_numbers(run)
    checks = [
        (run.lora.r >= 1, "lora.r", "must be >= 1"),
        (run.lora.alpha > 0, "lora.alpha", "must be > 0"),
        (0 <= run.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (bool(run.lora.target_modules) or not run.lora.enabled, "lora.target_modules", "is empty"),
        (init_ok(run.lora.init), "lora.init",
         f"{show(run.lora.init)} is not kaiming, gaussian, pissa, pissa_niter_K (K >= 1) or olora"),
        (not (run.lora.use_dora and run.lora.init not in ("kaiming", "gaussian")), "lora.use_dora",
         f"DoRA with lora.init={run.lora.init} is not supported; use lora.init=kaiming or gaussian"),
        (run.lora.method == "lora" or not (run.lora.use_dora or run.lora.init != "kaiming"), "lora.method",
         "ia3 has no low-rank factors: lora.use_dora and lora.init apply to method lora only"),
        (run.lora.method == "ia3" or run.lora.feedforward_modules is None, "lora.feedforward_modules",
         "applies to lora.method=ia3 only"),
        (run.data.max_length >= 8, "data.max_length", "must be >= 8"),
        (0 <= run.data.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)"),
        (run.data.seed >= 0, "data.seed", "must be >= 0"),
        (run.data.stream_window >= 1, "data.stream_window", "must be >= 1"),
        (not run.data.streaming or run.objective == "sft", "data.streaming",
         f"objective {run.objective} reads its data into memory; streaming is supported for objective sft only"),
        (not run.data.streaming or run.data.validation_fraction == 0, "data.streaming",
         "cannot split data.validation_fraction off a stream; set data.validation to a file instead"),
        (not run.data.streaming or not run.adapters, "data.streaming",
         "multi-adapter runs do not stream; set it false"),
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
        (run.eval.few_shot >= 0, "eval.few_shot", "must be >= 0 (0 = no K-shot column)"),
        (run.eval.few_shot_seed >= 0, "eval.few_shot_seed", "must be >= 0"),
        (run.eval.regression_prompts >= 0, "eval.regression_prompts", "must be >= 0 (0 = all)"),
        (1 <= run.eval.regression_new_tokens <= 4096, "eval.regression_new_tokens", "must be in [1, 4096]"),
        (run.eval.max_kl is None or run.eval.max_kl >= 0, "eval.max_kl", "must be >= 0 or null"),
        (run.eval.max_ce_increase is None or run.eval.max_ce_increase >= 0, "eval.max_ce_increase",
         "must be >= 0 or null"),
        (run.dpo.beta > 0, "dpo.beta", "must be > 0"),
        (0 <= run.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)"),
        (run.dpo.simpo_gamma >= 0, "dpo.simpo_gamma", "must be >= 0"),
        (run.dpo.orpo_lambda >= 0, "dpo.orpo_lambda", "must be >= 0"),
        (run.reward.center_rewards_coefficient is None or run.reward.center_rewards_coefficient >= 0,
         "reward.center_rewards_coefficient", "must be >= 0 or null"),  # a range whatever the objective
        (run.dpo.max_prompt_length is None or run.dpo.max_prompt_length >= 1, "dpo.max_prompt_length",
         "must be >= 1 or null"),
        *rl_ranges(run),
        (run.cai.max_prompts >= 0, "cai.max_prompts", "must be >= 0 (0 = all)"),
        *[(override_ok(o), f"cai.{k}", f"{show(o)} is not a section.key=value override")
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
    linears = (*PROJECTIONS, "all-linear")
    checks += [(m in linears, "lora.target_modules", f"{show(m)} is not one of {', '.join(linears)}")
               for m in run.lora.target_modules]
    checks += [(m in linears[:-1] and m in (run.lora.target_modules if "all-linear" not in run.lora.target_modules
                                             else linears), "lora.feedforward_modules",
                f"{show(m)} is not one of lora.target_modules (PEFT: a subset of target_modules)")
               for m in run.lora.feedforward_modules or ()]
    checks += [(m in ("embed_tokens", "lm_head"), "lora.modules_to_save", f"{show(m)} is not embed_tokens or lm_head")
               for m in run.lora.modules_to_save]
    checks += [(m in linears[:-1], "quant.skip_modules", f"{show(m)} is not one of {', '.join(linears[:-1])}")
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
                  f"{show(a.name)}: give each adapter a name (no '/', '=', ',' or space)"),
                 (names.index(a.name) == i, f"{k}.name", f"{a.name!r} is used twice"),
                 (bool(a.train), f"{k}.train", "no training file given"),
                 (a.r is None or a.r >= 1, f"{k}.r", "must be >= 1"),
                 (a.alpha is None or a.alpha > 0, f"{k}.alpha", "must be > 0"),
                 (a.lr is None or a.lr > 0, f"{k}.lr", "must be > 0"),
                 (a.seed is None or a.seed >= 0, f"{k}.seed", "must be >= 0"),
                 *[(m in (*PROJECTIONS, "all-linear"), f"{k}.target_modules", f"{show(m)} is not one of "
                    f"{', '.join(PROJECTIONS)}, all-linear") for m in a.target_modules or ()],
                 (rank_bucket(r) == rank_bucket(r0), f"{k}.r", f"r={r} is outside the rank bucket {rank_bucket(r0)} of adapters[0] "
                  f"(r={r0}); one bank pads to its largest rank, so ranks share one of {VLLM_RANKS}")]
    return rows


def check_files(run: RunConfig, training: bool = True) -> None:
    """The config is valid and the data files a run needs exist — checked before the (slow) model load.

    validate() again: a RunConfig built in code (not by load_config) is checked here too."""
    validate(run)
    needed = [("data.validation", run.data.validation), ("eval.file", run.eval.file),
              ("eval.regression_file", run.eval.regression_file), ("eval.regression_text", run.eval.regression_text)]
    needed += [(f"adapters[{i}].{k}", getattr(a, k)) for i, a in enumerate(run.adapters) for k in ("train", "validation")]
    if training and run.adapters:
        pass  # each adapter names its own training file (checked above)
    elif training:
        needed.insert(0, ("data.train", run.data.train or None))
        if not run.data.train:
            raise JaxftError("data.train: no training file given")
    for key, path in needed:
        if path and not Path(path).expanduser().exists():
            raise JaxftError(f"{key}: {path}: no such file or directory")
        if path and no_rows(Path(path).expanduser()):
            hint = ("; `jaxft prepare` writes an empty validation.jsonl when it holds out nothing: rerun it with "
                    "--validation-fraction, or leave this key unset" if key.endswith("validation") else "")
            raise JaxftError(f"{key}: {path}: the file has no rows{hint}")


EMPTY_READ = 1 << 16  # a text data file longer than this has rows (or bad rows the data reader reports)


def no_rows(p: Path) -> bool:
    """Whether a text data file (.jsonl, .ndjson, .json, .csv) plainly holds no rows: nothing but whitespace
    and byte-order marks, a JSON `[]`, or a CSV header alone. What `jaxft.data.rows` would read as zero rows,
    told here without it (config imports no data code) and before the model loads."""
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv") or not p.is_file() or p.stat().st_size > EMPTY_READ:
        return False
    with open(p, "rb") as f:
        text = f.read(EMPTY_READ).replace(b"\x00", b"")  # UTF-16 / UTF-32 ASCII → its bytes
    text = text.replace(b"\xef\xbb\xbf", b"").removeprefix(b"\xff\xfe").removeprefix(b"\xfe\xff").strip()
    if suffix == ".json" and re.fullmatch(rb"\[\s*\]", text):
        return True
    if suffix == ".csv":
        return len([line for line in text.splitlines() if line.strip()]) <= 1
    return not text
