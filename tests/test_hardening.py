"""Regressions of issue 20 (hardening), one test per case: no input crashes a run, no run writes a
poisoned checkpoint, `--resume` never silently restarts, flags and overrides parse in any order."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.formats.hf import load_pretrained
from jaxft import adapters
from jaxft.checkpoint import Checkpoints
from jaxft.cli import _parse
from jaxft.config import DataConfig, DpoConfig, LoraConfig, OptimConfig, RunConfig, TrainConfig, check_files, load_config
from jaxft.data.encode import load_examples
from jaxft.errors import JaxftError
from jaxft.data.pairs import load_pairs
from jaxft.data.prepare import prepare
from jaxft.optim import make_optimizer
from jaxft.train import init_state, make_train_step
from tiny import ROOT, example_tokenizer, run_cli, save_model

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
GOOD2 = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
DEEP = "[" * 5000 + "]" * 5000  # json's decoder recurses once per level: RecursionError on main
SURROGATE = '{"messages": [{"role": "user", "content": "a \\ud83d b"}, {"role": "assistant", "content": "x"}]}'
SURROGATE_PAIR = '{"prompt": "p", "chosen": "ok \\udc00", "rejected": "no"}'


@pytest.fixture(scope="module")
def tok():
    return example_tokenizer()


def _jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------- the row reader


@pytest.mark.parametrize("bad,reason", [(DEEP, "too deeply nested"), (SURROGATE, "invalid text"),
                                        ('{"text": ' + "1" * 5000 + "}", "invalid JSON")],
                         ids=["deep", "surrogate", "5000-digit number"])
def test_bad_row_is_a_counted_skip_with_file_line(tmp_path, tok, bad, reason):
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD2])
    examples, r = load_examples(DataConfig(train=str(path)), tok)
    assert len(examples) == 2 and r.skipped == 1 and r.skipped_by_reason == {reason: 1}
    assert r.first_errors[0].startswith(f"{path}:2: ")
    with pytest.raises(JaxftError, match=re.escape(f"{path}:2: ")) as e:
        load_examples(DataConfig(train=str(path), strict=True), tok)
    assert "\n" not in str(e.value)


def test_json_array_rows_fail_one_by_one(tmp_path, tok):
    """A .json array: a row too deep or with a 5000-digit number is one bad row, not a failed file."""
    path = tmp_path / "train.json"
    path.write_text("[" + ", ".join([json.dumps(GOOD), DEEP, "1" * 5000, json.dumps(GOOD2)]) + "]")
    examples, r = load_examples(DataConfig(train=str(path)), tok)
    assert (len(examples), r.rows, r.skipped) == (2, 4, 2)
    assert [e.split(":")[0] for e in r.first_errors] == [f"{path} row 1", f"{path} row 2"]


def test_surrogate_in_a_preference_pair_is_a_counted_skip(tmp_path, tok):
    path = _jsonl(tmp_path / "pairs.jsonl", [PAIR, SURROGATE_PAIR, DEEP, PAIR])
    pairs, r = load_pairs(DataConfig(train=str(path)), DpoConfig(), tok)
    assert len(pairs) == 2 and r.skipped == 2 and r.rows == 4
    assert [e.split(": ")[0] for e in r.first_errors] == [f"{path}:2", f"{path}:3"]


def test_prepare_counts_deep_and_surrogate_rows(tmp_path):
    path = _jsonl(tmp_path / "raw.jsonl", [GOOD, DEEP, SURROGATE, GOOD2])
    counts = prepare([str(path)], str(tmp_path / "out"), validation_fraction=0.0, seed=0)
    assert (counts["read"], counts["bad"], counts["train"]) == (4, 2, 2)


class _Picky:
    """The example tokenizer, except that encoding a text containing BOOM raises (as a tokenizer's batch
    call does for one unencodable row): only that row may be lost."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, texts, **kw):
        if any("BOOM" in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return self._tok(texts, **kw)


def test_a_row_the_tokenizer_rejects_does_not_fail_its_batch(tmp_path, tok):
    boom = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "x"}]}
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, boom, GOOD2])
    examples, r = load_examples(DataConfig(train=str(path)), _Picky(tok))
    want, _ = load_examples(DataConfig(train=str(_jsonl(tmp_path / "ok.jsonl", [GOOD, GOOD2]))), tok)
    assert [e.tokens.tolist() for e in examples] == [e.tokens.tolist() for e in want]
    assert r.skipped_by_reason == {"tokenizer error": 1} and r.first_errors[0].startswith(f"{path}:2: tokenizer error")
    with pytest.raises(JaxftError, match=re.escape(f"{path}:2: tokenizer error")):
        load_examples(DataConfig(train=str(path), strict=True), _Picky(tok))
    pairs_path = _jsonl(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "p", "chosen": "BOOM", "rejected": "n"}, PAIR])
    pairs, r = load_pairs(DataConfig(train=str(pairs_path)), DpoConfig(), _Picky(tok))
    assert len(pairs) == 2 and r.skipped_by_reason == {"tokenizer error": 1}


