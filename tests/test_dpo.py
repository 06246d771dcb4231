"""Preference optimization: losses equal TRL's own code, the LoRA-base reference, cached reference
log-probs, preference data, and `jaxft train configs/dpo_lora.yaml` end to end on a tiny model."""

import json
import math
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft.formats.hf import load_pretrained
import jaxft.adapters
import jaxft.losses
from jaxft.config import DataConfig, DpoConfig, LoraConfig, load_config
from jaxft.objectives.dpo import METRICS, make_loss, pair_losses, reference_logps
from jaxft.errors import JaxftError
from jaxft.data.pairs import PairBatches, load_pairs
from jaxft.data.task import make_examples, make_pairs
from tiny import example_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")

# ---------------------------------------------------------------- losses against TRL's own code


def test_sigmoid_check_values():
    delta = jnp.array([0.0, 10.0, 20.0])
    zero = jnp.zeros(3)
    loss, _ = pair_losses(DpoConfig(beta=0.1), delta, zero, jnp.ones(3), jnp.ones(3), zero, zero)
    np.testing.assert_allclose(loss, [0.693147, 0.313262, 0.126928], atol=1e-6)


def _random_logps(B=6, S=12, seed=0):
    """TRL-style per-token log-probs [2B, S-1] (zero outside completions) and completion masks [2B, S]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, S)
    for i in range(2 * B):
        start = int(torch.randint(2, 6, (1,), generator=g))
        end = int(torch.randint(start + 1, S + 1, (1,), generator=g))
        mask[i, start:end] = 1
    lp = -torch.rand(2 * B, S - 1, generator=g) * 0.3 * mask[:, 1:]
    ref = (lp.sum(1) + 0.5 * torch.randn(2 * B, generator=g)).clamp(max=-1e-3)
    return lp.double(), mask.double(), ref.double()


def _ours(cfg, lp, mask, ref=None, nll=None):
    B = lp.shape[0] // 2
    logps = jnp.asarray(lp.sum(1).numpy(), jnp.float64)
    lens = jnp.asarray(mask.sum(1).numpy(), jnp.float64)
    r = () if ref is None else (jnp.asarray(ref[:B].numpy()), jnp.asarray(ref[B:].numpy()))
    loss, m = pair_losses(cfg, logps[:B], logps[B:], lens[:B], lens[B:], *r)
    total = float(jnp.mean(loss)) + (nll if nll is not None else 0.0)
    return total, {k: float(jnp.mean(v)) for k, v in m.items()}


def _accelerator():
    return types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                                 unwrap_model=lambda m: m)


def _trl_dpo(loss_type, beta, eps, lp, mask, ref):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs and precomputed reference log-probs."""
    from trl import DPOTrainer

    B = lp.shape[0] // 2
    me = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros_like(lp)
    model = lambda **kw: types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros,  # noqa: E731
                                               is_top1=zeros.bool())
    inputs = dict(input_ids=torch.zeros(mask.shape, dtype=torch.long), attention_mask=torch.ones_like(mask),
                  completion_mask=mask, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    loss = DPOTrainer._compute_loss(me, model, inputs, False)
    return float(loss), {k: v[0] for k, v in me._metrics["train"].items() if k in METRICS}


def _trl_reference_free(loss_type, beta, eps, gamma, lp, mask, nll):
    """TRL's CPOTrainer (SimPO) / ORPOTrainer get_batch_loss_metrics on given length-normalized log-probs."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    B = lp.shape[0] // 2
    avg = lp.sum(1) / mask.sum(1)
    logits = torch.zeros(2 * B, 3, 5)
    me = types.SimpleNamespace(accelerator=_accelerator(), aux_loss_enabled=False, beta=beta, alpha=0.0,
                               label_smoothing=eps, simpo_gamma=gamma, loss_type=loss_type, cpo_alpha=0.0)
    me.concatenated_forward = lambda model, batch: (avg[:B], avg[B:], logits[:B], logits[B:], torch.tensor(nll, dtype=torch.float64))
    if loss_type == "simpo":
        me.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, me)
        loss, metrics = CPOTrainer.get_batch_loss_metrics(me, None, None)
    else:
        me.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, me)
        loss, metrics = ORPOTrainer.get_batch_loss_metrics(me, None, None)
    return float(loss), {k: float(v) for k, v in metrics.items() if k in METRICS}


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_every_loss_equals_trl(loss_type, eps):
    if eps and loss_type in ("hinge", "ipo", "orpo"):
        pytest.skip("no label smoothing in this loss")
    jax.config.update("jax_enable_x64", True)
    try:
        lp, mask, ref = _random_logps(seed=hash((loss_type, eps)) % 1000)
        cfg = DpoConfig(loss_type=loss_type, beta=0.3, label_smoothing=eps, simpo_gamma=0.7, orpo_lambda=0.3)
        if loss_type in ("simpo", "orpo"):
            nll = 1.234
            want_loss, want = _trl_reference_free(loss_type, 0.3, eps, 0.7, lp, mask, nll)
            got_loss, got = _ours(cfg, lp, mask, nll=nll if loss_type == "orpo" else None)
        elif loss_type == "sigmoid" and eps:  # cDPO: TRL 1.16's DPO has it no more; CPO's sigmoid is the formula
            from trl.experimental.cpo import CPOTrainer

            B = lp.shape[0] // 2
            ratio = lp.sum(1) - ref
            me = types.SimpleNamespace(alpha=0.0, beta=0.3, label_smoothing=eps, loss_type="sigmoid",
                                       accelerator=_accelerator())
            losses, _, _ = CPOTrainer.cpo_loss(me, ratio[:B], ratio[B:])
            want_loss, want = float(losses.mean()), None
            got_loss, got = _ours(cfg, lp, mask, ref)
        else:
            want_loss, want = _trl_dpo(loss_type, 0.3, eps, lp, mask, ref)
            got_loss, got = _ours(cfg, lp, mask, ref)
        tol = 1e-6 if loss_type == "orpo" else 1e-12  # TRL's odds_ratio_loss casts to fp32 first
        assert got_loss == pytest.approx(want_loss, rel=tol, abs=tol)
        if want is not None:
            assert set(want) == set(METRICS)
            for k in METRICS:
                t = 1e-7 if k == "rewards/accuracies" else tol  # TRL: float32 mean of 0/1
                assert got[k] == pytest.approx(want[k], rel=t, abs=t), k
    finally:
        jax.config.update("jax_enable_x64", False)


def test_accuracy_ties_count_as_wrong():
    z = jnp.zeros(2)
    _, m = pair_losses(DpoConfig(), jnp.array([-1.0, -2.0]), jnp.array([-1.0, -3.0]), z + 1, z + 1, z - 1, z - 3)
    np.testing.assert_array_equal(m["rewards/accuracies"], [0.0, 0.0])  # equal rewards: not correct


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tok():
    return example_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_pair_formats_and_eos(tmp_path, tok):
    user = [{"role": "user", "content": "Capital of France?"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Paris"}],
         "rejected": [{"role": "assistant", "content": "Lyon"}]},  # explicit, chat
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},  # explicit, strings
        {"chosen": user + [{"role": "assistant", "content": "Paris"}],  # implicit prompt
         "rejected": user + [{"role": "assistant", "content": "Lyon"}]},
    ]
    pairs, report = load_pairs(DataConfig(train=_write(tmp_path / "p.jsonl", rows)), DpoConfig(), tok)
    assert report.examples == 3 and report.skipped == 0
    for p in pairs[1:]:  # all three spellings give the same token ids
        np.testing.assert_array_equal(p.chosen.tokens, pairs[0].chosen.tokens)
        np.testing.assert_array_equal(p.rejected.tokens, pairs[0].rejected.tokens)
    for side, answer in ((pairs[0].chosen, "Paris"), (pairs[0].rejected, "Lyon")):
        text = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        want = tok(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(side.tokens, want)
        targets = side.tokens[side.loss_mask]
        assert targets[-1] == tok.eos_token_id  # EOS (<|im_end|>) closes the completion and is a target
        assert tok.decode(targets[:-1]) == answer
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert not side.loss_mask[:len(tok(prompt, add_special_tokens=False)["input_ids"])].any()


def test_overlong_pairs_truncate_prompt_then_drop(tmp_path, tok):
    long_prompt = "word " * 60
    rows = [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"},
            {"prompt": "short", "chosen": "answer " * 80, "rejected": "no"},  # completion alone too long
            {"prompt": "short", "chosen": "yes", "rejected": "no"}]
    data = DataConfig(train=_write(tmp_path / "p.jsonl", rows), max_length=40)
    pairs, report = load_pairs(data, DpoConfig(), tok)
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 1)
    cut = pairs[0]
    assert len(cut) == 40 and len(cut.chosen) <= 40 and len(cut.rejected) <= 40
    full, _ = load_pairs(DataConfig(train=data.train, max_length=4096), DpoConfig(), tok)
    n = int(cut.chosen.loss_mask.sum())  # the completion is kept whole, the prompt keeps its last tokens
    np.testing.assert_array_equal(cut.chosen.tokens, full[0].chosen.tokens[-len(cut.chosen):])
    assert n == full[0].chosen.loss_mask.sum()
    _, report = load_pairs(data, DpoConfig(truncate_prompt=False), tok)
    assert (report.examples, report.truncated, report.dropped) == (1, 0, 2)
    pairs, report = load_pairs(DataConfig(train=data.train, max_length=4096), DpoConfig(max_prompt_length=5), tok)
    assert report.truncated == 3 and all(int(np.argmax(p.chosen.loss_mask)) == 5 for p in pairs)


def test_bad_pair_rows_counted_or_fatal(tmp_path, tok):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{not json", {"prompt": "q", "chosen": "a"},
            {"prompt": "q", "chosen": "a", "rejected": ""}, {"prompt": "q", "chosen": 3, "rejected": "b"},
            {"chosen": "a", "rejected": "b"},
            {"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}]
    path = _write(tmp_path / "p.jsonl", rows)
    pairs, report = load_pairs(DataConfig(train=path), DpoConfig(), tok)
    assert report.examples == 1 and report.skipped == 6
    assert report.skipped_by_reason == {"invalid JSON": 1, "missing field": 2, "empty completion": 1,
                                        "wrong type": 1, "no shared prompt": 1}
    assert "p.jsonl:2" in report.first_errors[0] and "p.jsonl:4: rejected: 'rejected' is empty" in report.first_errors[2]
    with pytest.raises(JaxftError, match=r"p.jsonl:2: invalid JSON"):
        load_pairs(DataConfig(train=path, strict=True), DpoConfig(), tok)


def test_pair_batches_layout(tmp_path, tok):
    rows = make_pairs(make_examples(5, seed=1), seed=2)
    pairs, _ = load_pairs(DataConfig(train=_write(tmp_path / "p.jsonl", rows), max_length=256), DpoConfig(), tok)
    ref = np.arange(10, dtype=np.float32).reshape(5, 2)
    b = PairBatches(pairs, batch_size=3, seq_len=256, seed=0, ref_logps=ref).batch(1)  # 2 real pairs + 1 empty
    assert b["tokens"].shape == (6, 256)
    np.testing.assert_array_equal(b["pair_mask"], [1, 1, 0])
    i, j = b["pair_index"][:2]
    assert b["pair_index"][2] == -1 and not b["segment_ids"][[2, 5]].any()
    for row, ex in ((0, pairs[i].chosen), (3, pairs[i].rejected), (1, pairs[j].chosen), (4, pairs[j].rejected)):
        np.testing.assert_array_equal(b["tokens"][row, :len(ex)], ex.tokens)
    np.testing.assert_array_equal(b["ref_logps"], [ref[i, 0], ref[j, 0], 0, ref[i, 1], ref[j, 1], 0])


def test_task_pairs():
    from jaxft.metrics import score

    rows = make_examples(60, seed=0)
    pairs = make_pairs(rows, seed=1)
    assert pairs == make_pairs(rows, seed=1)
    for row, pair in zip(rows, pairs):
        assert pair["prompt"] == row["messages"][:-1] and pair["chosen"] == row["messages"][-1:]
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    assert score("json_fields", chosen, chosen)["exact"] == 1.0
    assert score("json_fields", rejected, chosen)["exact"] == 0.0  # every rejected answer is wrong


# ---------------------------------------------------------------- the model: reference, one step



@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    rows = make_examples(24, seed=3)
    _write(d / "train.jsonl", make_pairs(rows[:16], seed=4))
    _write(d / "validation.jsonl", make_pairs(rows[16:20], seed=5))
    _write(d / "test.jsonl", rows[20:])
    return d


@pytest.fixture(scope="module")
def batch(pair_data, tok):
    pairs, _ = load_pairs(DataConfig(train=str(pair_data / "train.jsonl"), max_length=192), DpoConfig(), tok)
    return {k: jnp.asarray(v) for k, v in PairBatches(pairs, 3, 192, seed=0).batch(0).items()}


def _lora_model(path, seed=0):
    model = load_pretrained(path)
    return jaxft.adapters.attach(model, LoraConfig(r=4, alpha=8), jax.random.key(seed))


def test_policy_equals_reference_at_start(chat_model, batch):
    model = _lora_model(chat_model)  # fresh adapter: B = 0
    s, c, m = make_loss(DpoConfig())(model, batch)
    assert float(c) == 3
    assert float(s / c) == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(m[k]) == 0.0, k


def test_lora_base_reference_equals_frozen_base(chat_model, batch):
    model = _lora_model(chat_model)
    for _, lin in jaxft.adapters.targets(model, ("all-linear",)):  # a trained-looking adapter
        lin.adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(1), lin.adapter.b.shape)
    base = load_pretrained(chat_model)  # loaded separately, no LoRA
    h, _ = base.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
    want = jnp.sum(jaxft.losses.token_logprobs(base, h, batch["targets"]) * batch["loss_mask"], -1)
    got = reference_logps(model, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    _, _, m = make_loss(DpoConfig())(model, batch)
    assert abs(float(m["rewards/margins"])) > 1e-3  # the policy itself does differ from the reference


def test_chosen_logprob_rises_after_a_step(chat_model, batch):
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    lcfg = LoraConfig(r=4, alpha=8)
    graphdef, params, frozen = jaxft.adapters.split(_lora_model(chat_model), lcfg)
    tx = make_optimizer(load_config(None, ["optim.lr=1e-2", "optim.warmup_steps=0"]).optim, 10, params)
    step = make_train_step(graphdef, tx, make_loss(DpoConfig(beta=0.1)))
    mb = jax.tree.map(lambda x: x[None], batch)
    state, m0 = step(init_state(params, tx), frozen, mb)
    state, m1 = step(state, frozen, mb)
    assert float(m0["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m1["logps/chosen"]) > float(m0["logps/chosen"])
    assert float(m1["rewards/margins"]) > 0 and float(m1["loss"]) < math.log(2)


def test_grad_accum_keeps_loss_and_metrics(chat_model, pair_data, tok):
    """2 micro-batches of 1 pair give the loss, metrics and gradient norm of 1 micro-batch of 2 pairs."""
    from jaxft.optim import make_optimizer
    from jaxft.train import init_state, make_train_step

    pairs, _ = load_pairs(DataConfig(train=str(pair_data / "train.jsonl"), max_length=192), DpoConfig(), tok)
    lcfg = LoraConfig(r=4, alpha=8)
    model = _lora_model(chat_model)
    for _, lin in jaxft.adapters.targets(model, ("all-linear",)):  # rewards away from 0
        lin.adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(2), lin.adapter.b.shape)
    graphdef, params, frozen = jaxft.adapters.split(model, lcfg)
    tx = make_optimizer(load_config(None, ["optim.warmup_steps=0"]).optim, 10, params)
    step = make_train_step(graphdef, tx, make_loss(DpoConfig(loss_type="ipo")))
    one = PairBatches(pairs[:2], 2, 192, seed=0).in_order(0)
    halves = [PairBatches(pairs[:2], 1, 192, seed=0).in_order(i) for i in range(2)]
    fresh = lambda: init_state(jax.tree.map(jnp.copy, params), tx)  # noqa: E731 — the state is donated
    _, m1 = step(fresh(), frozen, {k: v[None] for k, v in one.items()})
    _, m2 = step(fresh(), frozen, {k: np.stack([h[k] for h in halves]) for k in one})
    assert float(m1["targets"]) == float(m2["targets"]) == 2
    for k in ("loss", "grad_norm", *METRICS):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-6), k


# ---------------------------------------------------------------- training runs


def _overrides(chat_model, pair_data, out, **extra):
    o = {"model.path": chat_model, "data.train": pair_data / "train.jsonl",
         "data.validation": pair_data / "validation.jsonl", "eval.file": pair_data / "test.jsonl",
         "data.max_length": 192, "train.batch_size": 2, "train.out_dir": out, "lora.r": 4, "lora.alpha": 8,
         "optim.lr": 1e-2, "eval.max_new_tokens": 8, "eval.max_examples": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _rows(out):
    return [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cached_reference_equals_on_the_fly(chat_model, pair_data, tmp_path):
    from jaxft.commands.train import train

    runs = {}
    for ref in ("lora_base", "cache"):
        run = load_config(ROOT / "configs" / "dpo_lora.yaml", _overrides(
            chat_model, pair_data, tmp_path / ref, **{"dpo.reference": ref, "train.steps": 3, "train.grad_accum": 2}))
        train(run, progress=False)
        runs[ref] = _rows(tmp_path / ref)
    assert len(list((tmp_path / "cache" / "reference").glob("*.npy"))) == 2  # train and validation
    assert not (tmp_path / "lora_base" / "reference").exists()
    keys = ["loss", "grad_norm", *METRICS, "eval_loss", *[f"eval_{k}" for k in METRICS]]
    assert runs["lora_base"][-1]["eval_rewards/accuracies"] >= 0
    for a, b in zip(runs["lora_base"], runs["cache"], strict=True):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_full_finetuning_with_cached_reference(chat_model, pair_data, tmp_path):
    """lora.enabled=false + dpo.reference=cache: the reference is the initial weights, computed once."""
    from jaxft.commands.train import train

    run = load_config(ROOT / "configs" / "dpo_lora.yaml", _overrides(
        chat_model, pair_data, tmp_path / "full", **{"lora.enabled": False, "dpo.reference": "cache",
                                                     "optim.lr": 1e-4, "train.steps": 2}))
    train(run, progress=False)
    first, second = [r for r in _rows(tmp_path / "full") if "loss" in r]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert abs(first["rewards/margins"]) < 1e-6 and first["rewards/accuracies"] == 0.0
    assert second["rewards/margins"] > 0 and second["loss"] < math.log(2)


def test_cli_train_resume_eval(chat_model, pair_data, tmp_path):
    cfg = str(ROOT / "configs" / "dpo_lora.yaml")
    out = tmp_path / "run"

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "jaxft.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr
        return r

    o = _overrides(chat_model, pair_data, out, **{"train.save_every": 2, "dpo.reference": "cache"})
    cli("train", cfg, *o, "train.steps=2")
    r = cli("train", cfg, *o, "train.steps=4", "--resume")
    assert "resumed from" in r.stderr and "(cached)" in r.stderr  # no second reference pass
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(k in rows[-1] for k in METRICS)
    r = cli("eval", str(out))
    assert "eval_rewards/accuracies" in r.stdout and "field_accuracy" in r.stdout
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["base"]["eval_rewards/accuracies"] == 0.0  # base = reference: every reward is 0
    assert summary["base"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_two_processes_match_one_process(chat_model, pair_data, tmp_path):
    """scripts/launch_local.sh 2 (2 processes × 2 devices, gloo) on one fsdp = 4 mesh equals one process with 4
    devices, step for step: the policy and reference (LoRA-off) passes, the step and the held-out evaluation.
    Process 0 alone writes the metrics."""
    from jaxft.commands.train import train
    from tiny import launch_local

    o = {"train.steps": 3, "train.eval_every": 3, "train.batch_size": 4}
    single = tmp_path / "single"  # in this process: 4 of its 8 simulated devices, the same (1, 4, 1) mesh
    train(load_config(ROOT / "configs" / "dpo_lora.yaml", _overrides(chat_model, pair_data, single, **o,
                                                                      **{"mesh.fsdp": 4})), progress=False)
    r = launch_local(2, ROOT / "configs" / "dpo_lora.yaml", *_overrides(chat_model, pair_data, tmp_path / "multi",
                                                                        **o, **{"mesh.fsdp": -1}))
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _rows(single), _rows(tmp_path / "multi")
    assert [x["step"] for x in got] == [x["step"] for x in want] and "eval_loss" in want[-1]
    for a, b in zip(want, got):
        for k in ("loss", "grad_norm", *METRICS, "eval_loss", *[f"eval_{m}" for m in METRICS]):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_config_errors():
    with pytest.raises(JaxftError, match="dpo.reference: lora_base needs LoRA"):
        load_config(ROOT / "configs" / "dpo_lora.yaml", ["lora.enabled=false"])
    with pytest.raises(JaxftError, match="dpo.loss_type: 'kto' is not one of"):
        load_config(ROOT / "configs" / "dpo_lora.yaml", ["dpo.loss_type=kto"])
    load_config(ROOT / "configs" / "dpo_lora.yaml", ["lora.enabled=false", "dpo.reference=cache"])
