"""What a new user hit following the README (issue 30, "What a new user hit" 2, 4–9), one test each, on tiny
models: a GGUF base with a ~300-token tokenizer (tests/tiny.py save_tiny_gguf) stands in for the example model.

2  the exported adapter of a GGUF-based run loads the standard way (`AutoPeftModelForCausalLM`, offline) with
   jaxft's logits, over an HF base directory written once; the serve script serves that base
4  multi-adapter runs: said once when an adapter has no validation file, `lr_<name>` per adapter, rank-bucket
   messages coherent with the bucket the bank pads to
5  exports and generated data keep the umask's modes (022 and 077), serve_vllm.sh is executable
6  Ctrl-C saves and says where (a second one stops at once and names the last checkpoint); training again
   without --resume names --restart; --resume on a finished run says so
7  `jaxft eval` does not replace an earlier evaluation without --overwrite (or --out)
8  what can be refused before the model loads is refused before it loads
9  chat's commands, `plan --model` without a config, help texts, the eval table's columns
"""

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config import load_config, read_config
from jaxft.errors import JaxftError
from test_sft import task_data  # noqa: F401 — the shared task-data fixture
from tiny import ROOT, save_tiny_chat, save_tiny_gguf

IDS = np.array([[1, 17, 250, 30, 42, 7, 90, 12, 60, 2]], np.int32)


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_base") / "tiny.gguf"  # a folder of its own: no HF files beside it
    save_tiny_gguf(path)
    return path