class _NoOffsets(_Picky):
    """A tokenizer without character offsets (a slow one): unusable for every row, so not a bad row."""

    def __call__(self, texts, **kw):
        raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")


def test_a_tokenizer_that_cannot_be_used_is_still_one_error_not_bad_rows(tmp_path, tok):
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD2])
    with pytest.raises(JaxftError, match="gives no character offsets"):
        load_examples(DataConfig(train=str(path)), _NoOffsets(tok))


# ---------------------------------------------------------------- config ranges


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every: must be >= 1"),  # was a ZeroDivisionError in the loop
    ("train.eval_batches=-1", "train.eval_batches: must be >= 0"),  # was a silent eval_loss 0.0, ppl 1.0
    ("optim.lr=.inf", "optim.lr: must be a finite number"),  # was accepted, and wrote non-finite weights
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1"),
    ("data.seed=-1", "data.seed: must be >= 0"),
    ("train.seed=-1", "train.seed: must be >= 0"),
    ("train.steps=" + "9" * 30, "train.steps: 999999999999999999999999999999 is out of range"),
    ("lora.dropout=.nan", "lora.dropout: must be a finite number"),
    ("optim.b2=1", "optim.b2: must be in [0, 1)"),
    ("mesh.process_id=-1", "mesh.process_id: must be >= 0"),
    ("train.out_dir=", "train.out_dir: is empty"),
])
def test_numeric_ranges(override, message):
    with pytest.raises(JaxftError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_built_in_code_is_validated_before_a_run():
    """train() / evaluate() call check_files, which validates: a RunConfig made without load_config
    cannot reach the loop with log_every=0 either."""
    with pytest.raises(JaxftError, match=r"train\.log_every: must be >= 1"):
        check_files(RunConfig(train=TrainConfig(log_every=0)))
    with pytest.raises(JaxftError, match="optim.lr: must be a finite number"):
        check_files(RunConfig(optim=OptimConfig(lr=math.inf)))


def test_bad_overrides_on_the_command_line_start_no_run(tmp_path):
    for override, message in (("train.log_every=0", "train.log_every: must be >= 1"),
                              ("optim.lr=.inf", "optim.lr: must be a finite number")):
        out = tmp_path / override.split("=")[0]
        r = run_cli("train", ROOT / "configs" / "sft_lora.yaml", override, f"train.out_dir={out}", timeout=120)
        errors = [line for line in r.stderr.splitlines() if line.startswith("jaxft: error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr
        assert "Traceback" not in r.stderr and not out.exists()


# ---------------------------------------------------------------- the step and the checkpoints


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_model("llama", d)
    return d


def _batch(B=2, S=16):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 96, (B, S)).astype(np.int32)
    return dict(tokens=tokens, positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)),
                segment_ids=np.ones((B, S), np.int32),
                targets=np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1),
                loss_mask=np.ones((B, S), np.float32))


def test_a_step_that_would_make_weights_non_finite_changes_nothing(tiny_dir):
    """Finite loss and gradients, but lr = inf (an OptimConfig built in code, so never validated): the
    update is non-finite and the step must be skipped, not applied."""
    lr = math.inf
    model = load_pretrained(tiny_dir)
    cfg = LoraConfig(r=4, alpha=8)
    adapters.attach(model, cfg, jax.random.key(0))
    graphdef, params, frozen = adapters.split(model, cfg)
    before = jax.tree.map(np.array, params)
    tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=0, clip_norm=None), 10, params)
    step = make_train_step(graphdef, tx)
    state, m = step(init_state(params, tx), frozen, jax.tree.map(lambda x: x[None], _batch()))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and int(state["skipped"]) == 1 and int(state["bad_steps"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["opt_state"])
               if jnp.issubdtype(x.dtype, jnp.inexact))


