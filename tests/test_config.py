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


# ---------------------------------------------------------------- what plain YAML accepts but a user did not mean


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 5\n  batch_size: 2\n  steps: 50\n", "line 4: train.steps: given twice (first on line 2)"),
    ("train: {steps: 5}\ntrain: {steps: 6}\n", "line 2: train: given twice (first on line 1)"),
    ("base: &b {steps: 5}\ntrain:\n  <<: *b\n  steps: 6\n", "line 3: train.<<: merge keys are not read"),
    ("train:\n\tsteps: 5\n", "line 2, column 1: a tab character"),
    ("train:\n  steps:\t5\n", "a tab character"),
    ("train: {steps: 5}\n---\ntrain: {steps: 6}\n", "line 2, column 1: a second YAML document"),
    ("- train\n- lora\n", "expected a mapping of sections"),
    ("a: &a [*a, *a]\n", "more than 100000 values once aliases are expanded"),
    ("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\nl1: &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]\n"
     "l2: &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1]\nl3: &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2]\n"
     "l4: [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3]\n", "more than 100000 values"),  # "billion laughs"
    ("train:\n  steps: !!int five\n", "line 2: 'five' is not an integer"),
])
def test_strict_yaml_refusals_name_file_line_and_key(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(JaxftError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_yaml_scalars_are_read_as_each_key_means_them(tmp_path):
    """YAML 1.2 scalars, then the key's type: a string key keeps `No` / `1.10` as written (YAML 1.1 made them
    False and 1.1), a bool key takes yes / no / on / off, a number key `1e-3` (a string to PyYAML), `010` is
    ten (not YAML 1.1's octal 8), and `12:30` is not 750."""
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  system_prompt: No\n  packing: off\n  train_on_prompt: yes\n  seed: 010\n"
                 "model:\n  path: 1.10\noptim:\n  lr: 1e-3\n  eps: 1E-8\n  clip_norm: null\n"
                 "train:\n  out_dir: 12:30\n  steps: 0x10\n")
    run = load_config(f)
    assert run.data.system_prompt == "No" and run.model.path == "1.10" and run.train.out_dir == "12:30"
    assert run.data.packing is False and run.data.train_on_prompt is True
    assert run.optim.lr == 1e-3 and run.optim.eps == 1e-8 and run.optim.clip_norm is None
    assert run.data.seed == 10 and run.train.steps == 16
    assert load_config(None, ["data.system_prompt=no", "data.packing=on"]).data.system_prompt == "no"


def test_override_into_a_list_of_sections(tmp_path):
    f = tmp_path / "multi.yaml"
    f.write_text("adapters:\n  - {name: a, train: a.jsonl}\n  - {name: b, train: b.jsonl}\n")
    run = load_config(f, ["adapters.1.lr=1e-4", "adapters[0].r=12"])
    assert run.adapters[1].lr == 1e-4 and run.adapters[0].r == 12 and run.adapters[0].lr is None
    for override, message in (("adapters.2.lr=1", "adapters.2.lr: adapters is a list of 2; '2' is not one of its "
                                                   "indices (0 to 1)"),
                              ("adapters.x.lr=1", "'x' is not one of its indices"),
                              ("adapters.lr=1", "adapters is a list; set one of its items' keys")):
        with pytest.raises(JaxftError) as e:
            load_config(f, [override])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_constitution_keys_given_twice_are_refused(tmp_path):
    from jaxft.data.constitution import load_constitution

    y = tmp_path / "c.yaml"
    y.write_text("principles:\n  - name: a\n    compare: Which is kinder?\n    compare: Which is shorter?\n")
    with pytest.raises(JaxftError, match=r"c\.yaml: line 4: principles\[0\]\.compare: given twice"):
        load_constitution(y)
    j = tmp_path / "c.json"
    j.write_text('{"principles": [{"name": "a", "compare": "x"}], "principles": []}')
    with pytest.raises(JaxftError, match=r"c\.json: not valid JSON \(key 'principles' given twice"):
        load_constitution(j)