def _overrides(base, task, out, **extra):
    o = {"model.path": base, "data.train": task / "train.jsonl", "data.validation": task / "validation.jsonl",
         "data.max_length": 256, "train.batch_size": 2, "train.steps": 2, "train.out_dir": out, "lora.r": 4,
         "lora.alpha": 8, "optim.lr": 1e-2, "optim.warmup_steps": 0, "eval.max_new_tokens": 4,
         "eval.max_examples": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def gguf_run(gguf_base, task_data, tmp_path_factory):  # noqa: F811
    """A finished 2-step LoRA SFT run on the GGUF base."""
    from jaxft.commands.train import train

    out = tmp_path_factory.mktemp("gguf_run") / "run"
    with contextlib.redirect_stderr(io.StringIO()):
        train(load_config(ROOT / "configs" / "sft_lora.yaml", _overrides(gguf_base, task_data, out)), progress=False)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A jaxft cache of the test's own (where a GGUF base's HF directory is written)."""
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- 2: the adapter of a GGUF run, the standard way


def test_adapter_of_a_gguf_run_loads_with_auto_peft_and_gives_jaxfts_logits(gguf_run, cache, tmp_path, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM

    from jaxft.commands.export import export
    from jaxft.runs import load_run

    run = read_config(gguf_run)
    out, step = export(run, "peft", tmp_path / "adapter")
    assert step == 2 and "writing the GGUF base tiny.gguf as a Hugging Face directory" in capsys.readouterr().err
    base = Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base.is_absolute() and base.parent == cache / "hf" and (base / "config.json").is_file()
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # base from the adapter
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    ours = np.asarray(load_run(run).model()(jnp.asarray(IDS))[0])
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # written once: a second export names the same directory and writes nothing more
    out2, _ = export(run, "peft", tmp_path / "adapter2")
    assert "writing the GGUF base" not in capsys.readouterr().err
    assert json.loads((out2 / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


# ---------------------------------------------------------------- 4 (+ 2, 5): a multi-adapter run


@pytest.fixture(scope="module")
def multi_run(gguf_base, task_data, tmp_path_factory):  # noqa: F811
    """Two adapters, different ranks (one bucket) and learning rates, only `a` with a validation file."""
    from jaxft.commands.train import train

    out = tmp_path_factory.mktemp("multi") / "run"
    f = out.parent / "multi.yaml"
    f.write_text(f"model: {{path: {gguf_base}}}\nlora: {{r: 8, alpha: 16}}\n"
                 f"data: {{max_length: 256}}\noptim: {{warmup_steps: 0}}\n"
                 f"train: {{steps: 2, batch_size: 2, out_dir: {out}}}\nadapters:\n"
                 f"  - {{name: a, train: {task_data / 'train.jsonl'}, lr: 1.0e-3, r: 4, alpha: 8, "
                 f"validation: {task_data / 'validation.jsonl'}}}\n"
                 f"  - {{name: b, train: {task_data / 'train.jsonl'}, lr: 5.0e-3}}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(load_config(f), progress=True)
    return out, err.getvalue()


def test_multi_adapter_run_says_which_adapters_are_evaluated_and_logs_each_lr(multi_run):
    out, err = multi_run
    said = [line for line in err.splitlines() if "no validation file" in line]
    assert said == ["validation: b has no validation file (adapters[i].validation): eval_loss_<name> is logged "
                    "for a only"], err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all("lr" not in r and {"lr_a", "lr_b"} <= set(r) for r in steps)
    assert steps[0]["lr_a"] == pytest.approx(1e-3) and steps[0]["lr_b"] == pytest.approx(5e-3)
    assert all(r["lr_b"] == pytest.approx(5 * r["lr_a"]) for r in steps)  # each its own lr, on one schedule
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and "eval_loss_a" in evals[-1] and "eval_loss_b" not in evals[-1]


def test_bank_export_serves_the_tested_base_with_an_executable_script(multi_run, cache, tmp_path, capsys):
    from jaxft.commands.export import export
    from jaxft.formats.peft import vllm_problems

    out, _ = multi_run
    path, _ = export(read_config(out), "peft", tmp_path / "served")
    err = capsys.readouterr().err
    assert "jaxft: vLLM:" not in err  # r=4 and r=8 share the bucket 8 the command line asks for
    script = path / "serve_vllm.sh"
    cmd = script.read_text().splitlines()[-1]
    base = json.loads((path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert cmd.startswith(f"vllm serve {base} ") and ".gguf" not in cmd and "--max-lora-rank 8" in cmd
    assert Path(base).parent == cache / "hf"
    assert stat.S_IMODE(script.stat().st_mode) == 0o777 & ~_umask()
    # one adapter of rank 4 alone: what vLLM does with it, as the README says (bucket 8)
    (msg,) = vllm_problems({"r": 4, "target_modules": ["q_proj"]}, [])
    assert "padded to the rank bucket 8" in msg and "--max-lora-rank 8" in msg


# ---------------------------------------------------------------- 5: modes under the umask


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exports_and_generated_data_keep_the_umasks_modes(mask, gguf_run, multi_run, task_data, cache,  # noqa: F811
                                                          tmp_path, capsys):
    from jaxft.commands.evaluate import evaluate
    from jaxft.commands.export import export
    from jaxft.data.prepare import prepare
    from jaxft.data.task import write_task_files

    old = os.umask(mask)
    try:
        run = read_config(gguf_run)
        written = [export(run, fmt, tmp_path / name, gguf_type="f32")[0]
                   for fmt, name in (("peft", "adapter"), ("merged", "merged"), ("gguf", "m.gguf"))]
        written.append(export(read_config(multi_run[0]), "peft", tmp_path / "served")[0])
        written.append(cache / "hf")  # the GGUF base's HF directory
        write_task_files(tmp_path / "task", 4, 2, 2)
        prepare([str(task_data / "train.jsonl")], str(tmp_path / "prepared"), validation_fraction=0.25, seed=0)
        evaluate(load_config(None, _overrides(run.model.path, task_data, gguf_run)), progress=False,
                 out=tmp_path / "eval")
        written += [tmp_path / "task", tmp_path / "prepared", tmp_path / "eval"]
    finally:
        os.umask(old)
    capsys.readouterr()
    seen = 0
    for top in written:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            want = (0o777 if p.is_dir() or p.name == "serve_vllm.sh" else 0o666) & ~mask
            assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"
            seen += 1
    assert seen > 30 and (tmp_path / "eval" / "predictions.jsonl").is_file()


# ---------------------------------------------------------------- 6: Ctrl-C, --resume, --restart


def _train(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_rows(out: Path, n: int, p, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} logged steps: {p.poll()} {p.stderr.read() if p.poll() is not None else ''}")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat")
    save_tiny_chat(d)
    return d


def test_ctrl_c_saves_says_where_and_resume_and_restart_are_named(tiny_chat, task_data, tmp_path):  # noqa: F811
    from jaxft.cli import main

    cfg = ROOT / "configs" / "sft_lora.yaml"
    out = tmp_path / "run"
    o = _overrides(tiny_chat, task_data, out, **{"train.steps": 5000, "data.validation": "null"})
    p = _train([cfg, *o])
    _wait_for_rows(out, 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    step = int(line.split("stopped at step ")[1].split(" ")[0])
    assert line == (f"jaxft: stopped at step {step} (Ctrl-C): checkpoint {step} saved in {out / 'checkpoints'}; "
                    "continue with --resume"), err[-2000:]
    assert "Traceback" not in err and (out / "checkpoints" / str(step)).is_dir()
    # again without --resume: the error names both ways on
    capture = io.StringIO()
    with contextlib.redirect_stderr(capture):
        assert main(["train", str(cfg), *o]) == 2
    assert "--resume" in capture.getvalue() and "--restart" in capture.getvalue()
    # --resume with train.steps reached: it says the run is finished, and at which step
    capture, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(capture), contextlib.redirect_stdout(stdout):
        assert main(["train", str(cfg), *o, f"train.steps={step}", "--resume"]) == 0
    assert f"is already trained to step {step} (train.steps={step}); nothing to do" in capture.getvalue()
    assert json.loads(stdout.getvalue())["step"] == step


def test_a_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tmp_path):
    """The loop itself, with a step during which Ctrl-C comes twice (two signals sent from one process to a
    busy one coalesce, so this is where the second one is made certain)."""
    from types import SimpleNamespace

    from jaxft.errors import Interrupted
    from jaxft.train import loop

    saved = []

    class Source:
        def __call__(self, step, params):
            return step

        def __len__(self):
            return 100

    def step_fn(state, frozen, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop...
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # ...the second, before the step ends: stop now
            time.sleep(5)
        return state, {}

    ckpts = SimpleNamespace(dir=tmp_path / "checkpoints", save=lambda step, state, meta: saved.append(step))
    log = SimpleNamespace(step=lambda *a: None, eval=lambda *a: None, flush=lambda: {})
    obj = SimpleNamespace(train=Source(), evaluate=None)
    run = load_config(None, ["train.steps=10", "train.save_every=2"])
    with pytest.raises(Interrupted) as e:
        loop(run, obj, step_fn, {"params": None}, None, 0, ckpts, log, lambda *a: None)
    assert saved == [2] and str(e.value) == (
        f"stopped after step 2 (a second Ctrl-C: nothing more saved); the last checkpoint is step 2 "
        f"({tmp_path / 'checkpoints' / '2'}): continue from it with --resume")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


# ---------------------------------------------------------------- 7: eval does not replace an evaluation silently


def test_eval_refuses_to_replace_an_earlier_evaluation(gguf_run, tmp_path, monkeypatch, capsys):
    from jaxft.cli import main
    from jaxft.commands import evaluate as ev

    args = ["eval", str(gguf_run), "eval.max_examples=1"]
    assert main(args) == 0
    first = (gguf_run / "eval" / "predictions.jsonl").read_text()
    (gguf_run / "eval" / "notes.txt").write_text("mine")
    capsys.readouterr()
    monkeypatch.setattr(ev, "load_run", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"jaxft: error: {gguf_run / 'eval'}: holds an earlier evaluation" in err and "--overwrite" in err
    assert (gguf_run / "eval" / "predictions.jsonl").read_text() == first
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "elsewhere")]) == 0
    assert f"outputs: {tmp_path / 'elsewhere'}/" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert not (gguf_run / "eval" / "notes.txt").exists()  # the folder is this evaluation's, whole


# ---------------------------------------------------------------- 8: refused before the model loads


def _no_model(monkeypatch, *where):
    for module, name in where:
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{name} ran before the refusal"))


def test_what_can_be_refused_before_loading_is(gguf_base, gguf_run, task_data, cache, tmp_path,  # noqa: F811
                                                monkeypatch):
    from jaxft.commands import evaluate as ev
    from jaxft.commands import generate as gen
    from jaxft.commands import train as tr
    from jaxft.commands.export import export
    from jaxft.generate import Sampling

    peft, _ = export(read_config(gguf_run), "peft", tmp_path / "peft")
    _no_model(monkeypatch, (gen, "load_pretrained"), (ev, "load_run"), (tr, "build"))
    with pytest.raises(JaxftError, match=r"--use: unknown adapter 'zzz' \(known: a, base\)"):
        gen.generate_answers(str(gguf_base), ["hi"], sampling=Sampling(), adapters=[f"a={peft}"], use=["zzz"])
    with pytest.raises(JaxftError, match=r"--use: give it once or once per --prompt"):
        gen.generate_answers(str(gguf_base), ["hi"], sampling=Sampling(), adapters=[f"a={peft}"], use=["a", "a"])
    empty = load_config(None, _overrides(gguf_base, task_data, tmp_path / "never_trained"))
    with pytest.raises(JaxftError, match=r"never_trained: no checkpoint to read \(train first"):
        ev.evaluate(empty, progress=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    wrong = load_config(None, _overrides(gguf_base, task_data, tmp_path / "r", **{"data.train": pairs}))
    with pytest.raises(JaxftError, match=rf"data.train: {pairs}: no usable SFT rows \(all 1 bad; first: {pairs}:1: "):
        tr.train(wrong, progress=False)
    with pytest.raises(JaxftError, match=r"data.validation: .*pairs.jsonl: no usable SFT rows"):
        ev.evaluate(load_config(None, _overrides(gguf_base, task_data, gguf_run, **{"data.validation": pairs})),
                    progress=False, out=tmp_path / "e")


# ---------------------------------------------------------------- 9: small things


def test_chat_commands_are_not_messages(gguf_base, monkeypatch, capsys):
    from jaxft.commands.generate import CHAT_HELP, chat
    from jaxft.generate import Sampling

    sent = []
    monkeypatch.setattr("jaxft.commands.generate.chat_prompt", lambda tok, msgs: sent.append(msgs) or [1, 2, 3])
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nhello\n/reset\n/nope\n//etc is a path\n/quit\nnever\n"))
    chat(str(gguf_base), sampling=Sampling(max_new_tokens=2))
    out = capsys.readouterr().out
    assert CHAT_HELP in out and "(conversation forgotten)" in out and "(unknown command /nope; /help lists them)" in out
    assert [[m["content"] for m in msgs if m["role"] == "user"] for msgs in sent] == [["hello"], ["/etc is a path"]]
    assert out.count("model> ") == 2 and "never" not in out.split("you> /quit")[1]


def test_plan_with_model_and_no_config(capsys):
    from jaxft.cli import main

    assert main(["plan", "--model", "llama3-70b"]) == 0
    assert "llama3-70b" in capsys.readouterr().out
    assert main(["plan", "--model", "llama3-8b", "train.batch_size=1"]) == 0
    assert "micro-batch 1 x" in capsys.readouterr().out
    assert main(["plan"]) == 2 and "give a run config, or --model" in capsys.readouterr().err


def test_help_texts_say_what_and_the_defaults():
    from jaxft.cli import _parser

    commands = _parser().commands
    prepare, export = (" ".join(commands[c].format_help().split()) for c in ("prepare", "export"))
    for flag in ("--format", "--seed", "--out", "--validation-fraction"):
        action = next(a for a in commands["prepare"]._actions if flag in a.option_strings)
        assert action.help, flag
    assert "default: auto" in prepare and "default: 0" in prepare
    for default in ("default: peft", "default: f16", "default: bf16", "default: refuse", "default: warnings"):
        assert default in export, default


def test_eval_table_columns_line_up_with_long_names():
    from jaxft.commands.evaluate import format_table

    table = format_table({"base": {"eval_loss": 0.5, "eval_rewards/accuracies_of_a_long_metric": 0.25},
                          "an_adapter_with_a_long_name": {"eval_loss": 0.125}})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1, table
    ends = [[i + len(w) for i, w in _words(line)] for line in lines]
    assert all(e[1:] == ends[0][1:] for e in ends), table  # every column's right edge the same


def _words(line):
    i, out = 0, []
    for w in line.split():
        i = line.index(w, i)
        out.append((i, w))
        i += len(w)
    return out
