"""The regression check of `jaxft eval` (tuned vs base on the base's greedy answers) and --compare-export (an
export vs the fp32 tuned model): figures against a numpy computation from transformers' logits, the identity
case, the gate's exit status, the export bounds, and one compile of the teacher-forced forward."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from jaxft.cli import main
from jaxft.commands.evaluate import evaluate
from jaxft.config import load_config
from jaxft.data.prompts import general_prompts
from jaxft.data.task import make_examples
from jaxft.divergence import summarize, token_parts
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.generate import eos_token_ids
from jaxft.regression import Variant, answer_batches, answer_logsoftmax, divergences, greedy_answers, text_windows
from tiny import ROOT, save_chat_model, spread

N_NEW = 10


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A tiny chat model (weights spread: peaked distributions, no near-ties of the top-1) and the same model with
    every weight perturbed, as two HF directories."""
    d = tmp_path_factory.mktemp("regression")
    base = spread(save_chat_model(d / "base"), "llama")
    base.save_pretrained(d / "base")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in base.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g) * p.abs().mean())
    base.save_pretrained(d / "tuned")
    load_tokenizer(d / "base").save_pretrained(d / "tuned")
    return d / "base", d / "tuned"


def _variant(path):
    graphdef, state = nnx.split(load_pretrained(path))
    return Variant(graphdef, (state,))


def _setup(base_dir, n_prompts=6):
    tok = load_tokenizer(base_dir)
    base = _variant(base_dir)
    chats = general_prompts(limit=n_prompts)
    prompts, answers = greedy_answers(base, tok, chats, eos=eos_token_ids(tok, base_dir), max_new_tokens=N_NEW,
                                      batch_size=4)
    return base, prompts, answers


def _torch_logsoftmax(path, ids):
    m = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(m(torch.tensor([p])).logits[0].double(), -1).numpy() for p in ids]


def test_figures_equal_numpy_from_transformers(two_models):
    base_dir, tuned_dir = two_models
    base, prompts, answers = _setup(base_dir)
    got = divergences(base, {"tuned": _variant(tuned_dir)}, answer_batches(prompts, answers, 4, N_NEW), "reg_")["tuned"]
    rows = [p + a for p, a in zip(prompts, answers)]
    ref, new = _torch_logsoftmax(base_dir, rows), _torch_logsoftmax(tuned_dir, rows)
    kl, nll_b, nll_t, agree, changed = [], [], [], [], []
    for p, a, lb, lt in zip(prompts, answers, ref, new):
        at = slice(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer's tokens
        lb, lt = lb[at], lt[at]
        kl += list((np.exp(lb) * (lb - lt)).sum(-1))
        nll_b += list(-lb[np.arange(len(a)), a])
        nll_t += list(-lt[np.arange(len(a)), a])
        same = lb.argmax(-1) == lt.argmax(-1)
        agree += list(same)
        changed.append(not same.all())
    want = dict(reg_kl_mean=np.mean(kl), reg_kl_p95=np.percentile(kl, 95), reg_ce_increase=np.mean(nll_t) - np.mean(nll_b),
                reg_top1_agree=np.mean(agree), reg_changed=np.mean(changed), reg_tokens=len(kl))
    assert want["reg_kl_mean"] > 1e-3 and want["reg_changed"] > 0  # the perturbation moved the model
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=0, err_msg=k)


def test_identical_model_is_zero_one_zero(two_models):
    base_dir, _ = two_models
    base, prompts, answers = _setup(base_dir, n_prompts=4)
    same = Variant(base.graphdef, jax.tree.map(lambda x: x.copy(), base.weights))
    got = divergences(base, {"same": same}, answer_batches(prompts, answers, 4, N_NEW), "reg_")["same"]
    assert got["reg_kl_mean"] == 0 and got["reg_kl_p95"] == 0 and got["reg_ce_increase"] == 0
    assert got["reg_top1_agree"] == 1 and got["reg_changed"] == 0 and got["reg_tokens"] > 0


def test_token_parts_by_hand():
    """Two tokens of a 3-word vocabulary, worked out on paper; the masked third position counts nowhere."""
    ref = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]], np.float32))
    new = np.log(np.array([[[0.25, 0.5, 0.25], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]]], np.float32))
    parts = token_parts(ref, new, np.array([[0, 1, 2]]), np.array([[True, True, False]]))
    kl0 = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    kl1 = 0.1 * np.log(0.5) + 0.8 * np.log(8 / 7)
    np.testing.assert_allclose(parts["kl"], [kl0, kl1], rtol=1e-6)
    f = summarize([parts])
    np.testing.assert_allclose(f["ce_increase"], ((np.log(4) - np.log(2)) + (np.log(1 / 0.7) - np.log(1 / 0.8))) / 2,
                               rtol=1e-6)
    assert f["top1_agree"] == 0.5 and f["changed"] == 1.0 and f["tokens"] == 2


