"""Every command over processes: `scripts/launch_local.sh 2 VERB ...` (2 processes × 2 devices, gloo, one fsdp = 4
mesh) writes and prints what the same command writes and prints in one process on a 4-device mesh (fsdp = 4 of this
process's 8 simulated devices). One tiny LoRA SFT run, trained once in this process, serves every command."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxft import cli
from jaxft.commands.train import train
from jaxft.config import load_config
from jaxft.data.task import make_examples
from tiny import launch_local

ROOT = Path(__file__).resolve().parents[1]
FOUR = ("--mesh", "fsdp=4")  # the one-process reference: 4 of this process's 8 devices
MULTI = ("--mesh", "fsdp=-1")  # launch_local: all 4 devices of the 2 processes


@pytest.fixture(scope="module")
def trained_run(chat_model, tmp_path_factory):
    """A finished 2-step LoRA SFT run of the chat model with a validation split (eval loss, generation metric)."""
    d = tmp_path_factory.mktemp("mp_run")
    for name, n, seed in (("train", 16, 3), ("validation", 6, 4)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(n, seed=seed)))
    o = {"model.path": chat_model, "data.train": d / "train.jsonl", "data.validation": d / "validation.jsonl",
         "data.max_length": 128, "train.batch_size": 4, "train.grad_accum": 1, "train.steps": 2,
         "train.save_every": 2, "train.eval_every": 0, "train.out_dir": d / "run", "lora.r": 4, "lora.alpha": 8,
         "lora.dropout": 0, "optim.lr": 1e-2, "optim.warmup_steps": 0, "eval.max_examples": 6,
         "eval.max_new_tokens": 8, "eval.batch_size": 4, "eval.regression_prompts": 4,
         "eval.regression_new_tokens": 8}
    train(load_config(str(ROOT / "configs" / "sft_lora.yaml"), [f"{k}={v}" for k, v in o.items()]), progress=False)
    return d / "run"


def _launch(verb, *args) -> str:
    """Process 0's stdout (gloo's own connection lines left out)."""
    r = launch_local(2, verb, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return "".join(line for line in r.stdout.splitlines(keepends=True) if not line.startswith("[Gloo]"))


def _close(a, b, where):
    """Equal JSON values, floats within 1e-5, or 1e-6 of their size (fp32 sums over 4 devices add in another order
    than over 2 × 2 with gloo: eval_ppl = exp(eval_loss) carries the loss's last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5, rel=1e-6), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_eval_over_processes(trained_run, tmp_path):
    """`jaxft eval RUN`: validation loss (sums and counts over the mesh), greedy predictions (the same bytes) and
    the regression figures; process 0 alone writes and prints the table."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", str(trained_run), "--out", str(one), *FOUR]) == 0
    out = _launch("eval", trained_run, "--out", two, *MULTI)
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    got, want = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert {"eval_loss", "exact_match", "reg_kl_mean"} <= set(got["tuned"])
    _close(got, want, "summary")
    assert out.count("eval_loss") == 1


def test_generate_over_processes(chat_model, capsys):
    """`jaxft generate`: the same tokens printed, once."""
    args = [str(chat_model), "--prompt", "Name a color.", "--prompt", "Count to three.", "--prompt", "Hi",
            "--max-new-tokens", "12"]
    assert cli.main(["generate", *args, *FOUR]) == 0
    want = capsys.readouterr().out
    assert _launch("generate", *args, *MULTI) == want and want.count("--- [") == 3


def test_score_over_processes(chat_model, tmp_path):
    """`jaxft score`: pairs and completions scored by a (new-headed) reward model over the mesh: the same JSONL."""
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "Hi", "completion": "Hello there"},
            {"prompt": "Sky?", "chosen": "blue", "rejected": "green"}, {"messages": [
                {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"}]},
            {"prompt": "1+1?", "completion": "2"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--input", str(src), "--batch-size", "4"]
    assert cli.main(["score", str(chat_model), *args, "--out", str(one), *FOUR]) == 0
    out = _launch("score", chat_model, *args, "--out", two, *MULTI)
    got, want = ([json.loads(x) for x in p.read_text().splitlines()] for p in (two, one))
    assert len(want) == 5
    _close(got, want, "scores")
    assert out.count('"scored": 5') == 1


def test_lm_eval_over_processes(chat_model, tmp_path, monkeypatch, capsys):
    """`jaxft lm-eval`: loglikelihood and generate_until requests on the model sharded over both processes, every
    process running process 0's requests: the same answers and metrics as one process, reported once."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the launched processes inherit it
    args = ["--tasks", "jaxft_extract_mc,jaxft_extract_gen", "--include-path", str(ROOT / "configs" / "lm_eval"),
            "--limit", "3", "--log-samples", "--batch-size", "4"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert cli.main(["lm-eval", str(chat_model), *args, "--output", str(one), *FOUR]) == 0
    tables = capsys.readouterr().out
    out = _launch("lm-eval", chat_model, *args, "--output", two, *MULTI)
    got, want = (json.loads(p.read_text()) for p in (two, one))
    resps = lambda res, t: [s["resps"] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]  # noqa: E731
    assert resps(got, "jaxft_extract_gen") == resps(want, "jaxft_extract_gen")
    a, b = (np.asarray([[c[0][0] for c in x] for x in resps(res, "jaxft_extract_mc")], float) for res in (got, want))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    _close(got["results"], want["results"], "results")
    assert out == tables  # lm-eval's tables, printed by process 0 alone


def test_chat_refuses_several_processes(chat_model, capsys):
    """`jaxft chat` reads stdin: one process (its own devices on a mesh), said in one line before the model loads."""
    assert cli.main(["chat", str(chat_model), "--mesh", "distributed=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat" in err and "one process" in err
