"""PEFT adapter export / import, proven in PyTorch: logits with a trained (non-zero) adapter."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.config import LoraConfig
from jaxft.errors import JaxftError
from jaxft.formats.peft import adapter_tensors, export_adapter, load_adapter
from tiny import ARCHS, make_model, save_model


def _random_adapter(model, cfg, seed=1):
    adapters.attach(model, cfg, jax.random.key(seed))
    for i, (_, lin) in enumerate(adapters.targets(model, cfg.target_modules)):
        lin.adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), lin.adapter.b.shape)  # a "trained" B
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_jaxft_adapter_loads_in_peft_with_equal_logits(arch, tmp_path):
    save_model(arch, tmp_path / "base")
    cfg = LoraConfig(r=4, alpha=8, rslora=arch == "qwen3",
                     target_modules=("q_proj", "v_proj", "down_proj") if arch == "gemma" else ("all-linear",))
    model = _random_adapter(load_pretrained(tmp_path / "base"), cfg)
    export_adapter(model, cfg, tmp_path / "adapter")
    toks = np.random.RandomState(0).randint(0, 96, (2, 20))
    ours = np.asarray(model(jnp.asarray(toks))[0])
    base_logits = np.asarray(load_pretrained(tmp_path / "base")(jnp.asarray(toks))[0])
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapter really changes the model
    peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_trained_adapter_imports_and_round_trips(arch, tmp_path):
    """An adapter made and trained a few steps in PyTorch: same logits in jaxft, identical tensors back."""
    save_model(arch, tmp_path / "base")
    torch.manual_seed(0)
    pm = get_peft_model(make_model(arch), PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                                "up_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    toks = torch.tensor(np.random.RandomState(1).randint(0, 96, (2, 16)))
    for _ in range(3):
        loss = pm(toks, labels=toks).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        ref = pm(toks).logits.numpy()
    model = load_pretrained(tmp_path / "base")
    cfg = load_adapter(model, tmp_path / "peft_adapter")
    assert cfg.r == 8 and cfg.alpha == 16
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks.numpy()))[0]), ref, atol=1e-4, rtol=0)
    export_adapter(model, cfg, tmp_path / "back")
    from safetensors.numpy import load_file

    original, back = load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors"), \
        load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(original) == set(back)
    for k in original:
        np.testing.assert_array_equal(original[k], back[k])


def test_export_is_atomic_and_never_overwrites(tmp_path):
    save_model("qwen2", tmp_path / "base")
    cfg = LoraConfig(r=2, alpha=4)
    model = _random_adapter(load_pretrained(tmp_path / "base"), cfg)
    out = export_adapter(model, cfg, tmp_path / "a")
    with pytest.raises(JaxftError, match="already exists"):
        export_adapter(model, cfg, tmp_path / "a")
    export_adapter(model, cfg, tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]  # no temp dirs left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config) == {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                           "fan_in_fan_out", "use_rslora", "use_dora", "modules_to_save", "init_lora_weights",
                           "base_model_name_or_path", "inference_mode", "rank_pattern", "alpha_pattern"}
    assert len(adapter_tensors(model)) == 2 * 7 * 3


def test_import_mismatch_names_the_tensor(tmp_path):
    save_model("llama", tmp_path / "base")
    save_model("llama", tmp_path / "other")
    cfg = LoraConfig(r=2, alpha=4, target_modules=("q_proj",))
    export_adapter(_random_adapter(load_pretrained(tmp_path / "base"), cfg), cfg, tmp_path / "a")
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 10), np.float32)
    save_file(t, f)
    with pytest.raises(JaxftError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight has shape \[2, 10\]"):
        load_adapter(load_pretrained(tmp_path / "other"), tmp_path / "a")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_export_loads_in_transformers_with_equal_logits(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxft.formats.peft import export_merged
    from tiny import example_tokenizer

    save_model(arch, tmp_path / "base")
    cfg = LoraConfig(r=4, alpha=8)
    model = _random_adapter(load_pretrained(tmp_path / "base"), cfg)
    hf_config = AutoConfig.from_pretrained(tmp_path / "base")
    export_merged(model, example_tokenizer(), hf_config, tmp_path / "merged", dtype="fp32", max_shard_bytes=200_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    toks = np.random.RandomState(0).randint(0, 96, (2, 20))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))[0]), ref, atol=1e-4, rtol=0)
    # and jaxft reads its own export back
    again = load_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(toks))[0]), ref, atol=1e-4, rtol=0)


def test_vllm_check_flags_each_rule():
    from jaxft.formats.peft import vllm_problems

    good = {"r": 16, "use_dora": False, "modules_to_save": None, "bias": "none", "target_modules": ["q_proj", "v_proj"]}
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert vllm_problems(good, names) == []
    cases = [({"r": 12}, "not one of the ranks vLLM supports"), ({"r": 64}, "above vLLM's default --max-lora-rank 16"),
             ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
             ({"bias": "all"}, "bias='all'"), ({"target_modules": ["q_proj", "fc_in"]}, "['fc_in'] are not modules")]
    for change, msg in cases:
        problems = vllm_problems({**good, **change}, names)
        assert len(problems) == 1 and msg in problems[0], (change, problems)
    problems = vllm_problems(good, names + ["base_model.model.lm_head.weight"])
    assert len(problems) == 1 and "lm_head.weight is not a .lora_A.weight" in problems[0]


def test_full_finetune_merged_export_is_the_weights(tmp_path):
    """Without LoRA the merged export writes the (trained) weights themselves."""
    from flax import nnx
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxft.formats.peft import export_merged
    from tiny import example_tokenizer

    save_model("gemma2", tmp_path / "base")
    model = load_pretrained(tmp_path / "base")
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 1.01, state)  # stands in for a full fine-tuning update
    model = nnx.merge(graphdef, state)
    export_merged(model, example_tokenizer(), AutoConfig.from_pretrained(tmp_path / "base"), tmp_path / "m",
                  dtype="fp32")
    toks = np.random.RandomState(0).randint(0, 96, (2, 20))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()(
            torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))[0]), ref, atol=1e-4, rtol=0)
