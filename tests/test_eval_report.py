"""`jaxft eval`'s K-shot column (eval.few_shot: fine-tune vs prompt) and its report.md: the K-shot prompts as
golden strings, never holding a held-out question; the report rendered from hand-made dicts; a tiny run end to end."""

import json

import pytest

from jaxft.commands.eval_report import read_lm_eval, render_report
from jaxft.config import load_config
from jaxft.data.prompts import few_shot, shot_pool, with_shots
from jaxft.data.task import make_examples
from jaxft.errors import JaxftError
from jaxft.generate import with_system
from tiny import ROOT, run_cli, save_chat_model, tiny_bpe_tokenizer

HELD = [{"role": "system", "content": "Held system"}, {"role": "user", "content": "What is the test question?"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def train_file(tmp_path):
    return _write(tmp_path / "train.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 1+1?"},
                      {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        # the held-out question with other spacing and its answer: must never be shown
        {"messages": [{"role": "user", "content": " What is  the test\nquestion? "},
                      {"role": "assistant", "content": "LEAKED"}]},
        {"prompt": "Colour of the sky?", "completion": "Blue"},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon"}]},
        {"text": "plain text has no answer"},
        {"messages": [{"role": "user", "content": "Largest planet?"}, {"role": "assistant", "content": "Jupiter"}]},
    ])


def test_k_shot_prompt_golden(train_file):
    """Seed 0 picks rows 3 and 1 of the 4 usable distinct ones (random.Random(0).sample); the prompt's own
    system turn stays first, the shots' system turns are dropped."""
    tok = tiny_bpe_tokenizer()
    shots = few_shot(shot_pool(train_file), 2, 0, [HELD])
    text = tok.apply_chat_template(with_shots(HELD, shots), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nHeld system<|im_end|>\n"
                    "<|im_start|>user\nLargest planet?<|im_end|>\n<|im_start|>assistant\nJupiter<|im_end|>\n"
                    "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
                    "<|im_start|>user\nWhat is the test question?<|im_end|>\n<|im_start|>assistant\n")
    # data.system_prompt (added by answer_chats' with_system) also stays first
    plain = with_system(with_shots(HELD[1:], few_shot(shot_pool(train_file), 1, 1, [HELD])), "Be brief.")
    assert tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
        "<|im_start|>user\nWhat is the test question?<|im_end|>\n<|im_start|>assistant\n")


def test_k_shot_never_shows_a_heldout_row_and_seed_decides(train_file):
    pool = shot_pool(train_file)
    picks = {}
    for seed in range(20):
        shots = few_shot(pool, 4, seed, [HELD])
        assert "LEAKED" not in json.dumps(shots) and "test" not in json.dumps(shots)
        assert [m["role"] for m in shots] == ["user", "assistant"] * 4
        assert shots == few_shot(pool, 4, seed, [HELD])  # deterministic
        picks[seed] = tuple(m["content"] for m in shots)
    assert len(set(picks.values())) > 1  # the seed changes the choice (and the order)
    assert "LEAKED" in json.dumps(few_shot(pool, 5, 0, []))  # it is the held-out prompts that keep it out
    with pytest.raises(JaxftError, match=r"^eval\.few_shot=5: .*train\.jsonl has only 4 distinct rows") as e:
        few_shot(pool, 5, 0, [HELD], train_file)
    assert "\n" not in str(e.value)


def test_k_shot_from_preference_rows_uses_the_chosen_answer(tmp_path):
    f = _write(tmp_path / "pairs.jsonl", [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
                                          {"prompt": [{"role": "user", "content": "Count to 2."}],
                                           "chosen": [{"role": "assistant", "content": "1 2"}],
                                           "rejected": [{"role": "assistant", "content": "3"}]}])
    shots = few_shot(shot_pool(f), 2, 0, [])
    assert sorted((shots[i]["content"], shots[i + 1]["content"]) for i in (0, 2)) == [("Count to 2.", "1 2"),
                                                                                       ("Say hi.", "Hi!")]
    # prompt-only rows (GRPO / RLOO) have no answer to show
    g = _write(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "solution": "4"}])
    with pytest.raises(JaxftError, match=r"has only 0 distinct rows .*\(prompt-only rows, as GRPO's, have no answer"):
        few_shot(shot_pool(g), 1, 0, [], g)


