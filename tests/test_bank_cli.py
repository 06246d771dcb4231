"""--adapter NAME=DIR on generate / chat / eval: mixed-adapter batches answer as each adapter alone."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from jaxft.config import load_config
from jaxft.data.task import make_examples
from tiny import run_cli


@pytest.fixture(scope="module")
def adapters(chat_model, tmp_path_factory):
    """Two PEFT adapters over the chat model with large random B (they change the answers)."""
    d = tmp_path_factory.mktemp("cli_adapters")
    for i, (name, r) in enumerate((("a", 4), ("b", 8))):
        torch.manual_seed(i)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_model),
                            PeftLoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(2.0 * torch.randn_like(p))
        pm.save_pretrained(d / name)
    return d


def test_eval_scores_base_and_adapters_side_by_side_as_each_alone(chat_model, adapters, tmp_path):
    from jaxft.commands.evaluate import compare
    from jaxft.commands.evaluate import evaluate

    val = tmp_path / "validation.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in make_examples(5, seed=4)))
    common = [f"model.path={chat_model}", f"data.validation={val}", "eval.max_examples=5", "eval.max_new_tokens=6",
              "eval.batch_size=4", "data.max_length=256", "train.batch_size=2"]
    run = load_config(None, [*common, f"train.out_dir={tmp_path / 'cmp'}"])
    got = compare(run, [f"a={adapters / 'a'}", f"b={adapters / 'b'}"], progress=False)
    assert list(got) == ["base", "a", "b"] and (tmp_path / "cmp" / "eval" / "compare.png").is_file()
    preds = [json.loads(line) for line in (tmp_path / "cmp" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and {"base", "a", "b"} <= set(preds[0])
    # each column equals the model run with that adapter alone (jaxft's one-adapter path, lora.init_adapter)
    for name in ("base", "b"):  # (a: the same path as b)
        extra = [] if name == "base" else [f"lora.init_adapter={adapters / name}", "lora.r=8", "lora.alpha=16"]
        alone = load_config(None, [*common, *extra, f"train.out_dir={tmp_path / name}"])
        ref = evaluate(alone, base_only=True, progress=False)["base"]
        ref_preds = [json.loads(line)["base"]
                     for line in (tmp_path / name / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert [p[name] for p in preds] == ref_preds, name
        assert got[name]["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert len({tuple(p[k] for p in preds) for k in ("base", "a", "b")}) == 3  # the adapters really differ


def test_generate_cli_with_adapters_and_bad_names(chat_model, adapters):
    r = run_cli("generate", chat_model, "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}",
                "--prompt", "hi", "--prompt", "2+2?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- [") == 4 and "(a)" in r.stdout and "(b)" in r.stdout
    r = run_cli("generate", chat_model, "--adapter", f"a={adapters / 'a'}", "--prompt", "hi", "--use", "zzz")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("jaxft: error: --use: unknown adapter 'zzz'")