def test_no_checkpoint_is_written_from_non_finite_arrays(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=3)
    ok = {"params": {"w": jnp.ones(3)}, "step": jnp.int32(1)}
    ckpts.save(1, ok, {"step": 1})
    ckpts.wait()
    bad = {"params": {"w": jnp.array([1.0, jnp.nan, 2.0])}, "step": jnp.int32(2)}
    with pytest.raises(JaxftError, match=r"checkpoints/2: not written: 1 array\(s\) .* NaN/Inf \(first: "
                                         r"\['params'\]\['w'\]\)") as e:
        ckpts.save(2, bad, {"step": 2})
    assert "\n" not in str(e.value)
    ckpts.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def _damage(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_when_every_checkpoint_is_damaged_is_an_error(tmp_path):
    state = {"params": {"w": jnp.arange(4.0)}, "step": jnp.int32(0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    ckpts = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        ckpts.save(step, state, {"step": step})
    ckpts.close()
    for step in (1, 2):
        _damage(tmp_path / "checkpoints" / str(step))
    ckpts = Checkpoints(tmp_path, keep=3)
    with pytest.raises(JaxftError) as e:
        ckpts.restore_latest(abstract)
    msg = str(e.value)
    aside = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(aside) == 2 and all(".damaged-" in n for n in aside)
    assert "no checkpoint restores" in msg and all(n in msg for n in aside) and "--restart" in msg and "\n" not in msg
    with pytest.raises(JaxftError, match="no checkpoint restores"):  # again: the moved-aside ones still count
        Checkpoints(tmp_path, keep=3).restore_latest(abstract)
    assert Checkpoints(tmp_path / "fresh", keep=3).restore_latest(abstract) is None  # nothing saved yet: step 0


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv,want", [
    (["train", "c.yaml", "--resume", "train.steps=10"], dict(resume=True, overrides=["train.steps=10"])),
    (["train", "c.yaml", "lora.r=2", "--restart", "train.steps=10"],
     dict(restart=True, overrides=["lora.r=2", "train.steps=10"])),
    (["eval", "c.yaml", "--base-only", "eval.max_examples=2"], dict(base_only=True, overrides=["eval.max_examples=2"])),
    (["plan", "c.yaml", "--model", "llama3-8b", "train.batch_size=1"],
     dict(model="llama3-8b", overrides=["train.batch_size=1"])),
])
def test_flags_and_overrides_in_any_order(argv, want):
    args = _parse(argv)
    assert args.command == argv[0] and args.config == "c.yaml"
    assert {k: getattr(args, k) for k in want} == want


def test_plan_with_an_override_after_a_flag(capsys):
    assert jaxft.cli.main(["plan", str(ROOT / "configs" / "sft_lora.yaml"), "--model", "llama3-8b",
                           "train.batch_size=1"]) == 0
    assert "llama3-8b" in capsys.readouterr().out


def test_resume_restart_end_to_end(chat_model, tmp_path):
    """`train CFG --resume train.steps=N` parses; with every checkpoint damaged --resume fails (exit 2,
    naming them) and --restart trains from step 0 with the old checkpoints kept aside."""
    data = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD2] * 4)
    out = tmp_path / "run"
    cfg = str(ROOT / "configs" / "sft_lora.yaml")
    o = [f"model.path={chat_model}", f"data.train={data}", "data.validation=null", "eval.file=null",
         "data.max_length=64", "train.batch_size=2", f"train.out_dir={out}", "lora.r=2", "lora.alpha=4"]
    r = run_cli("train", cfg, *o, "--resume", "train.steps=2")
    assert r.returncode == 0, r.stderr
    _damage(out / "checkpoints" / "2")
    r = run_cli("train", cfg, *o, "--resume", "train.steps=3")
    errors = [line for line in r.stderr.splitlines() if line.startswith("jaxft: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "no checkpoint restores" in errors[0], r.stderr
    assert re.search(r"2\.damaged-\d+", errors[0]) and "--restart" in errors[0]
    assert not (out / "checkpoints" / "3").exists()
    r = run_cli("train", cfg, *o, "--restart", "train.steps=2")
    assert r.returncode == 0, r.stderr
    assert "training from step 0" in r.stderr and (out / "checkpoints" / "2").is_dir()
    assert [p for p in out.iterdir() if p.name.startswith("checkpoints.old-")]


def test_peft_check_script_is_offline_and_silences_only_the_third_party_notices():
    """scripts/check_peft_export.py (the quickstart's last step) runs offline even where the caller's
    environment is not (bitsandbytes would fetch a kernel from the Hub at import), hides bitsandbytes'
    kernel-not-loaded log line, kernels' offline publisher-check line and transformers'
    is_gradient_checkpointing FutureWarning (all raised here by hand, so the test does not depend on the
    CPU or on which packages the resolver picked), and still shows other warnings and log lines."""
    code = ("import logging, sys, warnings; sys.path.insert(0, 'scripts'); import check_peft_export; "
            "import huggingface_hub.constants as c; assert c.HF_HUB_OFFLINE, 'online'; "
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: no kernels'); "
            "log.warning('bitsandbytes: something else'); "
            "k = logging.getLogger('kernels._internals.hf_hub'); "
            "k.warning(\"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
            "because Hugging Face Hub is in offline mode.\"); "
            "k.warning(\"Skipping publisher trust check for 'someone/else' because offline.\"); "
            "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed', FutureWarning); "
            "warnings.warn('a warning about your model', FutureWarning)")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "kernels-community" not in r.stderr and "is_gradient_checkpointing" not in r.stderr, r.stderr
    assert "bitsandbytes: something else" in r.stderr and "a warning about your model" in r.stderr
    assert "'someone/else'" in r.stderr
