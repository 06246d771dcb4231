"""`jaxft export RUN --format peft | merged | gguf | gguf-lora`: a run's newest checkpoint as what serving
stacks load (transformers / PEFT / vLLM, llama.cpp / Ollama).

    export(run, fmt="gguf", out="model-f16.gguf", gguf_type="f16")

Merged formats (merged, gguf) fold every adapter into its kernel in fp32 first; a QLoRA run merges into
its original full-precision base (re-read from the checkpoint), never into the 4-bit codes.

On a mesh (run.mesh, `--mesh`), across processes too: the model loads straight into its shards, and one
tensor (one layer of a stacked one) at a time is gathered to the host and merged with its adapter on one
device (`jaxft.formats.peft.iter_merged`); process 0 writes, the others run the same gathers beside it. The
files are the one-device export's, byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from jaxft.config import RunConfig
from jaxft.config.objectives import head_of
from jaxft.distributed import is_primary
from jaxft.errors import JaxftError
from jaxft.formats.gguf import GGUFSource, write_gguf, write_gguf_lora
from jaxft.formats.peft import (adapter_config, adapter_tensors, export_adapter, export_bank, export_merged,
                                gather_adapters, iter_merged, serving_base, vllm_problems)
from jaxft.runs import load_run
from jaxft.sharding import command_mesh

FORMATS = ("peft", "merged", "gguf", "gguf-lora")


def hf_config_of(model_path: Path):
    """The transformers config of the base checkpoint (an HF directory or a GGUF file)."""
    if model_path.suffix == ".gguf":
        return GGUFSource(model_path).hf_config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def check_format(run: RunConfig, fmt: str) -> None:
    """The refusals of a format that the config alone decides (checked before the slow model load)."""
    if fmt in ("gguf", "gguf-lora") and head_of(run) == "score":
        raise JaxftError(f"{run.train.out_dir}: a reward model (score head) has no GGUF export; use --format merged")
    if fmt in ("peft", "gguf-lora") and not run.lora.enabled:
        raise JaxftError(f"{run.train.out_dir}: a full fine-tuning run has no adapter; use --format merged or gguf")
    if run.adapters and fmt != "peft":
        raise JaxftError(f"{run.train.out_dir}: a multi-adapter run exports --format peft (one folder per adapter); "
                         "for a merged model, export it, then merge one adapter's folder")


def export(run: RunConfig, fmt: str, out, *, dtype: str = "bf16", gguf_type: str = "f16", strict: bool = False,
           overwrite: bool = False) -> tuple[Path, int]:
    """Write the run's newest checkpoint in `fmt`; returns (path written, step exported)."""
    if fmt not in FORMATS:
        raise JaxftError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if Path(out).exists() and not overwrite:
        raise JaxftError(f"{out}: already exists (pass --overwrite to replace it)")
    check_format(run, fmt)
    merged = fmt in ("merged", "gguf")
    done = load_run(run, mesh=command_mesh(run.mesh), unquantized=merged)
    run, setup = done.run, done.setup
    model = done.model()
    if getattr(model, "value_head", None) is not None:  # PPO's policy: what serves is the causal LM alone
        model.value_head = None
    if not merged:
        gather_adapters(model)
    if not is_primary():  # feed process 0: the same gathers, in the same order, nothing written
        if merged:
            for _ in iter_merged(model, np.float32):
                pass
        return Path(out), done.step
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    # what the adapter names as its base: an HF directory PEFT / vLLM load (a GGUF base's, written once)
    base = str(serving_base(setup.model_path, run.model.dtype, say=say)) if fmt == "peft" else ""
    if fmt == "peft" and run.adapters:  # one folder per adapter + the vLLM command line serving them all
        path = export_bank(model, out, base_model=base, strict=strict, overwrite=overwrite, say=say)
    elif fmt == "peft":
        problems = vllm_problems(adapter_config(model, run.lora), adapter_tensors(model))
        if hasattr(model, "score"):  # a reward model: its head is trained in full (modules_to_save)
            problems.append("a reward model's adapter carries its score head as modules_to_save, which vLLM's "
                            "LoRA loader refuses: serve reward models merged (--format merged)")
        for p in problems:
            print(f"jaxft: vLLM: {p}", file=sys.stderr)
        if problems and strict:
            raise JaxftError(f"the adapter breaks {len(problems)} vLLM rule(s) (see above); nothing written")
        path = export_adapter(model, run.lora, out, base_model=base, overwrite=overwrite)
    elif fmt == "merged":
        path = export_merged(model, setup.tokenizer, hf_config_of(setup.model_path), out, dtype=dtype,
                             overwrite=overwrite)
    elif fmt == "gguf":
        path = write_gguf(iter_merged(model, np.float32), hf_config_of(setup.model_path), setup.tokenizer, out,
                          gguf_type=gguf_type, source=setup.model_path, name=Path(run.train.out_dir).name,
                          overwrite=overwrite)
    else:
        if run.lora.modules_to_save:
            raise JaxftError(f"GGUF LoRA export: lora.modules_to_save={list(run.lora.modules_to_save)}: llama.cpp "
                             f"LoRA GGUFs hold no full-weight modules; use --format gguf (the merged model)")
        path = write_gguf_lora(adapter_tensors(model), adapter_config(model, run.lora),
                               hf_config_of(setup.model_path), out, overwrite=overwrite)
    return path, done.step
