"""Reward models: the loss and metrics against TRL's RewardTrainer.compute_loss, pooled scores against
transformers' *ForSequenceClassification (every family, both paddings, pad == eos), exports loaded by
transformers / PEFT, training, resume after SIGKILL, bad rows, refusals and compile counts."""

import json
import math
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.config import DataConfig, LoraConfig, RewardConfig, load_config
from jaxft.errors import JaxftError
from jaxft.models.heads import ScoreModel
from jaxft.objectives.reward_model import METRICS, PAIRS, make_eval_fn, make_loss, pair_losses
from jaxft.scoring import Scorer
from jaxft.data.pairs import PairBatches, load_pairs
from tiny import ARCHS, ROOT, example_tokenizer, make_config, spread

RC, RR = [1.0, 0.5, -1.0], [0.0, 0.5, 1.0]


# ---------------------------------------------------------------- loss and metrics = TRL


def _trl(rc, rr, margin=None, center=None):
    """TRL 1.16 RewardTrainer.compute_loss on given scores (a fake self: identity gathers, no model)."""
    from trl import RewardTrainer

    logits = torch.tensor(rc + rr, dtype=torch.float64)[:, None]
    me = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), args=types.SimpleNamespace(center_rewards_coefficient=center),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _total_train_tokens=0, _tp_size=1, _metrics={"train": {k: [] for k in METRICS}})
    inputs = {"attention_mask": torch.ones(2 * len(rc), 4)}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin, dtype=torch.float64)
    model = lambda **kw: types.SimpleNamespace(logits=logits)  # noqa: E731
    loss = RewardTrainer.compute_loss(me, model, inputs)
    return float(loss), {k: me._metrics["train"][k][0] for k in METRICS}


def _jaxft(rc, rr, margin=None, center=None):
    """jaxft's reward loss on the same scores: a stand-in model returns them as its pooled scores."""
    B = len(rc)
    r = jnp.asarray(rc + rr, jnp.float32)
    batch = dict(tokens=jnp.zeros((2 * B, 4), jnp.int32), positions=jnp.zeros((2 * B, 4), jnp.int32),
                 segment_ids=jnp.ones((2 * B, 4), jnp.int32), pair_mask=jnp.ones(B))
    if margin is not None:
        batch["margin"] = jnp.asarray(margin, jnp.float32)
    s, c, m = make_loss(RewardConfig(center_rewards_coefficient=center))(lambda *a: r, batch)
    return float(s / c), {k: float(v / c) for k, v in m.items()}


@pytest.mark.parametrize("margin,center", [(None, None), ([0.5, 0.0, 1.0], None), (None, 0.01),
                                           ([0.3, -0.2, 0.7], 0.05)])
def test_loss_and_metrics_equal_trl(margin, center):
    rng = np.random.default_rng(0)
    for rc, rr in ((RC, RR), (rng.normal(size=3).tolist(), rng.normal(size=3).tolist())):
        want_loss, want = _trl(rc, rr, margin, center)
        loss, got = _jaxft(rc, rr, margin, center)
        assert loss == pytest.approx(want_loss, abs=1e-6)
        assert set(got) == set(want) == set(METRICS)
        for k in METRICS:
            assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_rl_md_check_values():
    loss, m = _jaxft(RC, RR)
    assert loss == pytest.approx(1.044446, abs=1e-6)
    assert (m["accuracy"], m["margin"]) == pytest.approx((1 / 3, -1 / 3), abs=1e-6)
    assert (m["min_reward"], m["mean_reward"], m["max_reward"]) == pytest.approx((-1, 1 / 3, 1), abs=1e-6)
    assert _jaxft(RC, RR, margin=[0.5, 0.0, 1.0])[0] == pytest.approx(1.405271, abs=1e-6)
    assert _jaxft(RC, RR, center=0.01)[0] == pytest.approx(1.051112, abs=1e-6)


def test_accuracy_is_strict_and_empty_rows_do_not_count():
    _, per = pair_losses(jnp.array([0.5, 1.0]), jnp.array([0.5, 0.0]))
    assert per["accuracy"].tolist() == [0.0, 1.0]  # a tie counts 0
    r = jnp.asarray([1.0, 9.0, 0.0, -9.0])  # the second pair is an empty row: its ±9 must not show
    batch = dict(tokens=jnp.zeros((4, 4), jnp.int32), positions=jnp.zeros((4, 4), jnp.int32),
                 segment_ids=jnp.ones((4, 4), jnp.int32), pair_mask=jnp.array([1.0, 0.0]))
    s, c, m = make_loss(RewardConfig())(lambda *a: r, batch)
    assert float(c) == 1 and float(s) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert (float(m["min_reward"]), float(m["max_reward"])) == (0.0, 1.0)