SUMMARY = {
    "base": {"eval_loss": 2.5, "eval_ppl": 12.182493960703473, "exact_match": 0.125, "n": 8.0},
    "base_3shot": {"exact_match": 0.5, "n": 8.0},
    "tuned": {"eval_loss": 1.25, "eval_ppl": 3.4903429574618414, "exact_match": 0.875, "n": 8.0,
              "reg_kl_mean": 0.0123, "reg_kl_p95": 0.05, "reg_ce_increase": 0.02, "reg_top1_agree": 0.97,
              "reg_changed": 0.1},
    "export": {"exact_match": 0.875, "exp_kl_mean": 0.0004, "exp_top1_agree": 0.999},
}
LM_EVAL = {"base": {"results": {"jaxft_extract_mc": {"alias": "jaxft_extract_mc", "acc,none": 0.25,
                                                     "acc_stderr,none": 0.0625}}},
           "tuned": {"results": {"jaxft_extract_mc": {"alias": "jaxft_extract_mc", "acc,none": 0.75,
                                                      "acc_stderr,none": 0.0625},
                                 "jaxft_extract_gen": {"exact_match,strict": 0.5, "exact_match_stderr,strict": "N/A"}}}}

GOLDEN = """\
# Evaluation report

## Task

| metric | base | base, 3-shot | tuned | export |
|---|---:|---:|---:|---:|
| eval_loss | 2.5000 | — | 1.2500 | — |
| eval_ppl | 12.1825 | — | 3.4903 | — |
| exact_match | 0.1250 | 0.5000 | 0.8750 | 0.8750 |
| n | 8.0000 | 8.0000 | 8.0000 | — |

- `eval_loss`: the objective's validation loss (SFT: mean token cross-entropy on the validation split)
- `eval_ppl`: validation perplexity, exp(eval_loss)
- `exact_match`: share of held-out answers equal to the reference (whitespace-trimmed)
- `n`: held-out prompts the generation metric was measured on
- column `base, 3-shot` (base_3shot): the base model prompted with 3 training examples as earlier chat turns, \
no fine-tuning: does fine-tuning beat prompting on this task?

## Regression against the base

General prompts, not the task: how far each variant moved from the base model's behaviour.

| metric | tuned |
|---|---:|
| reg_kl_mean | 0.0123 |
| reg_kl_p95 | 0.0500 |
| reg_ce_increase | 0.0200 |
| reg_top1_agree | 0.9700 |
| reg_changed | 0.1000 |

- `reg_kl_mean`: mean per-token KL(base || variant) on the base model's own greedy answers to the general \
prompts, nats: 0 is the base's distribution exactly.
- `reg_kl_p95`: 95th percentile of that per-token KL: the worst tokens, where a change of behaviour shows first.
- `reg_ce_increase`: the variant's cross-entropy on those answers minus the base's, nats / token: how much less \
likely it finds what the base would say; above 0 is forgetting.
- `reg_top1_agree`: share of answer tokens where the variant's top-1 token is the base's: 1 means the same greedy \
choices.
- `reg_changed`: share of general prompts whose greedy answer would change (the variant's top-1 leaves the base's \
answer somewhere): how often a user would notice.

## What the export costs

| metric | export |
|---|---:|
| exp_kl_mean | 4.00e-04 |
| exp_top1_agree | 0.9990 |

- `exp_kl_mean`: mean per-token KL(fp32 tuned || export) on the tuned model's answers to the held-out prompts, \
nats (llama.cpp's `--kl-divergence`): the quality the export costs.
- `exp_top1_agree`: share of answer tokens where the export's top-1 token is the fp32 tuned model's.

## lm-evaluation-harness

| task | metric | base | tuned |
|---|---|---:|---:|
| jaxft_extract_mc | acc | 0.2500 ± 0.0625 | 0.7500 ± 0.0625 |
| jaxft_extract_gen | exact_match (strict) | — | 0.5000 |

## Plots

- [variants side by side](compare.png)
"""


def test_render_report_golden():
    assert render_report(SUMMARY, LM_EVAL, [("variants side by side", "compare.png")]) == GOLDEN
    # one simple_evaluate dict (jaxft lm-eval without --base): one value column; nothing but the task: no sections
    one = render_report({"base": {"exact_match": 0.5}}, LM_EVAL["tuned"])
    assert "| task | metric | value |" in one and "| jaxft_extract_mc | acc | 0.7500 ± 0.0625 |" in one
    assert "## Regression" not in one and "## What the export" not in one and "## Plots" not in one


