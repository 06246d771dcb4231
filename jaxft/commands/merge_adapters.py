"""`jaxft merge-adapters A B ... --weights w_a w_b ... --method M --out DIR`: LoRA adapters (PEFT directories or
jaxft runs) merged into one PEFT adapter, as PEFT's `add_weighted_adapter` (the maths: jaxft.formats.peft_merge).

    merge_adapters(["runs/a", "peft/b"], [1.0, -0.5], "ties", "merged/", density=0.5)

On a mesh (`--mesh`, across processes too) only the reading of a jaxft run changes: its base model loads
straight into its shards (the adapter is read from the run's model, so a base larger than one device still
works) and the adapter is gathered to the host. The merge itself stays PEFT's maths in numpy on process 0,
which writes: the inputs are adapters (r × d per module), and even an svd merge's largest operand, one
module's ΔW [out, in], is a host-sized matrix that sharding would only add collectives to.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from jaxft.commands.export import check_format
from jaxft.config import MeshConfig, read_config
from jaxft.distributed import init_distributed, is_primary
from jaxft.errors import JaxftError
from jaxft.formats.peft import (adapter_config, adapter_tensors, gather_adapters, serving_base, vllm_problems,
                                write_adapter)
from jaxft.formats.peft_merge import PeftAdapter, combine, read_peft
from jaxft.runs import load_run
from jaxft.sharding import make_mesh


def read(path, mesh: MeshConfig = MeshConfig()) -> PeftAdapter:
    """A PEFT adapter directory, or a jaxft run directory (its newest checkpoint's adapter, as `jaxft export
    --format peft` writes it, after the same refusals; its model built on `mesh`, not on the mesh it trained on).
    With several processes, every one reads every input in the same order (a run's adapter is gathered)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return read_peft(p)
    if (p / "config.json").is_file():
        run = read_config(p)
        check_format(run, "peft")
        if run.adapters:
            raise JaxftError(f"{p}: a multi-adapter run holds {len(run.adapters)} adapters; export them (jaxft export "
                             f"{p} --format peft --out DIR) and merge the folders DIR/<name> you mean")
        done = load_run(dataclasses.replace(run, mesh=mesh), mesh=make_mesh(mesh))
        model = done.model()
        if getattr(model, "value_head", None) is not None:  # PPO's policy: the causal LM's adapter alone
            model.value_head = None
        gather_adapters(model)
        if not is_primary():  # process 0 merges and writes (and writes a GGUF base's HF directory, once)
            return PeftAdapter({}, {}, str(p))
        base = serving_base(done.setup.model_path, run.model.dtype, say=lambda m: print(m, file=sys.stderr))
        config = adapter_config(model, done.run.lora, str(base))
        config = json.loads(json.dumps(config))  # as read back from adapter_config.json
        tensors = {k: np.asarray(v, np.float32) for k, v in adapter_tensors(model).items()}
        return PeftAdapter(config, tensors, str(p))
    raise JaxftError(f"{p}: neither a PEFT adapter directory (adapter_config.json) nor a jaxft run directory "
                     "(config.json)")


def merge_adapters(inputs, weights, method: str, out, *, density: float | None = None, sign_method: str = "total",
                   svd_rank: int | None = None, seed: int = 0, overwrite: bool = False, strict: bool = False,
                   mesh: MeshConfig = MeshConfig()) -> Path:
    """`jaxft merge-adapters`: read every input, merge as PEFT's add_weighted_adapter, write a PEFT adapter
    directory atomically (vLLM's rules checked as `jaxft export` does); returns its path. mesh: where a jaxft
    run's model loads (with mesh.distributed, every process runs this; process 0 merges and writes)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    if not inputs:
        raise JaxftError("merge-adapters: no adapter given")
    init_distributed(mesh)
    ads = [read(p, mesh) for p in inputs]
    if not is_primary():
        return out
    config, tensors = combine(ads, list(weights), method, density=density, sign_method=sign_method,
                              svd_rank=svd_rank, seed=seed)
    problems = vllm_problems(config, tensors)
    for p in problems:
        print(f"jaxft: vLLM: {p}", file=sys.stderr)
    if problems and strict:
        raise JaxftError(f"the merged adapter breaks {len(problems)} vLLM rule(s) (see above); nothing written")
    return write_adapter(config, tensors, out, overwrite=overwrite)
