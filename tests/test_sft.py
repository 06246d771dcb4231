"""SFT end to end on a tiny model with a real tokenizer: packing, resume after SIGKILL, damaged
checkpoints, NaN stops, and a smoke run of every config in configs/."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft.config import DataConfig, load_config
from jaxft.data.encode import Batches, load_examples
from jaxft.losses import token_logprobs
from jaxft.data.task import make_examples
from tiny import ROOT, example_tokenizer, run_cli, save_chat_model




@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    rows = make_examples(48, seed=3)
    for name, part in (("train.jsonl", rows[:40]), ("validation.jsonl", rows[40:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


def _overrides(chat_model, task_data, out, **extra):
    o = {"model.path": chat_model, "data.train": task_data / "train.jsonl",
         "data.validation": task_data / "validation.jsonl", "data.max_length": 256, "train.batch_size": 2,
         "train.out_dir": out, "lora.r": 4, "lora.alpha": 8, "eval.max_new_tokens": 8, "eval.max_examples": 4}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_packed_equals_unpacked_per_document(chat_model, task_data):
    tok = example_tokenizer()
    examples, _ = load_examples(DataConfig(train=str(task_data / "train.jsonl"), max_length=256), tok)
    examples = examples[:6]
    model = load_pretrained(chat_model)

    def per_doc(batch):
        h, _ = model.hidden(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                            jnp.asarray(batch["segment_ids"]))
        lp = np.asarray(token_logprobs(model, h, jnp.asarray(batch["targets"]))) * batch["loss_mask"]
        docs = []
        for b in range(lp.shape[0]):
            for s in sorted(set(batch["segment_ids"][b]) - {0}):
                docs.append((round(float(batch["loss_mask"][b][batch["segment_ids"][b] == s].sum())),
                             float(lp[b][batch["segment_ids"][b] == s].sum())))
        return sorted(docs)

    packed = Batches(examples, batch_size=6, seq_len=512, packing=True, seed=0).batch(0)
    unpacked = Batches(examples, batch_size=6, seq_len=512, packing=False, seed=0).batch(0)
    assert (packed["segment_ids"].max(axis=1) > 1).any()  # something really was packed
    a, b = per_doc(packed), per_doc(unpacked)
    assert len(a) == len(b) == 6
    for (na, la), (nb, lb) in zip(a, b):
        assert na == nb
        assert abs(la - lb) < 1e-3 * max(1.0, abs(lb))


def _train_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_and_resume_reproduces_losses(chat_model, task_data, tmp_path):
    cfg = str(ROOT / "configs" / "sft_lora.yaml")
    common = dict(**{"train.steps": 8, "train.save_every": 2, "lora.dropout": 0.1})
    ref = _train_cli([cfg, *_overrides(chat_model, task_data, tmp_path / "ref", **common)])
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    expected = _losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))

    run = tmp_path / "killed"
    p = _train_cli([cfg, *_overrides(chat_model, task_data, run, **common)])
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it once it has logged step 5 (checkpoints at 2 and 4)
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 5:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = _train_cli([cfg, *_overrides(chat_model, task_data, run, **common), "--resume"])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "resumed from" in err
    got = _losses(run)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-exact on CPU


def test_damaged_checkpoint_falls_back(chat_model, task_data, tmp_path):
    cfg = str(ROOT / "configs" / "sft_lora.yaml")
    o = _overrides(chat_model, task_data, tmp_path / "run", **{"train.steps": 4, "train.save_every": 2})
    r = _train_cli([cfg, *o])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    latest = tmp_path / "run" / "checkpoints" / "4"
    files = [f for f in (latest / "state").rglob("*") if f.is_file() and f.stat().st_size > 0]
    for f in files:  # damage every data file of the newest checkpoint
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _train_cli([cfg, *o, "train.steps=6", "--resume"])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "checkpoints/4 is damaged" in err and "resumed from" in err and "(step 2)" in err
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 7))


def test_nan_weights_stop_the_run_without_checkpoint(tmp_path, task_data):
    d = tmp_path / "nan_model"
    save_chat_model(d)
    from safetensors.torch import load_file, save_file

    w = load_file(d / "model.safetensors")
    w["model.norm.weight"][:] = float("nan")
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    r = _train_cli([str(ROOT / "configs" / "sft_lora.yaml"),
                    *_overrides(d, task_data, tmp_path / "run", **{"train.steps": 10, "train.max_bad_steps": 3})])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 2
    assert "NaN/Inf for 3 steps in a row" in err and "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                           if not {f"objective: {o}" for o in ("dpo", "reward", "grpo", "rloo", "ppo")}
                                           & set(p.read_text().splitlines())))
def test_every_config_runs(config, chat_model, task_data, tmp_path):
    """Each shipped SFT config, pointed at the tiny model, trains 2 steps and evaluates (DPO and reward configs
    need preference pairs: tests/test_dpo.py and tests/test_reward.py run them; the RL configs need prompts and
    rewards: tests/test_grpo.py and tests/test_ppo.py run them)."""
    from jaxft.commands.evaluate import evaluate
    from jaxft.commands.train import train

    run = load_config(ROOT / "configs" / config,
                      _overrides(chat_model, task_data, tmp_path / "run", **{"train.steps": 2, "train.eval_every": 1,
                                                                             "eval.file": task_data / "validation.jsonl"}))
    last = train(run, progress=False)
    assert np.isfinite(last["loss"]) and "eval_loss" in last
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    res = evaluate(run, progress=False)
    assert set(res) == {"base", "tuned"} and "eval_loss" in res["tuned"]
    # one definition of eval_loss: `jaxft eval` of the final checkpoint measures what training logged last
    assert res["tuned"]["eval_tokens"] == last["eval_tokens"]
    assert res["tuned"]["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6, abs=0)


def test_config_errors_before_loading(tmp_path):

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    r = run_cli("train", bad, timeout=120)
    assert r.returncode == 2 and "train.stepz: unknown key" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", ROOT / "configs" / "sft_lora.yaml", "optim.lr=-1", timeout=120)
    assert r.returncode == 2 and "optim.lr: must be > 0" in r.stderr
    for override, msg in (("lora.target_modules=[qkv]", "lora.target_modules: 'qkv' is not one of"),
                          ("data.train=/nonexistent.jsonl", "data.train: /nonexistent.jsonl: no such file")):
        r = run_cli("train", ROOT / "configs" / "sft_lora.yaml", override, "model.path=/nonexistent-model",
                    timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_export_a_run_as_peft_and_merged(chat_model, task_data, tmp_path):
    """`jaxft export` of a trained run: PEFT and transformers reproduce the tuned model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxft.checkpoint import restore_trainable
    from jaxft.setup import build as build_model
    from jaxft.commands.train import train

    run = load_config(ROOT / "configs" / "sft_lora.yaml",
                      _overrides(chat_model, task_data, tmp_path / "run", **{"train.steps": 3, "optim.lr": 1e-2,
                                                                             "lora.r": 8}))
    train(run, progress=False)
    for fmt in ("peft", "merged"):
        r = run_cli("export", tmp_path / "run", "--format", fmt, "--out", tmp_path / fmt, "--dtype", "fp32")
        assert r.returncode == 0, r.stderr
    r = run_cli("export", tmp_path / "run", "--out", tmp_path / "peft", "--strict")
    assert r.returncode == 2 and "vLLM: rank r=8" not in r.stderr and "already exists" in r.stderr
    setup = build_model(run)
    params, _ = restore_trainable(tmp_path / "run", setup.params)
    tuned = nnx.merge(setup.graphdef, params, setup.frozen)
    toks = np.random.RandomState(0).randint(0, 49152, (1, 24))
    ours = np.asarray(tuned(jnp.asarray(toks))[0])
    base = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(torch.tensor(toks)).logits.numpy()
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(torch.tensor(toks)).logits.numpy()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        merged_logits = merged(torch.tensor(toks)).logits.numpy()
    assert np.abs(ours - base_logits).max() > 1e-3  # training moved the model
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_logits, ours, atol=1e-4, rtol=0)
    # lora.init_adapter: a new run starts from the exported adapter
    run2 = load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(
        chat_model, task_data, tmp_path / "run2", **{"lora.r": 8, "lora.init_adapter": tmp_path / "peft"}))
    s2 = build_model(run2)
    np.testing.assert_allclose(np.asarray(nnx.merge(s2.graphdef, s2.params, s2.frozen)(jnp.asarray(toks))[0]), ours,
                               atol=1e-5, rtol=0)
    with pytest.raises(jaxft.JaxftError, match="has r=8, alpha=8.0"):
        build_model(load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(
            chat_model, task_data, tmp_path / "run3", **{"lora.r": 4, "lora.init_adapter": tmp_path / "peft"})))