# ---------------------------------------------------------------- pooled scores = transformers


def _seq_cls(arch, path, pad, seed=0):
    """A random HF *ForSequenceClassification (num_labels 1, pad_token_id=pad) of the family, saved."""
    torch.manual_seed(seed)
    cfg = make_config(arch, num_labels=1, pad_token_id=pad, eos_token_id=1)
    model = spread(tf.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval(), arch)
    model.save_pretrained(path)
    return model


def _padded(rows, S, pad, left):
    """HF inputs (ids padded with `pad`, attention mask, position ids) and jaxft's (segment 0 = padding)."""
    ids, seg = np.full((len(rows), S), pad, np.int64), np.zeros((len(rows), S), np.int32)
    pos = np.zeros((len(rows), S), np.int32)
    for b, r in enumerate(rows):
        at = slice(S - len(r), S) if left else slice(0, len(r))
        ids[b, at], seg[b, at], pos[b, at] = r, 1, np.arange(len(r))
    return ids, seg, pos


def _hf_scores(model, ids, seg, pos):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(seg),
                    position_ids=torch.tensor(pos.astype(np.int64)))
    return out.logits[:, 0].numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pooled_scores_equal_transformers(arch, tmp_path):
    rows = [[5, 6, 7, 1], [9, 10, 11, 12, 13, 14, 15, 1], [20, 21, 1, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38, 1]]
    for pad in (0, 1):  # pad ≠ eos; pad == eos (a trailing EOS is padding: the score is read before it)
        d = tmp_path / f"pad{pad}"
        hf = _seq_cls(arch, d, pad)
        model = load_pretrained(d, head="score", pad_token_id=pad)
        assert isinstance(model, ScoreModel) and model.pad_id == pad
        for left in (False, True):
            ids, seg, pos = _padded(rows, 12, pad, left)
            want = _hf_scores(hf, ids, seg, pos)
            got = np.asarray(model(jnp.asarray(ids.astype(np.int32)), jnp.asarray(pos), jnp.asarray(seg)))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"pad={pad} left={left}")
        # the pad == eos quirk really moves the read position: rows ending in EOS score differently
        if pad == 1:
            ids, seg, pos = _padded(rows, 12, 0, False)
            other = np.asarray(load_pretrained(d, head="score", pad_token_id=0)(
                jnp.asarray(ids.astype(np.int32)), jnp.asarray(pos), jnp.asarray(seg)))
            assert np.abs(other[[0, 1, 3]] - got[[0, 1, 3]]).min() > 1e-4


def test_causal_checkpoint_gets_a_fresh_head_and_num_labels_is_checked(tmp_path):
    from tiny import save_model

    save_model("llama", tmp_path / "lm")
    a = load_pretrained(tmp_path / "lm", head="score", pad_token_id=0, seed=0)
    b = load_pretrained(tmp_path / "lm", head="score", pad_token_id=0, seed=1)
    w = np.asarray(a.score.kernel[...])
    assert w.shape == (64, 1) and 0.01 < w.std() < 0.03  # normal(0, initializer_range=0.02)
    assert not np.allclose(w, np.asarray(b.score.kernel[...]))
    torch.manual_seed(0)
    cfg = make_config("llama", num_labels=2, pad_token_id=0)
    tf.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "two")
    with pytest.raises(JaxftError, match=r"two/config.json: num_labels=2 \(id2label\); a reward model needs "
                                         r"num_labels=1"):
        load_pretrained(tmp_path / "two", head="score", pad_token_id=0)


# ---------------------------------------------------------------- exports load in transformers / PEFT


