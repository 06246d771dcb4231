"""Multi-adapter training (config `adapters:`): one run == N separate runs; per-adapter PEFT export; 8 devices."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.data.task import make_examples
from jaxft.commands.train import train
from jaxft import runs

SPECS = [dict(name="alpha", r=4, alpha=8, lr=1e-2, seed=1, target_modules=["q_proj", "v_proj"]),
         dict(name="beta", r=8, alpha=4, rslora=True, lr=3e-3, seed=2)]
# eps 1e-4: Adam's step m / (sqrt(v) + eps) is then at most lr * |m| / eps, so the float32 reduction noise of
# the two batchings (both adapters in one run vs one) stays at noise level instead of being scaled up to a
# sizeable fraction of a step in an element whose gradient crosses zero (seen: 1.5e-6 with eps 1e-8). A mixed
# up lr, moment or adapter still changes the factors by a share of their size.
COMMON = {"data": {"max_length": 128}, "train": {"steps": 3, "batch_size": 4, "grad_accum": 2, "log_every": 1},
          "lora": {"dropout": 0.0}, "optim": {"warmup_steps": 1, "schedule": "cosine", "weight_decay": 0.01,
                                                "clip_norm": 0.5, "eps": 1e-4}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi_data")
    for i, s in enumerate(SPECS):
        (d / f"{s['name']}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(24, seed=10 + i)))
        (d / f"{s['name']}_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(4, seed=20 + i)))
    return d


def _write(path, chat_model, out, **sections):
    tree = {"model": {"path": str(chat_model)}, "train": {**COMMON["train"], "out_dir": str(out)}}
    for k, v in COMMON.items():
        tree[k] = {**v, **tree.get(k, {})}
    for k, v in sections.items():
        tree[k] = {**tree.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(tree))
    return path


def _joint(chat_model, data, tmp_path, name="joint", validation=False, **mesh):
    adapters = [{**s, "train": str(data / f"{s['name']}.jsonl"),
                 **({"validation": str(data / f"{s['name']}_val.jsonl")} if validation else {})} for s in SPECS]
    cfg = _write(tmp_path / f"{name}.yaml", chat_model, tmp_path / name, adapters=adapters,
                 **({"mesh": mesh} if mesh else {}))
    last = train(load_config(cfg), progress=False)
    return tmp_path / name, last


def _factors(model_dir, run_dir, name=None):
    from jaxft.formats.hf import load_pretrained

    model = load_pretrained(model_dir)
    entries = runs.load_entries(model, [(name or run_dir.name, run_dir)])
    return entries[0]


@pytest.fixture(scope="module")
def joint(chat_model, data, tmp_path_factory):
    """(run directory, last logged row) of the joint run on one device."""
    return _joint(chat_model, data, tmp_path_factory.mktemp("joint"), validation=True)


def test_joint_training_equals_separate_runs_and_exports_to_peft(chat_model, data, joint, tmp_path):
    joint, last = joint
    assert {"loss_alpha", "loss_beta", "eval_loss_alpha", "eval_loss_beta"} <= set(last)
    assert last["eval_loss"] == pytest.approx((last["eval_loss_alpha"] + last["eval_loss_beta"]) / 2)
    for s in SPECS:  # the same adapter trained alone: its own file, r / alpha / lr / seed
        lora = {k: s[k] for k in ("r", "alpha", "rslora", "target_modules") if k in s}
        cfg = _write(tmp_path / f"{s['name']}.yaml", chat_model, tmp_path / s["name"],
                     data={"train": str(data / f"{s['name']}.jsonl")}, lora=lora, optim={"lr": s["lr"]},
                     train={"seed": s["seed"]})
        alone = train(load_config(cfg), progress=False)
        np.testing.assert_allclose(last[f"loss_{s['name']}"], alone["loss"], rtol=1e-6)
        a, b = _factors(chat_model, joint, s["name"]), _factors(chat_model, tmp_path / s["name"])
        assert a.cfg.r == s["r"] and set(a.factors) == set(b.factors)
        for path in a.factors:
            for x, y in zip(a.factors[path], b.factors[path]):
                assert np.abs(y).max() > 0
                np.testing.assert_allclose(x, y, atol=1e-6, rtol=0, err_msg=str(path))

    # export: one PEFT folder per adapter + the vLLM command line; each reproduces the bank's logits in PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxft.formats.hf import load_pretrained
    from jaxft.context import Ctx
    from jaxft.commands.export import export

    run = load_config(joint / "config.json")
    out, step = export(run, "peft", tmp_path / "export")
    assert step == 3 and sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "serve_vllm.sh"]
    cmd = (out / "serve_vllm.sh").read_text()
    assert f"--enable-lora --lora-modules alpha={out.absolute() / 'alpha'} beta={out.absolute() / 'beta'}" in cmd
    assert "--max-loras 2 --max-lora-rank 8" in cmd
    model = load_pretrained(chat_model)
    assert runs.load_bank(model, [str(joint)]) == ("alpha", "beta")
    toks = np.random.RandomState(0).randint(0, 49152, (2, 10))
    for n, s in enumerate(SPECS):
        cfg = json.loads((out / s["name"] / "adapter_config.json").read_text())
        assert cfg["r"] == s["r"] and cfg["use_rslora"] == s.get("rslora", False)
        ours = np.asarray(model(jnp.asarray(toks), ctx=Ctx(adapter_ids=jnp.full((2,), n)))[0])
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model), out / s["name"]).eval()
        with torch.no_grad():
            np.testing.assert_allclose(ours, pm(torch.tensor(toks)).logits.numpy(), atol=1e-4, rtol=0)


def test_joint_training_on_8_devices_equals_one(chat_model, data, joint, tmp_path):
    one, last1 = joint
    eight, last8 = _joint(chat_model, data, tmp_path, "eight", fsdp=8)
    for s in SPECS:
        np.testing.assert_allclose(last8[f"loss_{s['name']}"], last1[f"loss_{s['name']}"], atol=1e-5, rtol=0)
        a, b = _factors(chat_model, eight, s["name"]), _factors(chat_model, one, s["name"])
        for path in a.factors:
            for x, y in zip(a.factors[path], b.factors[path]):
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_bad_multi_adapter_configs_are_one_line_errors(tmp_path):
    base = {"train": "x.jsonl"}
    cases = [([{**base, "name": "a", "r": 4}, {**base, "name": "b", "r": 16}], "adapters\\[1\\].r: r=16 is outside"),
             ([{**base, "name": "a"}, {**base, "name": "a"}], "adapters\\[1\\].name: 'a' is used twice"),
             ([{"name": "a"}], "adapters\\[0\\].train: no training file"),
             ([{**base, "name": "a", "lr": 0}], "adapters\\[0\\].lr: must be > 0"),
             ([{**base, "name": "a", "rank": 4}], "adapters\\[0\\].rank: unknown key")]
    for adapters, msg in cases:
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"adapters": adapters}))
        with pytest.raises(JaxftError, match=msg) as e:
            load_config(p)
        assert "\n" not in str(e.value)
    p.write_text(yaml.safe_dump({"adapters": [{**base, "name": "a"}], "lora": {"use_dora": True}}))
    with pytest.raises(JaxftError, match="adapters: needs plain LoRA"):
        load_config(p)


def test_multi_adapter_cli_errors_are_one_line(tmp_path):
    from tiny import run_cli

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"adapters": [{"name": "a", "train": str(tmp_path / "missing.jsonl")}]}))
    r = run_cli("train", p)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "adapters[0].train" in r.stderr
