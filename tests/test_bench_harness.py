"""scripts/benchlib.py, the harness every scripts/bench_* script prints through: its pure pieces, no model.
A change here changes every benchmark's output, which README quotes."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402


def _result(name, wall=100.0, others=0.0):
    return dict(framework=name, wall_s=wall, own_cpu_s=50.0, others_cpu_s=others)


def test_table_places_titles_by_the_value_spec():
    rows = [dict(framework="jaxft", tps=1234.56, n=4884480, loss=[0.69314718]),
            dict(framework="PyTorch+PEFT", tps=7.0, n=12, loss=[14.7])]
    lines = benchlib.table([("framework", "<13", "framework"), ("tokens/s med", ">12.1f", "tps"),
                            ("ratio", ">6", lambda r: f"{r['tps'] / 7:.2f}x"), ("trainable", ">11,", "n"),
                            ("loss 1st", ">8.4f", lambda r: r["loss"][0])], rows)
    assert lines == [
        "framework     | tokens/s med |  ratio |   trainable | loss 1st",
        "-" * 62,
        "jaxft         |       1234.6 | 176.37x |   4,884,480 |   0.6931",
        "PyTorch+PEFT  |          7.0 |  1.00x |          12 |  14.7000",
    ]


def test_step_stats_medians_over_the_timed_steps():
    r = benchlib.step_stats(dict(times=[9.0, 2.0, 4.0, 1.0], other=1), warmup=1, tokens=8)
    assert r["other"] == 1 and r["first_step_s"] == 9.0
    assert r["step_s_median"] == 2.0  # of 2, 4, 1
    assert r["tokens_per_s_median"] == 4.0  # of 4, 2, 8
    assert r["tokens_per_s_mean"] == 14 / 3


def test_timed_median_and_last_output():
    calls = []
    t, out = benchlib.timed(lambda: calls.append(1) or len(calls), 3)
    assert out == 3 and t >= 0


def test_ratio_and_noise_lines():
    assert benchlib.ratio_lines({"jaxft/trl throughput": 2.345, "x": 0.5}) == ["jaxft/trl throughput: 2.35x",
                                                                               "x: 0.50x"]
    assert benchlib.ratio_lines({}) == []
    cores = benchlib.os.cpu_count()
    quiet, noisy = _result("jaxft", others=0.05 * 100 * cores), _result("TRL", others=0.5 * 100 * cores)
    assert benchlib.noise_lines([quiet, noisy]) == [
        "jaxft: worker 100 s wall; other processes 5% of the machine",
        "TRL: worker 100 s wall; other processes 50% of the machine  <-- NOISY: figures not trustworthy"]


def test_busy_neighbours_warning(monkeypatch, capsys):
    monkeypatch.setattr(benchlib, "busy_processes", lambda: ["12 python 97%", "34 jaxft 40%"])
    assert benchlib.warn_busy() == ["12 python 97%", "34 jaxft 40%"]
    assert capsys.readouterr().err == "warning: other busy processes: 12 python 97%; 34 jaxft 40%\n"
    monkeypatch.setattr(benchlib, "busy_processes", lambda: [])
    assert benchlib.warn_busy() == [] and capsys.readouterr().err == ""


def test_worker_argv_drops_what_only_the_driver_reads():
    argv = ["--batch", "1", "--only", "jaxft", "--json", "out.json", "--only=trl", "--json=x", "--seq", "16"]
    assert benchlib.worker_argv(argv) == ["--batch", "1", "--seq", "16"]


def test_arguments_and_worker_round_trip(tmp_path):
    ap = argparse.ArgumentParser()
    benchlib.add_training_args(ap, steps=3, warmup=1, lr=1e-5)
    benchlib.add_side_args(ap, {"jaxft": None, "trl": None})
    args = ap.parse_args(["--only", "trl", "--only", "jaxft", "--rank", "8"])
    assert (args.steps, args.warmup, args.rank, args.alpha, args.lr) == (3, 1, 8, 32.0, 1e-5)
    assert args.only == ["trl", "jaxft"]
    again = ap.parse_args(benchlib.training_argv(args))
    assert [getattr(again, k) for k in ("steps", "warmup", "rank", "alpha", "lr")] == [3, 1, 8, 32.0, 1e-5]
    assert not benchlib.serve_worker(args, {})
    out = tmp_path / "r.json"
    args = ap.parse_args(["--worker", "trl", "--worker-out", str(out)])
    assert benchlib.serve_worker(args, {"trl": lambda a: dict(framework="TRL", steps=a.steps)})
    assert json.loads(out.read_text()) == dict(framework="TRL", steps=3)
    benchlib.write_json(None, results={})  # no --json: writes nothing
    benchlib.write_json(str(tmp_path / "figures.json"), settings=vars(args), ratios={"x": 1.5})
    assert json.loads((tmp_path / "figures.json").read_text())["ratios"] == {"x": 1.5}


def test_step_lines_and_offline_env(monkeypatch, capsys):
    times, losses = benchlib.run_steps(lambda b: b / 2, [1.0, 3.0], warmup=1)
    assert losses == [0.5, 1.5] and len(times) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("  step 1 (warmup): ") and err[0].endswith(" s  loss 0.5000")
    assert err[1].startswith("  step 2: ") and err[1].endswith(" s  loss 1.5000")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert benchlib.offline_env()["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert benchlib.offline_env()["HF_HUB_OFFLINE"] == "0"  # the caller's setting wins
