"""Constitutional AI: constitution files, the prompts each stage renders (golden strings), feedback
probabilities against transformers, resume, soft labels in DPO and the reward model, outputs that load
through `jaxft train`, and bad input."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.commands import cai
from jaxft.config import DataConfig, DpoConfig, load_config
from jaxft.data.constitution import load_constitution
from jaxft.errors import JaxftError
from jaxft.objectives import dpo, reward_model
from jaxft.data.pairs import PairBatches, load_pairs
from jaxft.data.task import make_examples
from tiny import example_tokenizer, run_cli

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "configs" / "constitutions" / "task.yaml"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chatml(*turns, generation=True):
    """SmolLM2's ChatML rendering (its template adds this system turn when there is none)."""
    text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    text += "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation else "")


# ---------------------------------------------------------------- constitutions


def test_shipped_constitutions_load():
    for name in ("default", "task"):
        c = load_constitution(ROOT / "configs" / "constitutions" / f"{name}.yaml")
        assert c.revisers() == c.comparers() == c.principles and len(c.principles) >= 5
        assert len(c.few_shot) % 6 == 0 and c.few_shot[2]["content"] in {p.critique for p in c.principles}


def test_released_json_layouts(tmp_path):
    """Anthropic's and llm-swarm's layouts (texts here are ours): the separators are taken off."""
    a = _write(tmp_path / "x.json", [])
    a.write_text(json.dumps({
        "rude0": {"prompt": ["\n\nCritiqueRequest: Say where the reply is rude.\n\nCritique:"],
                  "edit_request": "\n\nRevisionRequest: Make the reply polite.\n\nRevision:"},
        "vague1": {"prompt": ["\n\nCritique Request: Say what is vague.\n\nCritique:"],
                   "edit_request": "\n\nRevision Request: Make it precise.\n\nRevision:"}}))
    c = load_constitution(a)
    assert [(p.name, p.critique, p.revision, p.compare) for p in c.principles] == [
        ("rude0", "Say where the reply is rude.", "Make the reply polite.", None),
        ("vague1", "Say what is vague.", "Make it precise.", None)]
    with pytest.raises(JaxftError, match="no principle has a comparison question"):
        c.comparers()
    m = tmp_path / "m.json"
    m.write_text(json.dumps(["\nWhich reply is kinder? Options:", "\nWhich reply is shorter? Options:"]))
    assert [p.compare for p in load_constitution(m).principles] == ["Which reply is kinder?", "Which reply is shorter?"]
    s = tmp_path / "s.json"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    s.write_text(json.dumps({"constitutions": [{"critic": "Find flaws.", "revision": "Fix them."}],
                             "system_chat": [chat], "feedback_principles": ["Which is better?"]}))
    c = load_constitution(s)
    assert c.few_shot == tuple(chat) and c.revisers()[0].critique == "Find flaws."
    assert c.comparers()[0].compare == "Which is better?"