def test_read_lm_eval(tmp_path):
    assert read_lm_eval(tmp_path) is None  # nothing there: no section
    (tmp_path / "lm_eval.json").write_text(json.dumps(LM_EVAL))
    assert read_lm_eval(tmp_path) == LM_EVAL
    bad = tmp_path / "bad.json"
    bad.write_text('{"acc": 1}')
    with pytest.raises(JaxftError, match=r"bad\.json: not lm-eval results"):
        read_lm_eval(tmp_path, bad)
    with pytest.raises(JaxftError, match=r"^--lm-eval .*nope\.json: no such file$"):
        read_lm_eval(tmp_path, tmp_path / "nope.json")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny chat model with room for a 2-shot prompt of the task (3 rows of ~110 tokens)."""
    d = tmp_path_factory.mktemp("long_model")
    save_chat_model(d, max_position_embeddings=1024)
    return d


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    rows = make_examples(46, seed=3)
    # two held-out rows are training rows too: one among the 4 evaluated (eval.max_examples), one past them
    _write(d / "train.jsonl", rows[:40] + rows[40:41] + rows[45:46])
    _write(d / "validation.jsonl", rows[40:])
    return d


def _overrides(model, task_data, out, **extra):
    o = {"model.path": model, "data.train": task_data / "train.jsonl", "data.validation": task_data / "validation.jsonl",
         "data.max_length": 256, "train.batch_size": 2, "train.steps": 2, "train.out_dir": out, "lora.r": 4,
         "lora.alpha": 8, "eval.max_new_tokens": 4, "eval.max_examples": 4, "eval.batch_size": 4,
         "eval.metric": "json_fields"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_eval_few_shot_column_and_report_end_to_end(long_model, task_data, tmp_path):
    from jaxft.commands.evaluate import evaluate
    from jaxft.commands.train import train

    out = tmp_path / "run"
    train(load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(long_model, task_data, out)), progress=False)
    res = evaluate(load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(long_model, task_data, out)),
                   progress=False)
    assert list(res) == ["base", "tuned"] and not (out / "eval" / "lm_eval.json").exists()
    assert "| metric | base | tuned |" in (out / "eval" / "report.md").read_text()
    # an lm-eval result put in the eval folder is kept by the next evaluation and shown in its report
    (out / "eval" / "lm_eval.json").write_text(json.dumps(LM_EVAL["tuned"]))
    r = run_cli("eval", out, "eval.few_shot=2", "--overwrite", timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'eval' / 'report.md'}" in r.stderr
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert list(summary) == ["base", "base_2shot", "tuned"] and set(summary["base_2shot"]) == {"valid_json", "exact",
                                                                                              "field_accuracy", "n"}
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(row["base_2shot"], str) for row in rows)
    report = (out / "eval" / "report.md").read_text()
    assert report == render_report(summary, LM_EVAL["tuned"], [("training loss", "../loss.png")])
    assert "| metric | base | base, 2-shot | tuned |" in report and "| jaxft_extract_mc | acc |" in report


def test_eval_few_shot_refusals(chat_model, task_data, tmp_path):
    """A K-shot prompt past the model's context (the tiny model's 256 tokens) is refused naming K, before any
    generation; so is K beyond the training rows."""
    from jaxft.commands.evaluate import evaluate

    def run(**kw):
        return load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(chat_model, task_data, tmp_path / "run",
                                                                          **kw))

    with pytest.raises(JaxftError, match=r"^eval\.few_shot=2: the longest 2-shot prompt is \d+ tokens; .*context of "
                                         r"256 tokens \(lower eval\.few_shot\)$"):
        evaluate(run(**{"eval.few_shot": 2}), base_only=True, progress=False)
    with pytest.raises(JaxftError, match=r"^eval\.few_shot=50: .*train\.jsonl has only 40 distinct rows"):
        evaluate(run(**{"eval.few_shot": 50}), base_only=True, progress=False)
    with pytest.raises(JaxftError, match=r"eval\.few_shot=1: needs a generation metric"):
        evaluate(run(**{"eval.few_shot": 1, "eval.metric": "none"}), base_only=True, progress=False)


def test_adapter_compare_has_the_k_shot_column_as_evaluate_alone(long_model, task_data, tmp_path):
    """`--adapter` mode: the K-shot prompts ride in the mixed-adapter batches (adapter id -1, the base) and
    answer as `jaxft eval --base-only` answers them; report.md shows the column and compare.png."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxft.commands.evaluate import compare, evaluate

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(long_model),
                        PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "a")
    o = _overrides(long_model, task_data, tmp_path / "cmp", **{"eval.few_shot": 1, "eval.few_shot_seed": 3})
    got = compare(load_config(None, o), [f"a={tmp_path / 'a'}"], progress=False)
    assert list(got) == ["base", "base_1shot", "a"]
    alone = evaluate(load_config(None, [*o, f"train.out_dir={tmp_path / 'alone'}"]), base_only=True, progress=False)
    assert alone["base_1shot"] == got["base_1shot"]

    def answers(d):
        return [json.loads(line)["base_1shot"] for line in (d / "eval" / "predictions.jsonl").read_text().splitlines()]

    assert answers(tmp_path / "cmp") == answers(tmp_path / "alone")
    report = (tmp_path / "cmp" / "eval" / "report.md").read_text()
    assert "| metric | base | base, 1-shot | a |" in report and "[variants side by side](compare.png)" in report