def _trained_score_model(path, pad, seed=0):
    """A ScoreModel on a causal checkpoint with a "trained" LoRA (B ≠ 0) and a non-zero head."""
    model = load_pretrained(path, head="score", pad_token_id=pad, seed=seed)
    adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(seed))
    for i, (_, lin) in enumerate(adapters.targets(model, ("all-linear",))):
        lin.adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), lin.adapter.b.shape)
    model.score.kernel[...] = 0.5 * jax.random.normal(jax.random.key(7), model.score.kernel.shape)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merged_and_seq_cls_adapter_load_with_equal_scores(arch, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file

    from jaxft.formats.peft import export_adapter, export_merged
    from tiny import make_model

    pad = 1
    make_model(arch).save_pretrained(tmp_path / "base")
    model = _trained_score_model(tmp_path / "base", pad)
    rows = [[5, 6, 7, 1], [9, 10, 11, 12, 13, 14, 15, 8], [20, 21, 1, 22, 23]]
    ids, seg, pos = _padded(rows, 10, pad, left=False)
    want = np.asarray(model(jnp.asarray(ids.astype(np.int32)), jnp.asarray(pos), jnp.asarray(seg)))

    hf_config = tf.AutoConfig.from_pretrained(tmp_path / "base")
    export_merged(model, example_tokenizer(), hf_config, tmp_path / "merged", dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and config["pad_token_id"] == pad
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.num_labels == 1 and "lm_head.weight" not in load_file(str(tmp_path / "merged" / "model.safetensors"))
    np.testing.assert_allclose(_hf_scores(merged, ids, seg, pos), want, atol=1e-4, rtol=1e-4)

    export_adapter(model, LoraConfig(r=4, alpha=8), tmp_path / "adapter")
    ac = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ac["task_type"] == "SEQ_CLS" and "score" in ac["modules_to_save"]
    assert load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["base_model.model.score.weight"].shape \
        == (1, 64)
    base = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1, pad_token_id=pad,
                                                                 dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_hf_scores(peft_model, ids, seg, pos), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- training runs


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


FRUIT = ["apple", "pear", "plum", "grape", "mango", "peach", "lemon", "melon", "cherry", "berry"]
STONE = ["stone", "brick", "sand", "glass", "steel", "clay", "iron", "wood", "rock", "metal"]


def _toy_pairs(n, seed):
    """Separable pairs: the chosen answer names fruit, the rejected one materials."""
    rng = np.random.default_rng(seed)
    words = lambda pool: " ".join(rng.choice(pool, 3))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": f"Name some things ({i})."}],
             "chosen": [{"role": "assistant", "content": words(FRUIT)}],
             "rejected": [{"role": "assistant", "content": words(STONE)}]} for i in range(n)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    _write(d / "train.jsonl", _toy_pairs(32, 0))
    _write(d / "validation.jsonl", _toy_pairs(16, 1))
    return d


def _overrides(chat_model, data, out, **extra):
    o = {"model.path": chat_model, "data.train": data / "train.jsonl", "data.validation": data / "validation.jsonl",
         "data.max_length": 64, "train.batch_size": 4, "train.out_dir": out, "lora.r": 4, "lora.alpha": 8,
         "optim.lr": 3e-3, "optim.warmup_steps": 0, "train.eval_batches": 0}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _rows(out):
    return [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_heldout_accuracy(chat_model, toy, tmp_path):
    from jaxft.commands.evaluate import evaluate
    from jaxft.commands.train import train

    run = load_config(ROOT / "configs" / "reward_lora.yaml", _overrides(chat_model, toy, tmp_path / "run", **{
        "train.steps": 24, "train.eval_every": 24, "train.save_every": 24}))
    train(run, progress=False)
    rows = _rows(tmp_path / "run")
    assert all(k in rows[0] for k in ("loss", "pairs", *METRICS))
    assert rows[0]["min_reward"] <= rows[0]["mean_reward"] <= rows[0]["max_reward"]
    res = evaluate(run, progress=False)
    base, tuned = res["base"], res["tuned"]
    for k in ("eval_loss", *[f"eval_{m}" for m in METRICS]):  # `jaxft eval` measures what training logged last
        assert tuned[k] == pytest.approx(rows[-1][k], rel=1e-6, abs=1e-7), k
    assert base["eval_pairs"] == tuned["eval_pairs"] == 16
    assert base["eval_accuracy"] <= 0.75 and tuned["eval_accuracy"] >= 0.9, (base, tuned)
    assert tuned["eval_loss"] < base["eval_loss"] and tuned["eval_margin"] > 0
    assert tuned["eval_min_reward"] <= tuned["eval_mean_reward"] <= tuned["eval_max_reward"]


def test_full_finetuning_and_qlora_train(chat_model, toy, tmp_path):
    from jaxft.commands.train import train

    for name, extra in (("full", {"lora.enabled": False, "optim.lr": 1e-4}), ("qlora", {"quant.base": "nf4"})):
        run = load_config(ROOT / "configs" / "reward_lora.yaml", _overrides(chat_model, toy, tmp_path / name, **{
            "train.steps": 6, "train.eval_every": 6, "train.save_every": 6, **extra}))
        train(run, progress=False)
        rows = [r for r in _rows(tmp_path / name) if "loss" in r]
        assert rows[-1]["loss"] < rows[0]["loss"], name


def _cli_train(args):
    return subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_and_resume_reproduces_the_run(chat_model, toy, tmp_path):
    cfg = str(ROOT / "configs" / "reward_lora.yaml")
    common = {"train.steps": 8, "train.save_every": 2, "train.eval_every": 8, "lora.dropout": 0.1}
    ref = _cli_train([cfg, *_overrides(chat_model, toy, tmp_path / "ref", **common)])
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    expected = _rows(tmp_path / "ref")
    run = tmp_path / "killed"
    p = _cli_train([cfg, *_overrides(chat_model, toy, run, **common)])
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it once it has logged step 5 (checkpoints at 2 and 4)
        if (run / "metrics.jsonl").exists() and max((r["step"] for r in _rows(run)), default=0) >= 5:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = _cli_train([cfg, *_overrides(chat_model, toy, run, **common), "--resume"])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "resumed from" in err
    keys = ("loss", "grad_norm", *METRICS, "eval_loss", *[f"eval_{k}" for k in METRICS])
    key = lambda row: (row["step"], "eval_loss" in row)  # noqa: E731 — a step's training row and eval row
    got = {key(x): x for x in _rows(run)}  # the rows logged again after the kill replace the old ones
    assert sorted(got) == sorted(key(x) for x in expected)
    for want in expected:  # bit-exact on CPU
        for k in keys:
            if k in want:
                assert got[key(want)][k] == want[k], (want["step"], k)


def test_cli_export_and_score_match_the_run(chat_model, toy, tmp_path):
    """After a few steps (head and LoRA non-zero): `jaxft export` merged / peft load in transformers / PEFT
    with jaxft's scores, and `jaxft score` reports the run's held-out accuracy."""
    from peft import PeftModel

    from tiny import run_cli

    out = tmp_path / "run"
    r = run_cli("train", ROOT / "configs" / "reward_lora.yaml", *_overrides(chat_model, toy, out, **{
        "train.steps": 4, "train.eval_every": 4, "train.save_every": 4}))
    assert r.returncode == 0, r.stderr
    final = [x for x in _rows(out) if "eval_accuracy" in x][-1]
    pairs = [json.loads(x) for x in (toy / "validation.jsonl").read_text().splitlines()]
    scorer = Scorer.load(str(out))
    lora_b = [lin.adapter.b for _, lin in adapters.adapted(nnx.merge(scorer.graphdef, scorer.params, scorer.frozen))]
    assert all(float(jnp.abs(b[...]).max()) > 0 for b in lora_b)
    prompts, chosen = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    want = np.asarray(scorer(prompts, chosen))

    r = run_cli("score", out, "--input", toy / "validation.jsonl", "--out", tmp_path / "scores.jsonl")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 16 and summary["accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([x["chosen_score"] for x in rows], want, atol=1e-5)

    tok = example_tokenizer()
    ids = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, chosen)]
    for fmt in ("merged", "peft"):
        r = run_cli("export", out, "--format", fmt, "--out", tmp_path / fmt, "--dtype", "fp32")
        assert r.returncode == 0, r.stderr
    assert "serve reward models merged" in r.stderr and "modules_to_save" in r.stderr
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = tf.AutoModelForSequenceClassification.from_pretrained(chat_model, num_labels=1, dtype=torch.float32,
                                                                 pad_token_id=merged.config.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    for m in (merged, peft_model):
        enc = tok(ids, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            got = m(**enc).logits[:, 0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bad_rows_skipped_and_counted_overlong_dropped(tmp_path):
    tok = example_tokenizer()
    good = _toy_pairs(3, 0)
    long = dict(good[0], chosen=[{"role": "assistant", "content": "apple " * 200}])
    _write(tmp_path / "p.jsonl", [*good, "{not json", {"prompt": "x", "chosen": "a"}, dict(good[1], margin="big"),
                                  long, dict(good[2], margin=1.5)])
    cfg = DataConfig(train=str(tmp_path / "p.jsonl"), max_length=64)
    pairs, report = load_pairs(cfg, PAIRS, tok)
    assert (report.rows, report.skipped, report.dropped, report.truncated, len(pairs)) == (8, 3, 1, 0, 4)
    assert [p.margin for p in pairs] == [0.0, 0.0, 0.0, 1.5]
    assert PairBatches(pairs, 4, 64, seed=0).in_order(0)["margin"].tolist() == [0.0, 0.0, 0.0, 1.5]
    with pytest.raises(JaxftError, match="p.jsonl:4"):
        load_pairs(DataConfig(train=str(tmp_path / "p.jsonl"), max_length=64, strict=True), PAIRS, tok)


def test_config_checks():
    with pytest.raises(JaxftError, match="reward.center_rewards_coefficient: must be >= 0"):
        load_config(ROOT / "configs" / "reward_lora.yaml", ["reward.center_rewards_coefficient=-1"])
    with pytest.raises(JaxftError, match="eval.file: a reward model generates nothing"):
        load_config(ROOT / "configs" / "reward_lora.yaml", ["eval.file=x.jsonl"])
    assert load_config(ROOT / "configs" / "reward_lora.yaml").objective == "reward"


# ---------------------------------------------------------------- compile counts


def test_train_eval_and_scorer_compile_once_for_new_weights(chat_model, toy):
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    tok = example_tokenizer()
    model = load_pretrained(chat_model, head="score", pad_token_id=tok.pad_token_id)
    adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, LoraConfig(r=4, alpha=8))
    assert "score" in params  # the head trains in full next to the adapter
    pairs, _ = load_pairs(DataConfig(train=str(toy / "train.jsonl"), max_length=64), PAIRS, tok)
    batch = PairBatches(pairs, 2, 64, seed=0).batch(0)
    tx = make_optimizer(load_config(None, ["optim.lr=1e-2", "optim.warmup_steps=0"]).optim, 10, params)
    step = make_train_step(graphdef, tx, make_loss(RewardConfig()))
    ev, dev = make_eval_fn(graphdef, RewardConfig()), jax.devices()[0]
    scorer = Scorer(graphdef, jax.device_put(params, dev), frozen, tok, batch_size=2, max_length=64)
    prompts, completions = ["Name a fruit."] * 3, ["apple", "stone", "pear"]
    a, first = ev(jax.device_put(params, dev), frozen, batch), scorer(prompts, completions)
    state = jax.device_put(init_state(params, tx), dev)
    for _ in range(3):
        state, _ = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
    b, second = ev(state["params"], frozen, batch), scorer(prompts, completions, params=state["params"])
    assert step._cache_size() == 1 and ev._cache_size() == 1 and scorer.fn._cache_size() == 1
    assert float(a[0]) != float(b[0]) and first != second


def test_sharded_run_equals_one_device(chat_model, toy, tmp_path):
    """The same reward run on one device and on 4 (fsdp, and fsdp × tensor): losses, metrics and eval agree; and
    on the fsdp mesh spread over 2 processes × 2 devices, as on one process."""
    from jaxft.commands.train import train
    from tiny import launch_local

    rows = {}
    for name, mesh in (("one", {}), ("fsdp", {"mesh.fsdp": 4}), ("tp", {"mesh.fsdp": 2, "mesh.tensor": 2,
                                                                        "mesh.strategy": "fsdp_tp"})):
        run = load_config(ROOT / "configs" / "reward_lora.yaml", _overrides(chat_model, toy, tmp_path / name, **{
            "train.steps": 3, "train.eval_every": 3, "train.save_every": 3, **mesh}))
        train(run, progress=False)
        rows[name] = _rows(tmp_path / name)
    # scripts/launch_local.sh 2: 2 processes × 2 devices (gloo) on the fsdp run's mesh; process 0 alone logs
    r = launch_local(2, ROOT / "configs" / "reward_lora.yaml", *_overrides(chat_model, toy, tmp_path / "hosts", **{
        "train.steps": 3, "train.eval_every": 3, "train.save_every": 3, "mesh.fsdp": -1}))
    assert r.returncode == 0, r.stderr[-3000:]
    rows["hosts"] = _rows(tmp_path / "hosts")
    assert rows["one"][0]["loss"] != rows["one"][2]["loss"]
    keys = ("loss", "grad_norm", *METRICS, "eval_loss", *[f"eval_{m}" for m in METRICS])
    for name in ("fsdp", "tp"):
        for a, b in zip(rows["one"], rows[name], strict=True):
            for k in keys:
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, a["step"], k)
    for a, b in zip(rows["fsdp"], rows["hosts"], strict=True):  # the same mesh: one process or two
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), ("hosts", a["step"], k)
