"""The quickstart's last step: its exported PEFT adapter, loaded in PyTorch, gives the tuned model's answers.

    python scripts/check_peft_export.py runs/quickstart

Loads `<run>/adapter` the standard way, `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`: PEFT reads the
base from the adapter's `base_model_name_or_path` (for a GGUF base such as the example, the dequantized Hugging Face
directory `jaxft export` wrote once into the jaxft cache), answers the held-out prompts greedily and compares them
with the tuned answers jaxft wrote to `<run>/eval/predictions.jsonl`. Exits 1 when any answer differs.
"""

import json
import logging
import os
import sys
import warnings
from pathlib import Path

# Everything this check loads is local. Offline, too, because transformers (>= 5.25) installs `kernels`,
# with which bitsandbytes, imported by peft, fetches a fused 4-bit matmul from the Hugging Face Hub at
# import on CPUs with AVX512-BF16: a download at run time, for a kernel nothing here uses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Third-party notices that say nothing about this check (PEFT in fp32 on CPU), silenced by their exact
# text so that every other warning (about this model or adapter) still prints:
# - bitsandbytes logs, on CPUs with AVX512-BF16, that its kernel could not be loaded (kernels missing or
#   offline) and kernels logs, offline, that it skips the kernel repository's publisher check; nothing
#   here is quantized;
# - peft reads transformers' `is_gradient_checkpointing`, which transformers deprecates (FutureWarning).
BNB_KERNEL = "kernels-community/quantization-bitsandbytes"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not ("publisher trust" in record.getMessage() and BNB_KERNEL in record.getMessage()))
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# ruff: noqa: E402 — the imports below come after the filters: bitsandbytes logs its notice at import
import torch
from peft import AutoPeftModelForCausalLM

from jaxft.config import load_config
from jaxft.data.prompts import heldout
from jaxft.generate import chat_prompt, eos_token_ids
from jaxft.formats.hf import load_tokenizer
from jaxft.setup import resolve_model as resolve_model_path


def main(run_dir: str, batch: int = 16) -> int:
    run_dir = Path(run_dir)
    run = load_config(run_dir / "config.json")
    path = resolve_model_path(run.model.path)
    tok = load_tokenizer(path)
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter", dtype=torch.float32).eval()
    items = heldout(run.eval.file or run.data.validation, run.data.format, run.eval.max_examples)
    expected = [json.loads(l)["tuned"] for l in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    eos = sorted(eos_token_ids(tok, path))
    answers = []
    for i in range(0, len(items), batch):
        ids = [chat_prompt(tok, m) for m, _ in items[i:i + batch]]
        P = max(map(len, ids))
        inp = torch.full((len(ids), P), tok.pad_token_id or 0)
        mask = torch.zeros_like(inp)
        for j, p in enumerate(ids):
            inp[j, P - len(p):], mask[j, P - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=run.eval.max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
        answers += [tok.decode(o[P:], skip_special_tokens=True).strip() for o in out]
    same = sum(a == e for a, e in zip(answers, expected))
    print(f"PEFT (PyTorch) reproduces {same}/{len(expected)} of jaxft's tuned answers on the held-out prompts")
    for a, e in zip(answers, expected):
        if a != e:
            print(f"  differs: peft={a!r} jaxft={e!r}")
    return 0 if same == len(expected) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