def test_forward_compiles_once(two_models):
    base_dir, tuned_dir = two_models
    base, prompts, answers = _setup(base_dir, n_prompts=4)
    b = answer_batches(prompts, answers, 4, N_NEW)[0]
    answer_logsoftmax.clear_cache()
    outs = [np.asarray(answer_logsoftmax(v.weights, b["tokens"], b["positions"], b["segment_ids"], graphdef=v.graphdef,
                                         length=N_NEW)) for v in (base, _variant(tuned_dir))]
    assert answer_logsoftmax._cache_size() == 1 and np.abs(outs[0] - outs[1]).max() > 1e-3


# ---------------------------------------------------------------- a trained run: the gate and --compare-export


@pytest.fixture(scope="module")
def trained(tmp_path_factory, two_models):
    """A LoRA run of 3 steps (lr 1e-2: it moves), its exports (fp32 merged, f32 / q8_0 GGUF, PEFT)."""
    from jaxft.commands.export import export
    from jaxft.commands.train import train

    d = tmp_path_factory.mktemp("run")
    rows = make_examples(24, seed=3)
    for name, part in (("train.jsonl", rows[:20]), ("validation.jsonl", rows[20:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    o = {"model.path": two_models[0], "data.train": d / "train.jsonl", "data.validation": d / "validation.jsonl",
         "data.max_length": 256, "train.batch_size": 2, "train.steps": 3, "optim.lr": 1e-2, "train.out_dir": d / "run",
         "lora.r": 4, "lora.alpha": 8, "eval.max_new_tokens": 8, "eval.max_examples": 3, "eval.batch_size": 4,
         "eval.regression_prompts": 4, "eval.regression_new_tokens": 8, "train.eval_batches": 1,
         "eval.regression_after_training": True}
    overrides = [f"{k}={v}" for k, v in o.items()]
    run = load_config(ROOT / "configs" / "sft_lora.yaml", overrides)
    last = train(run, progress=False)
    assert last["reg_kl_mean"] > 0 and (d / "run" / "regression.json").is_file()  # the check after training
    exports = {}
    for name, fmt, kw in (("merged", "merged", dict(dtype="fp32")), ("f32.gguf", "gguf", dict(gguf_type="f32")),
                          ("q8_0.gguf", "gguf", dict(gguf_type="q8_0")), ("peft", "peft", {})):
        exports[name] = export(run, fmt, d / name, **kw)[0]
    return run, overrides, exports, d


def test_gate_exit_status(trained, capsys):
    run, overrides, _, d = trained
    args = ["eval", str(ROOT / "configs" / "sft_lora.yaml"), *overrides, "--out", str(d / "gate")]
    assert main([*args, "eval.max_kl=1000", "eval.max_ce_increase=1000"]) == 0
    summary = json.loads((d / "gate" / "summary.json").read_text())
    assert summary["tuned"]["reg_kl_mean"] > 0 and "reg_kl_mean" not in summary["base"]
    out = capsys.readouterr()
    assert "reg_kl_mean" in out.out and "reg_changed" in out.out  # the table shows the section
    assert main([*args, "--overwrite", "eval.max_kl=0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jaxft: regression gate: tuned: reg_kl_mean ") and err.endswith("> eval.max_kl 0"), err
    after_training = json.loads((d / "run" / "regression.json").read_text())
    assert after_training.pop("step") == 3
    for k, v in after_training.items():  # training's final check is `jaxft eval`'s, on the same checkpoint
        assert summary["tuned"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    ce = summary["tuned"]["reg_ce_increase"]
    assert ce > 0  # 3 steps at lr 1e-2 on the task made the base's general answers less likely
    assert main([*args, "--overwrite", f"eval.max_ce_increase={ce / 2}", "eval.max_kl=1000"]) == 3
    assert "tuned: reg_ce_increase " in capsys.readouterr().err
    assert main([*args, "--overwrite", f"eval.max_ce_increase={ce * 2}", "eval.max_kl=1000"]) == 0
    assert main([*args, "--overwrite", "eval.max_kl=-1"]) == 2  # a bad threshold is bad input
    assert "eval.max_kl: must be >= 0" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--compare-export", str(d / "nowhere.gguf")]) == 2
    assert f"--compare-export: {d / 'nowhere.gguf'}: no such file or directory" in capsys.readouterr().err


def test_compare_export(trained):
    run, _, exports, d = trained
    run = dataclasses.replace(run, eval=dataclasses.replace(run.eval, regression=False))  # not what is tested here
    got = {}
    for name in ("merged", "f32.gguf", "q8_0.gguf", "peft"):
        r = evaluate(run, progress=False, out=d / f"eval-{name}", compare_export=exports[name])
        got[name] = r["export"]
        assert {"exp_kl_mean", "exp_kl_p95", "exp_top1_agree", "exact_match"} <= set(r["export"])
        rows = [json.loads(line) for line in (d / f"eval-{name}" / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all("export" in row for row in rows)
        if name != "q8_0.gguf":  # the same fp32 maths, read back by jaxft's own loaders: the same answers
            assert got[name]["exp_kl_mean"] <= 1e-6 and got[name]["exp_top1_agree"] == 1.0, (name, got[name])
            assert [row["export"] for row in rows] == [row["tuned"] for row in rows]
            assert got[name]["exact_match"] == r["tuned"]["exact_match"]
    # q8_0 on this tiny model, 24 answer tokens: measured kl_mean 4.8e-4, kl_p95 1.2e-3, top-1 agreement 23/24
    q = got["q8_0.gguf"]
    assert 0 < q["exp_kl_mean"] < 5e-3 and q["exp_kl_p95"] < 1e-2 and q["exp_top1_agree"] >= 0.8, q


def test_compare_adapters_get_the_same_figures(trained):
    """`jaxft eval --adapter`: an adapter of the bank gets the reg_* figures of the run it was exported from."""
    from jaxft.commands.evaluate import compare

    run, _, exports, d = trained
    run = dataclasses.replace(run, eval=dataclasses.replace(run.eval, metric="none"))
    got = compare(run, [f"peft={exports['peft']}"], progress=False, out=d / "cmp")
    want = json.loads((d / "run" / "regression.json").read_text())
    assert "reg_kl_mean" not in got["base"]
    for k in ("reg_kl_mean", "reg_kl_p95", "reg_ce_increase", "reg_top1_agree", "reg_changed", "reg_tokens"):
        assert got["peft"][k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k


def test_text_windows_predict_every_token_once():
    prompts, answers = text_windows(list(range(10)), 4)
    assert prompts == [[0], [4], [8]] and answers == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert text_windows(list(range(10)), 4, limit=2) == ([[0], [4]], [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_text_cross_entropy_equals_transformers(two_models, tmp_path):
    """eval.regression_text: reg_text_ce_increase is the mean NLL change over the text's windows, as transformers
    computes it on each window."""
    from jaxft.commands.evaluate import regression

    base_dir, tuned_dir = two_models
    text = tmp_path / "general.txt"
    text.write_text("The river runs past the old mill. Bread is baked there every morning, and the smell "
                    "reaches the bridge before the first train leaves the station.\n")
    run = load_config(None, [f"eval.regression_text={text}", "eval.regression_prompts=2",
                             f"eval.regression_new_tokens={N_NEW}", "eval.batch_size=4"])
    tok = load_tokenizer(base_dir)
    got = regression(run, tok, base_dir, _variant(base_dir), {"tuned": _variant(tuned_dir)}, progress=False)["tuned"]
    ids = list(tok(text.read_text())["input_ids"])
    rows = [ids[i:i + N_NEW + 1] for i in range(0, len(ids) - 1, N_NEW)][:2]  # eval.regression_prompts windows
    ref, new = _torch_logsoftmax(base_dir, rows), _torch_logsoftmax(tuned_dir, rows)
    d = [(lb[np.arange(len(w) - 1), w[1:]] - lt[np.arange(len(w) - 1), w[1:]]) for w, lb, lt in zip(rows, ref, new)]
    want = np.concatenate(d).mean()
    assert len(ids) > 2 * N_NEW and abs(want) > 1e-3
    np.testing.assert_allclose(got["reg_text_ce_increase"], want, rtol=1e-4, atol=0)
    np.testing.assert_allclose(got["reg_text_ppl_ratio"], np.exp(want), rtol=1e-4, atol=0)