@pytest.mark.parametrize("body, match", [
    ("principles: [{name: a, critique: x}]", r"principle 'a': revision: missing"),
    ("principles: [{name: a, critique: x, revision: '  '}]", r"principle 'a': revision: is empty"),
    ("principles: [{name: a, compare: 3}]", r"principle 'a': compare: expected a string"),
    ("principles: [{critique: x, revision: y}]", r"principle #1: name: missing"),
    ("principles: [{name: a, compare: q, colour: red}]", r"principle 'a': colour: unknown field"),
    ("principles: [{name: a, compare: q}, {name: a, compare: r}]", r"principle 'a': name: used twice"),
    ("principles: [{name: a}]", r"principle 'a': critique: missing"),
    ("principles: [{name: a, compare: q}]\nexamples: [{principle: a, prompt: p, answer: a, critique: c, "
     "revision: r}]", r"example #1: principle: 'a' is not a principle with critique"),
    ("principles: []", r"principles: none given"),
    ("rules: []", r"not a constitution"),
    ("principles: [", r"not valid YAML"),
])
def test_bad_constitution_is_one_line(tmp_path, body, match):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    with pytest.raises(JaxftError, match=match) as e:
        load_constitution(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


# ---------------------------------------------------------------- prompts: golden strings


def test_principle_schedule_is_a_function_of_seed_row_step():
    assert [cai.draw_principle(0, r, s, 5) for r in range(3) for s in range(2)] == [4, 4, 2, 3, 4, 4]
    assert cai.draw_comparisons(0, 3, 3, 5) == [1, 2, 3] and cai.draw_comparisons(0, 3, 9, 5) == [1, 3, 2, 0, 4]


def test_stage_prompts_render_as_constitution_and_template_say():
    tok, c = example_tokenizer(), load_constitution(TASK)
    p = c.principles[cai.draw_principle(0, 0, 0, len(c.principles))]  # row 0, round 0 → index 4
    assert p.name == "faithful"
    prompt = [{"role": "user", "content": "Extract: Ana, Leeds"}]
    conv = [*prompt, {"role": "assistant", "content": "{}"}]
    assert cai.render(tok, cai.critique_turns(conv, p)) == _chatml(
        ("user", "Extract: Ana, Leeds"), ("assistant", "{}"), ("user", p.critique))
    assert p.critique.startswith("Compare each value with the record: is the name without a title")
    assert cai.render(tok, cai.revision_turns(conv, p, "It is empty.")) == _chatml(
        ("user", "Extract: Ana, Leeds"), ("assistant", "{}"), ("user", p.critique), ("assistant", "It is empty."),
        ("user", p.revision))
    few = list(c.few_shot)  # the worked example: six turns before the conversation
    assert cai.render(tok, few + prompt) == _chatml(*[(m["role"], m["content"]) for m in few],
                                                    ("user", "Extract: Ana, Leeds"))
    q = c.principles[0].compare
    want = (f"{cai.FEEDBACK_INTRO}\n\nUser: Extract: Ana, Leeds\n\n{q}\n\n(A) one\n\n(B) two\n\n"
            "Answer with (A) or (B).")
    assert cai.feedback_text(prompt, q, "one", "two") == want
    assert cai.feedback_prompt(tok, prompt, q, "one", "two") == _chatml(("user", want)) + "The better reply is ("
    assert cai.option_ids(tok).tolist() == [49, 50]


def test_prompt_rows_and_skips(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
            {"prompt": "just text"},
            {"messages": [{"role": "assistant", "content": "only me"}]},
            {"prompt": [{"role": "user", "content": "   "}]},
            {"other": 1}, [1, 2]]
    got, skipped = cai.read_prompts(str(_write(tmp_path / "p.jsonl", rows)))
    assert got == [(0, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]),
                   (1, [{"role": "user", "content": "just text"}])]
    assert skipped == {"no user turn": 2, "missing field": 1, "wrong type": 1}
    with pytest.raises(JaxftError, match="no usable prompts"):
        cai.read_prompts(str(_write(tmp_path / "q.jsonl", rows[2:])))


# ---------------------------------------------------------------- stages with a stub model (no generation)


class Stub:
    """A Policy stand-in: scripted answers and judge log-probs keyed by the prompt text."""

    def __init__(self, answers, logps=None):
        self.name, self.stats, self.tokenizer = "stub", {}, example_tokenizer()
        self.answers, self.logps, self.seen = answers, logps or {}, []

    def answer(self, conversations, sampling):
        out = []
        for c in conversations:
            text = self.answers(c)
            out.append(dict(text=text, prompt_tokens=1, tokens=len(text), truncated=False))
        return out

    def option_logprobs(self, texts, batch_size):
        self.seen += texts
        return np.array([self.logps.get(t, (-1.0, -1.0)) for t in texts])


def _run(tmp_path, prompts, **cai_kw):
    kw = {"cai.prompts": prompts, "cai.out_dir": tmp_path / "out", "cai.constitution": TASK, "cai.batch_size": 2,
          "cai.few_shot": False, **{f"cai.{k}": v for k, v in cai_kw.items()}}
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


def test_empty_generations_are_counted_skips(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(4)])

    def answers(conv):  # q0: empty answer; q1: every revision empty; q2, q3: fine
        user = conv[0]["content"]
        last = conv[-1]["content"]
        if len(conv) == 1:
            return "" if user == "q0" else f"answer {user}"
        is_revision = any(last == p.revision for p in load_constitution(TASK).principles)
        return "" if is_revision and user == "q1" else f"{'rev' if is_revision else 'crit'} {user}"

    s = cai.revise(_run(tmp_path, prompts, revisions=2), policy=Stub(answers))
    assert s["skipped"] == {"empty answer": 1, "empty revisions": 1} and s["sft_rows"] == 2
    sft = [json.loads(x) for x in (tmp_path / "out" / "revise" / "sft.jsonl").read_text().splitlines()]
    assert sft[0] == {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "rev q2"}]}
    trace = [json.loads(x) for x in (tmp_path / "out" / "revise" / "trace.jsonl").read_text().splitlines()]
    assert [len(t["steps"]) for t in trace] == [0, 2, 2, 2] and trace[0]["skipped"] == "empty answer"
    names = [cai.draw_principle(0, 2, k, 5) for k in range(2)]
    assert [st["principle"] for st in trace[2]["steps"]] == [load_constitution(TASK).principles[n].name for n in names]


