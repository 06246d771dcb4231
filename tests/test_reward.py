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

import jaxft
from jaxft import adapters
from jaxft.config import DataConfig, LoraConfig, RewardConfig, load_config
from jaxft.errors import JaxftError
from jaxft.models.heads import ScoreModel
from jaxft.objectives.reward import METRICS, PAIRS, Scorer, make_eval_fn, make_loss, pair_losses
from jaxft.preference import PairBatches, load_pairs
from jaxft.task import make_examples, make_pairs
from tiny import ARCHS, ROOT, example_tokenizer, make_config

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
    model = tf.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 if "gemma" not in arch else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
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
        model = jaxft.load_pretrained(d, head="score", pad_token_id=pad)
        assert isinstance(model, ScoreModel) and model.pad_id == pad
        for left in (False, True):
            ids, seg, pos = _padded(rows, 12, pad, left)
            want = _hf_scores(hf, ids, seg, pos)
            got = np.asarray(model(jnp.asarray(ids.astype(np.int32)), jnp.asarray(pos), jnp.asarray(seg)))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"pad={pad} left={left}")
        # the pad == eos quirk really moves the read position: rows ending in EOS score differently
        if pad == 1:
            ids, seg, pos = _padded(rows, 12, 0, False)
            other = np.asarray(jaxft.load_pretrained(d, head="score", pad_token_id=0)(
                jnp.asarray(ids.astype(np.int32)), jnp.asarray(pos), jnp.asarray(seg)))
            assert np.abs(other[[0, 1, 3]] - got[[0, 1, 3]]).min() > 1e-4


def test_causal_checkpoint_gets_a_fresh_head_and_num_labels_is_checked(tmp_path):
    from tiny import save_model

    save_model("llama", tmp_path / "lm")
    a = jaxft.load_pretrained(tmp_path / "lm", head="score", pad_token_id=0, seed=0)
    b = jaxft.load_pretrained(tmp_path / "lm", head="score", pad_token_id=0, seed=1)
    w = np.asarray(a.score.kernel[...])
    assert w.shape == (64, 1) and 0.01 < w.std() < 0.03  # normal(0, initializer_range=0.02)
    assert not np.allclose(w, np.asarray(b.score.kernel[...]))
    torch.manual_seed(0)
    cfg = make_config("llama", num_labels=2, pad_token_id=0)
    tf.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "two")
    with pytest.raises(JaxftError, match=r"two/config.json: num_labels=2 \(id2label\); a reward model needs "
                                         r"num_labels=1"):
        jaxft.load_pretrained(tmp_path / "two", head="score", pad_token_id=0)


# ---------------------------------------------------------------- exports load in transformers / PEFT


def _trained_score_model(path, pad, seed=0):
    """A ScoreModel on a causal checkpoint with a "trained" LoRA (B ≠ 0) and a non-zero head."""
    model = jaxft.load_pretrained(path, head="score", pad_token_id=pad, seed=seed)
    adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(seed))
    for i, (_, lin) in enumerate(adapters.targets(model, ("all-linear",))):
        lin.adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), lin.adapter.b.shape)
    model.score.kernel[...] = 0.5 * jax.random.normal(jax.random.key(7), model.score.kernel.shape)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merged_and_seq_cls_adapter_load_with_equal_scores(arch, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file

    from jaxft.peft import export_adapter, export_merged
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
