"""jaxft.lm_eval.JaxftLM against lm-eval's own Hugging Face backend (HFLM) on tiny random models with SmolLM2's
tokenizer: every request's log-likelihood and is_greedy, rolling windows, greedy generation with stop strings,
the shipped local tasks, a run directory against its merged export; compile counts; a 4-device mesh."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxft.lm_eval import JaxftLM, pack, score_calls, share_inputs  # noqa: E402
from tiny import ROOT, run_cli, save_chat_model, spread  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TASKS = ROOT / "configs" / "lm_eval"
CONTEXT = 64  # the tiny models' max_position_embeddings: long texts take several rolling windows


def _save(path, arch, context=CONTEXT, seed=0):
    model = save_chat_model(path, arch=arch, seed=seed, max_position_embeddings=context)
    spread(model, arch).save_pretrained(path)  # logits far apart: greedy choices are not near ties
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def pair(request, tmp_path_factory):
    d = _save(tmp_path_factory.mktemp(request.param), request.param)
    return d, HFLM(pretrained=str(d), dtype="float32", device="cpu", batch_size=4), JaxftLM(d, batch_tokens=256)


def _req(kind, args, i=0):
    return Instance(kind, {}, args, i)


LL = [("The weather in Paris", " is sunny today"),  # multi-token continuation
      ("", "Hello world"),  # empty context: scored after the prefix token
      ("Question: 2+2=", "4"), ("Question: 2+2= ", "4"),  # the trailing space moves to the continuation
      ("Answer:", " A"), ("Answer:", " B"), ("Answer:", " C"),  # one input shared by three requests
      ("word " * 80, " and a tail"),  # longer than the context: truncated from the left
      ("abc", "def ghi jkl"),
      *[("Question: what colour is the sky over the sea at noon?\nAnswer:", c)  # one context run once for all
        for c in (" blue and clear", " grey", " it depends on the weather", " green")]]


def _greedy_requests(jx):
    """Token-level requests whose continuation is the model's own greedy continuation (is_greedy True) and the
    same with its last token changed (False)."""
    from jaxft.generate import Sampling, generate

    ctxs = [jx.tok_encode(t) for t in ["The weather", "Once upon a time", "Hi", "The quick brown fox"]]
    conts = generate(jx.m.graphdef, jx.weights, ctxs, eos_ids={-1}, sampling=Sampling(max_new_tokens=5)).tokens
    out = []
    for ctx, cont in zip(ctxs, conts.tolist()):
        out += [((None, None), ctx, cont), ((None, None), ctx, cont[:-1] + [(cont[-1] + 1) % 1000])]
    return out


def test_requests_equal_hflm(pair):
    d, hf, jx = pair
    reqs = [_req("loglikelihood", a, i) for i, a in enumerate(LL)]
    want, got = hf.loglikelihood(reqs, disable_tqdm=True), jx.loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, got)) < 1e-4
    assert [a[1] for a in want] == [b[1] for b in got]

    toks = _greedy_requests(jx)
    want, got = hf._loglikelihood_tokens(toks, disable_tqdm=True), jx._loglikelihood_tokens(toks, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, got)) < 1e-4
    assert [a[1] for a in want] == [b[1] for b in got] and any(b[1] for b in got) and not all(b[1] for b in got)

    texts = ["short text.", "word " * 150, "The quick brown fox jumps over the lazy dog. " * 12]  # 1 to 5 windows
    roll = [_req("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)]
    want, got = hf.loglikelihood_rolling(roll, disable_tqdm=True), jx.loglikelihood_rolling(roll, disable_tqdm=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * 5)  # a sum over up to 5 windows


def test_greedy_generation_with_stops_equals_hflm(pair):
    d, hf, jx = pair
    contexts = ["The weather", "Once upon a time there was", "Hi", "word " * 60]  # the last one is left-truncated
    free = [_req("generate_until", (c, dict(until=[], max_gen_toks=10)), i) for i, c in enumerate(contexts)]
    want = hf.generate_until(free, disable_tqdm=True)
    assert jx.generate_until(free, disable_tqdm=True) == want
    # stop strings taken from the middle of the free texts: each row is cut there, and the rows stop early
    stops = sorted({w[len(w) // 2:len(w) // 2 + 2] for w in want if len(w) > 4})
    cut = [_req("generate_until", (c, dict(until=stops, max_gen_toks=10)), i) for i, c in enumerate(contexts)]
    want_cut = hf.generate_until(cut, disable_tqdm=True)
    assert jx.generate_until(cut, disable_tqdm=True) == want_cut
    assert any(len(a) < len(b) for a, b in zip(want_cut, want))


def test_sampled_generation_is_seeded(pair):
    _, _, jx = pair
    req = [_req("generate_until", ("The weather", dict(until=[], max_gen_toks=8, do_sample=True, temperature=1.0)))]
    jx.seed, jx.calls = 3, 0
    a = jx.generate_until(req * 4, disable_tqdm=True)
    jx.calls = 0
    assert jx.generate_until(req * 4, disable_tqdm=True) == a
    assert len(set(a)) > 1  # rows draw their own tokens


def test_shipped_tasks_equal_hflm(tmp_path):
    """The shipped tasks (multiple choice, generation, perplexity), offline: the same per-sample scores and
    metrics from both backends."""
    d = _save(tmp_path / "m", "llama", context=256)
    tm = TaskManager(include_path=str(TASKS))
    tasks = ["jaxft_extract_mc", "jaxft_extract_gen", "jaxft_extract_ppl"]
    kw = dict(tasks=tasks, limit=6, task_manager=tm, log_samples=True)
    want = simple_evaluate(model="hf", model_args=f"pretrained={d},dtype=float32", device="cpu", batch_size=8, **kw)
    got = simple_evaluate(model=JaxftLM(d), **kw)
    for t in tasks:
        for a, b in zip(want["samples"][t], got["samples"][t]):
            ra, rb = a["resps"], b["resps"]
            if t == "jaxft_extract_gen":
                assert ra == rb
            else:
                va = [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for x in ra]
                vb = [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for x in rb]
                np.testing.assert_allclose(np.asarray(vb, float), np.asarray(va, float), atol=1e-4, rtol=0)
        for k, v in want["results"][t].items():
            if isinstance(v, float):
                assert got["results"][t][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (t, k)


def test_compiles_once_per_bucket_for_new_weights_and_lengths(tmp_path):
    a, b = _save(tmp_path / "a", "llama", seed=1), _save(tmp_path / "b", "llama", seed=2)
    lm_a, lm_b = JaxftLM(a, batch_tokens=128, pack_length=32), JaxftLM(b, batch_tokens=128, pack_length=32)
    req = lambda n, m: [((None, None), list(range(5, 5 + n)), list(range(100, 100 + m)))]  # noqa: E731
    before = score_calls()
    x = lm_a._loglikelihood_tokens(req(10, 3), disable_tqdm=True)
    assert score_calls() == before + 1
    y = lm_b._loglikelihood_tokens(req(25, 4), disable_tqdm=True)  # other weights, other lengths, same bucket
    z = lm_a._loglikelihood_tokens(req(12, 2) + req(7, 1), disable_tqdm=True)  # two requests in the row
    assert score_calls() == before + 1 and x[0][0] != y[0][0] and len(z) == 2


def test_packing_and_shared_inputs():
    from jaxft.lm_eval import Group, pack_shared

    groups = [Group((1, 2, 3), [0, 1, 2], [[7, 8], [9], []], [[7, 8, 5], [9, 6], [4]]),
              Group((5, 6), [3, 4], [[1], [2, 3, 4]], [[1, 0], [2, 3, 4, 0]])]
    sp, nxt = pack_shared(groups, 0, length=8, max_rows=2, max_suffix=8)
    assert nxt == 2 and sp.prefix[0].tolist() == [[1, 2, 3, 5, 6, 0, 0, 0]]
    # suffixes first fit, longest first; the second row because a row holds one continuation per context
    assert sp.suffix[0][:2, :5].tolist() == [[2, 3, 4, 7, 8], [9, 1, 0, 0, 0]] and sp.src[:2].tolist() == [0, 0]
    assert sp.suffix[2][:2, :5].tolist() == [[2, 2, 2, 1, 1], [1, 2, 0, 0, 0]]  # each context's segment id
    assert sp.suffix[1][:2, :5].tolist() == [[2, 3, 4, 3, 4], [3, 2, 0, 0, 0]]  # positions after the context
    assert sp.where[0] == [(0, 0, 0), (1, 0, 3), (1, 0, 4)] and sp.where[4] == [(0, 0, 4), (1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert [sp.where[2]] == [[(0, 0, 2)]]  # an empty suffix: only the context's last position

    assert share_inputs([(1, 2, 3), (1, 2), (4,), (1, 2, 3), (1, 2, 3, 4)]) == [4, 4, 2, 4, 4]
    p = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[(2, 11)], [(0, 12), (1, 13)], [(3, 14)]], length=6, rows=2)
    assert p.tokens.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert p.segment_ids.tolist() == [[2, 2, 2, 2, 1, 1], [1, 1, 1, 0, 0, 0]]  # numbered in input order
    assert p.positions[0].tolist() == [0, 1, 2, 3, 0, 1]
    assert [[(int(p.q_pos[r, c]), int(p.q_tok[r, c])) for r, c in w] for w in p.where] == \
        [[(2, 11)], [(4, 12), (5, 13)], [(3, 14)]]


def test_mesh_of_four_devices_gives_the_same_numbers(tmp_path):
    from jaxft.sharding import AXES

    d = _save(tmp_path / "m", "qwen2")
    mesh = jax.make_mesh((4, 1, 1), AXES, devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    one, four = JaxftLM(d, batch_tokens=256), JaxftLM(d, batch_tokens=256, mesh=mesh)
    reqs = [_req("loglikelihood", a, i) for i, a in enumerate(LL)]
    a, b = one.loglikelihood(reqs, disable_tqdm=True), four.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in b], [x[0] for x in a], atol=1e-5, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    gen = [_req("generate_until", (c, dict(until=[], max_gen_toks=6)), i) for i, c in enumerate(["Hi", "The sea"])]
    assert one.generate_until(gen, disable_tqdm=True) == four.generate_until(gen, disable_tqdm=True)


def test_run_directory_equals_its_merged_export_through_hflm(tmp_path):
    """A LoRA run read back by JaxftLM (its tuned weights) scores as HFLM on its fp32 merged export; base=True
    scores as HFLM on the base model."""
    from jaxft.commands.export import export
    from jaxft.commands.train import train
    from jaxft.config import load_config
    from jaxft.data.task import write_task_files

    d = _save(tmp_path / "m", "llama", context=256)
    data = write_task_files(tmp_path / "data", n_train=8, n_validation=0, n_test=0)
    run = load_config(None, [f"model.path={d}", f"data.train={data['train']}", "data.max_length=192",
                             "train.steps=2", "train.batch_size=4", "train.save_every=2", "train.eval_every=0",
                             "optim.lr=0.05", "optim.warmup_steps=0", "lora.r=4", "lora.alpha=8",
                             f"train.out_dir={tmp_path / 'run'}"])
    train(run, progress=False)
    merged, _ = export(run, "merged", tmp_path / "merged", dtype="fp32")
    reqs = [_req("loglikelihood", a, i) for i, a in enumerate(LL[:5])]
    for base, ref in ((False, merged), (True, d)):
        want = HFLM(pretrained=str(ref), dtype="float32", device="cpu", batch_size=4).loglikelihood(reqs, True)
        got = JaxftLM(str(tmp_path / "run"), base=base).loglikelihood(reqs, True)
        assert max(abs(a[0] - b[0]) for a, b in zip(want, got)) < 1e-4, base
    assert abs(want[0][0] - JaxftLM(str(tmp_path / "run")).loglikelihood(reqs[:1], True)[0][0]) > 1e-3  # tuned ≠ base

    # `jaxft lm-eval RUN --base`: both variants, lm-eval's tables and one side by side, one JSON
    from jaxft.commands.lm_eval import lm_eval_command

    out = tmp_path / "both.json"
    got = lm_eval_command(str(tmp_path / "run"), ["jaxft_extract_mc"], include_path=str(TASKS), limit=2, base=True,
                          output=str(out))
    saved = json.loads(out.read_text())
    assert list(got) == list(saved) == ["base", "tuned"] and "samples" not in saved["tuned"]
    assert saved["base"]["n-samples"]["jaxft_extract_mc"]["effective"] == 2


def test_adapter_of_a_bank_equals_hflm_with_peft(tmp_path):
    """--adapter NAME=DIR --use NAME: one PEFT adapter of a bank scores as HFLM with that adapter (peft=DIR)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = _save(tmp_path / "m", "qwen2")
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(d),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.5 * torch.randn_like(p))
        pm.save_pretrained(tmp_path / name)
    reqs = [_req("loglikelihood", a, i) for i, a in enumerate(LL)]
    lm = JaxftLM(d, adapters=[f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], use="b")
    got = lm.loglikelihood(reqs, True)
    want = HFLM(pretrained=str(d), peft=str(tmp_path / "b"), dtype="float32", device="cpu",
                batch_size=4).loglikelihood(reqs, True)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, got)) < 1e-4 and [a[1] for a in want] == [b[1] for b in got]
    lm.select("base")  # the bare base under the bank
    base = HFLM(pretrained=str(d), dtype="float32", device="cpu", batch_size=4).loglikelihood(reqs, True)
    assert max(abs(a[0] - b[0]) for a, b in zip(base, lm.loglikelihood(reqs, True))) < 1e-4