def test_label_averages_principles_and_orders_by_hand(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "q0"}, {"prompt": "same"}, {"prompt": "q2"}])
    calls = {}

    def answers(conv):  # two different answers per prompt, except "same"
        u = conv[0]["content"]
        calls[u] = calls.get(u, 0) + 1
        return "x" if u == "same" else f"{u}-{calls[u]}"

    tok, c = example_tokenizer(), load_constitution(TASK)
    picked = [c.principles[k] for k in cai.draw_comparisons(0, 0, 2, 5)]
    prompt = [{"role": "user", "content": "q0"}]
    lp = {}
    for j, p in enumerate(picked):  # row 0: chosen log-probs per principle and order
        lp[cai.feedback_prompt(tok, prompt, p.compare, "q0-1", "q0-2")] = (-0.2 - j, -1.5)  # AB
        lp[cai.feedback_prompt(tok, prompt, p.compare, "q0-2", "q0-1")] = (-0.9, -0.4 + j)  # BA
    run = _run(tmp_path, prompts, principles_per_pair=2, clamp="[0.3,0.7]")
    s = cai.label(run, policy=Stub(answers), feedback=Stub(answers, lp))
    assert s["pairs"] == 2 and s["skipped"] == {"identical answers": 1}
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731 — softmax([a, b])[0] = σ(a − b)
    want = np.mean([sig(-0.2 - 0 + 1.5), sig(-0.2 - 1 + 1.5), sig(-0.4 + 0.9), sig(-0.4 + 1 + 0.9)])
    trace = [json.loads(x) for x in (tmp_path / "out" / "label" / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["p_first"] == pytest.approx(want, abs=1e-12)
    pairs = [json.loads(x) for x in (tmp_path / "out" / "label" / "pairs.jsonl").read_text().splitlines()]
    first_wins = want >= 0.5
    assert pairs[0]["chosen"][0]["content"] == ("q0-1" if first_wins else "q0-2")
    assert pairs[0]["confidence"] == pytest.approx(min(max(want, 1 - want), 0.7), abs=1e-12)
    assert pairs[1]["confidence"] == 0.5  # no log-probs scripted: (-1, -1) everywhere → exactly even
    assert all(0.5 <= p["confidence"] <= 0.7 for p in pairs)


# ---------------------------------------------------------------- the real model: generation, scoring, resume


@pytest.fixture(scope="module")
def tiny_run(chat_model, tmp_path_factory):
    """Short prompts (few shape buckets, few compiles), 2 chunks of 2; one uninterrupted revise and label."""
    d = tmp_path_factory.mktemp("cai")
    prompts = _write(d / "prompts.jsonl", [{"prompt": w} for w in ("Name a city.", "Say hi.", "Add 2 and 2.", "Why?")])
    run = load_config(None, [f"model.path={chat_model}", f"cai.prompts={prompts}", f"cai.constitution={TASK}",
                             f"cai.out_dir={d / 'out'}", "cai.batch_size=2", "cai.max_new_tokens=6",
                             "cai.few_shot=false", "cai.principles_per_pair=2", "cai.temperature=1.0"])
    policy = cai.load_policy(run)
    return run, policy, cai.revise(run, d / "whole", policy), cai.label(run, d / "label", policy)


def test_feedback_probabilities_equal_transformers(chat_model, tiny_run):
    from transformers import AutoModelForCausalLM

    run, policy, *_ = tiny_run
    tok = policy.tokenizer
    prompt = [{"role": "user", "content": "Which city?"}]
    q = load_constitution(TASK).principles[1].compare
    texts = [cai.feedback_prompt(tok, prompt, q, "Lisbon", "{\"city\": \"Porto\"}"),
             cai.feedback_prompt(tok, prompt, q, "{\"city\": \"Porto\"}", "Lisbon")]
    got = policy.option_logprobs(texts, batch_size=2)  # one left-padded batch of both orders
    hf = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    opts = cai.option_ids(tok).tolist()
    want = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            want.append(torch.log_softmax(hf(ids).logits[0, -1].double(), -1)[opts].numpy())
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    p_hf = [np.exp(w[0]) / np.exp(w).sum() for w in want]  # softmax over the two options, each order
    (v,) = cai.judge(policy, [prompt], [("Lisbon", "{\"city\": \"Porto\"}")],
                     [[load_constitution(TASK).principles[1]]], run.cai)
    assert [x[-1] for x in v["votes"]] == pytest.approx([p_hf[0], 1 - p_hf[1]], abs=1e-5)
    assert v["p"] == pytest.approx((p_hf[0] + 1 - p_hf[1]) / 2, abs=1e-5)
    (same,) = cai.judge(policy, [prompt], [("Lisbon", "Lisbon")], [[load_constitution(TASK).principles[1]]], run.cai)
    assert same["p"] == pytest.approx(0.5, abs=1e-12)  # both orders cancel the position bias exactly


def test_option_scoring_compiles_once_for_new_weights(tiny_run):
    policy = tiny_run[1]
    texts = ["<|im_start|>user\nhello there<|im_end|>\n(", "<|im_start|>user\nbye<|im_end|>\n("]
    policy.option_logprobs(texts, 2)
    before = cai._option_logprobs._cache_size()
    moved = jax.tree.map(lambda x: x * 1.01 if jnp.issubdtype(x.dtype, jnp.floating) else x, policy.weights)
    other = dataclasses.replace(policy, weights=moved)
    a, b = policy.option_logprobs(texts, 2), other.option_logprobs(texts, 2)
    assert cai._option_logprobs._cache_size() == before and np.abs(a - b).max() > 1e-6


def test_revise_resume_after_a_crash_equals_an_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    run, policy, whole, _ = tiny_run
    assert whole["prompts"] == 4 and whole["sft_rows"] + sum(whole["skipped"].values()) == 4
    done = Path(whole["out"]).parent
    real, writes = cai.write_chunk, []

    def crash_on_second(path, rows):
        if writes:
            raise KeyboardInterrupt  # killed while the second chunk is written: nothing of it lands
        writes.append(path)
        real(path, rows)

    monkeypatch.setattr(cai, "write_chunk", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        cai.revise(run, tmp_path / "resumed", policy)
    assert sorted(p.name for p in (tmp_path / "resumed" / "chunks").iterdir()) == ["00000.jsonl"]
    monkeypatch.setattr(cai, "write_chunk", real)
    cai.revise(run, tmp_path / "resumed", policy)
    for f in ("sft.jsonl", "trace.jsonl", "chunks/00000.jsonl", "chunks/00001.jsonl"):
        assert (tmp_path / "resumed" / f).read_bytes() == (done / f).read_bytes(), f
    trace = [json.loads(x) for x in (done / "trace.jsonl").read_text().splitlines()]
    assert all(len(t["steps"]) == 1 and t["steps"][0]["tokens"][0] <= 6 for t in trace if not t["skipped"])
    other = dataclasses.replace(run, cai=dataclasses.replace(run.cai, temperature=0.5))
    with pytest.raises(JaxftError, match="holds chunks of other settings"):
        cai.revise(other, done, policy)


def test_outputs_train_as_sft_and_dpo(tiny_run, tmp_path):
    """sft.jsonl and pairs.jsonl (with confidence) go through `jaxft train` unchanged."""
    from jaxft.commands.train import train

    run, _, rev, lab = tiny_run
    assert lab["pairs"] + sum(lab["skipped"].values()) == 4
    pairs = [json.loads(x) for x in Path(lab["out"]).read_text().splitlines()]
    assert all(set(p) == {"prompt", "chosen", "rejected", "confidence"} and p["confidence"] >= 0.5 for p in pairs)
    common = [f"model.path={run.model.path}", "train.steps=1", "train.batch_size=2", "lora.r=4", "lora.alpha=8",
              "data.max_length=128", "data.validation=null", "eval.file=null"]
    last = train(load_config(ROOT / "configs" / "sft_lora.yaml", common + [
        f"data.train={rev['out']}", f"train.out_dir={tmp_path / 'sft'}"]), progress=False)
    assert math.isfinite(last["loss"]) and last["step"] == 1
    last = train(load_config(ROOT / "configs" / "dpo_lora.yaml", common + [
        f"data.train={lab['out']}", f"train.out_dir={tmp_path / 'dpo'}"]), progress=False)
    assert last["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference


# ---------------------------------------------------------------- soft labels in the losses


def test_constant_confidence_is_exactly_cdpo(tmp_path):
    tok = example_tokenizer()
    rows = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
             "rejected": [{"role": "assistant", "content": "no"}]} for r in make_examples(5, seed=0)]
    hard = _write(tmp_path / "hard.jsonl", rows)
    soft = _write(tmp_path / "soft.jsonl", [dict(r, confidence=0.9) for r in rows])
    b_soft = PairBatches(load_pairs(DataConfig(train=str(soft), max_length=192), DpoConfig(), tok)[0], 4, 192, 0)
    b_hard = PairBatches(load_pairs(DataConfig(train=str(hard), max_length=192), DpoConfig(), tok)[0], 4, 192, 0)
    batch = b_soft.batch(0)
    assert "confidence" not in b_hard.batch(0)
    np.testing.assert_array_equal(batch["smoothing"], np.float32(0.1))  # 1 − 0.9 taken in float64
    g = np.random.default_rng(0)
    lp = [jnp.asarray(-g.random(4).astype(np.float32) * 20) for _ in range(4)]
    lens = jnp.full(4, 7.0)
    for loss_type in ("sigmoid", "simpo"):
        cfg = DpoConfig(loss_type=loss_type, beta=0.3, label_smoothing=0.1)
        ref = jax.jit(lambda *a: dpo.pair_losses(cfg, *a)[0])(lp[0], lp[1], lens, lens, lp[2], lp[3])
        soft_cfg = dataclasses.replace(cfg, label_smoothing=0.0)
        got = jax.jit(lambda s, *a: dpo.pair_losses(soft_cfg, *a, soft=s)[0])(
            (jnp.asarray(batch["confidence"]), jnp.asarray(batch["smoothing"])), lp[0], lp[1], lens, lens, lp[2], lp[3])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_soft_dpo_gradient_and_data_checks(tmp_path):
    cfg = DpoConfig(beta=0.5)
    h, p = jnp.array([0.3, -1.2, 2.0]), jnp.array([0.9, 0.6, 0.5])
    zero = jnp.zeros(3)
    grad = jax.grad(lambda c: jnp.sum(dpo.pair_losses(cfg, c, zero, 1.0, 1.0, zero, zero, soft=(p, 1 - p))[0]))(h)
    np.testing.assert_allclose(grad, 0.5 * (jax.nn.sigmoid(0.5 * h) - p), atol=1e-6)  # ∂L/∂h = β(σ(βh) − p)
    tok = example_tokenizer()
    base = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = _write(tmp_path / "bad.jsonl", [dict(base, confidence=1.5), dict(base, confidence=0.7)])
    pairs, report = load_pairs(DataConfig(train=str(bad), max_length=64), DpoConfig(), tok)
    assert len(pairs) == 1 and report.skipped == 1 and "in [0, 1]" in report.first_errors[0]
    mixed = _write(tmp_path / "mixed.jsonl", [base, dict(base, confidence=0.7)])
    with pytest.raises(JaxftError, match=r"mixed.jsonl:2: 'confidence' is given on some rows only"):
        load_pairs(DataConfig(train=str(mixed), max_length=64), DpoConfig(), tok)


def test_soft_label_reward_loss_matches_its_formula():
    rc, rr = jnp.array([1.0, -0.5, 2.0, 0.1]), jnp.array([0.2, 0.5, -1.0, 0.1])
    p, m = jnp.array([0.8, 0.55, 1.0, 0.3]), jnp.array([0.0, 0.1, 0.5, 0.0])
    got, _ = reward_model.pair_losses(rc, rr, m, None, (p, 1 - p))
    d = np.asarray(rc - rr - m, np.float64)
    want = -(np.asarray(p) * -np.log1p(np.exp(-d)) + (1 - np.asarray(p)) * -np.log1p(np.exp(d)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    one = jnp.ones(4)
    np.testing.assert_array_equal(reward_model.pair_losses(rc, rr, m, None, (one, 1 - one))[0],
                                  reward_model.pair_losses(rc, rr, m)[0])  # confidence 1 = the hard loss


def test_cli_bad_constitution_is_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles: [{name: kind, critique: be kind}]")
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    r = run_cli("cai", "revise", ROOT / "configs" / "cai_task.yaml", f"cai.constitution={bad}",
                f"cai.prompts={prompts}", f"cai.out_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "principle 'kind': revision: missing" in r.stderr


def test_sharded_mesh_gives_the_same_answers_and_labels(tiny_run):
    """Rows split over a data=2 mesh (weights placed on it): the same greedy answers and option log-probs."""
    from jaxft.generate import Sampling
    from jaxft.sharding import make_mesh

    run, policy, *_ = tiny_run
    mesh_run = dataclasses.replace(run, mesh=dataclasses.replace(run.mesh, data=2))
    sharded = cai.load_policy(mesh_run, mesh=make_mesh(mesh_run.mesh))
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a city."}]]
    greedy = Sampling(max_new_tokens=4)
    assert [a["text"] for a in sharded.answer(convs, greedy)] == [a["text"] for a in policy.answer(convs, greedy)]
    texts = [cai.render(policy.tokenizer, c) + cai.FEEDBACK_PREFIX for c in convs]
    np.testing.assert_allclose(sharded.option_logprobs(texts, 2), policy.option_logprobs(texts, 2), atol=1e-5)
