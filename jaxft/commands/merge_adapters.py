"""`jaxft merge-adapters A B ... --weights w_a w_b ... --method M --out DIR`: LoRA adapters (PEFT directories or
jaxft runs) merged into one PEFT adapter, as PEFT's `add_weighted_adapter` (the maths: jaxft.formats.peft_merge).

    merge_adapters(["runs/a", "peft/b"], [1.0, -0.5], "ties", "merged/", density=0.5)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from jaxft.commands.export import check_format
from jaxft.config import read_config
from jaxft.errors import JaxftError
from jaxft.formats.peft import adapter_config, adapter_tensors, serving_base, vllm_problems, write_adapter
from jaxft.formats.peft_merge import PeftAdapter, combine, read_peft
from jaxft.runs import load_run


def read(path) -> PeftAdapter:
    """A PEFT adapter directory, or a jaxft run directory (its newest checkpoint's adapter, as `jaxft export
    --format peft` writes it, after the same refusals)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return read_peft(p)
    if (p / "config.json").is_file():
        run = read_config(p)
        check_format(run, "peft")
        if run.adapters:
            raise JaxftError(f"{p}: a multi-adapter run holds {len(run.adapters)} adapters; export them (jaxft export "
                             f"{p} --format peft --out DIR) and merge the folders DIR/<name> you mean")
        done = load_run(run)
        model = done.model()
        if getattr(model, "value_head", None) is not None:  # PPO's policy: the causal LM's adapter alone
            model.value_head = None
        base = serving_base(done.setup.model_path, run.model.dtype, say=lambda m: print(m, file=sys.stderr))
        config = adapter_config(model, done.run.lora, str(base))
        config = json.loads(json.dumps(config))  # as read back from adapter_config.json
        tensors = {k: np.asarray(v, np.float32) for k, v in adapter_tensors(model).items()}
        return PeftAdapter(config, tensors, str(p))
    raise JaxftError(f"{p}: neither a PEFT adapter directory (adapter_config.json) nor a jaxft run directory "
                     "(config.json)")


def merge_adapters(inputs, weights, method: str, out, *, density: float | None = None, sign_method: str = "total",
                   svd_rank: int | None = None, seed: int = 0, overwrite: bool = False, strict: bool = False) -> Path:
    """`jaxft merge-adapters`: read every input, merge as PEFT's add_weighted_adapter, write a PEFT adapter
    directory atomically (vLLM's rules checked as `jaxft export` does); returns its path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    if not inputs:
        raise JaxftError("merge-adapters: no adapter given")
    ads = [read(p) for p in inputs]
    config, tensors = combine(ads, list(weights), method, density=density, sign_method=sign_method,
                              svd_rank=svd_rank, seed=seed)
    problems = vllm_problems(config, tensors)
    for p in problems:
        print(f"jaxft: vLLM: {p}", file=sys.stderr)
    if problems and strict:
        raise JaxftError(f"the merged adapter breaks {len(problems)} vLLM rule(s) (see above); nothing written")
    return write_adapter(config, tensors, out, overwrite=overwrite)
