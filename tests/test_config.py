"""Run config: YAML + overrides, types, and one-line errors naming the key."""

import pytest

from jaxft.config import RunConfig, load_config
from jaxft.errors import JaxftError


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\nlora:\n  target_modules: [q_proj]\n")
    run = load_config(f, ["train.steps=7", "optim.lr=3e-4", "optim.clip_norm=null", "lora.target_modules=q_proj,v_proj",
                          "data.packing=false"])
    assert run.train.steps == 7 and run.optim.lr == 3e-4 and run.optim.clip_norm is None
    assert run.lora.target_modules == ("q_proj", "v_proj") and run.data.packing is False
    assert load_config(None, []) == RunConfig()
    assert RunConfig().to_dict()["lora"]["target_modules"] == ["all-linear"]


@pytest.mark.parametrize("override, message", [
    ("train.stepz=1", "train.stepz: unknown key"),
    ("nosection.x=1", "nosection: unknown key"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("train.steps=true", "train.steps: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.packing=maybe", "data.packing: expected true or false"),
    ("model.dtype=fp16", "model.dtype: 'fp16' is not one of 'fp32', 'bf16'"),
    ("lora.r=0", "lora.r: must be >= 1"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1)"),
    ("lora.target_modules=qkv", "lora.target_modules: 'qkv' is not one of"),
    ("lora.modules_to_save=norm", "lora.modules_to_save: 'norm' is not embed_tokens or lm_head"),
    ("train.steps=0", "train.steps: must be >= 1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1]"),
    ("train", "override 'train': expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(JaxftError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(JaxftError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(JaxftError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("train:\n  steps: -3\n")
    with pytest.raises(JaxftError, match="bad.yaml: train.steps: must be >= 1"):
        load_config(bad)