def test_cli_writes_results_and_prints_the_table(tmp_path):
    """`jaxft lm-eval` on a user's own task (a YAML with local data_files), offline: lm-eval's table and the
    results JSON, written atomically."""
    d = _save(tmp_path / "m", "llama", context=256)
    rows = [{"q": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "label": 0}
            for a, b in ((1, 2), (3, 4), (5, 6))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "res.json"
    r = run_cli("lm-eval", d, "--tasks", "sums", "--include-path", tmp_path / "tasks", "--output", out,
                "--log-samples")
    assert r.returncode == 0, r.stderr
    assert "sums" in r.stdout and "acc" in r.stdout
    res = json.loads(out.read_text())
    assert {"results", "configs", "n-samples", "samples"} <= set(res) and res["n-samples"]["sums"]["effective"] == 3
    r = run_cli("lm-eval", d, "--tasks", "no_such_task", "--include-path", tmp_path / "tasks")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no_such_task" in r.stderr


def test_cli_says_how_to_install_lm_eval(monkeypatch, capsys):
    import sys

    from jaxft import cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "jaxft.lm_eval", raising=False)
    monkeypatch.delitem(sys.modules, "jaxft.commands.lm_eval", raising=False)
    assert cli.main(["lm-eval", "example", "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "lm-eval" in err
