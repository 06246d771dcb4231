"""Requests per second of jaxft.lm_eval.JaxftLM next to lm-eval's HFLM on the example model, one run.

    python scripts/bench_lm_eval.py [--limit 48] [--batch-size 16] [--repeats 2] [--json OUT]

Both sides run lm_eval.simple_evaluate on the shipped offline tasks (configs/lm_eval): jaxft_extract_mc
(multiple choice: 4 loglikelihood requests per document, ~130-token contexts, ~40-token continuations) and
jaxft_extract_gen (generate_until, greedy, up to 64 tokens, stop at a newline), each side in a fresh process
(scripts/benchlib.py), from the same float32 Hugging Face directory: the example GGUF (SmolLM2-135M-Instruct
Q4_1) dequantized once by transformers into the jaxft cache. Each request method is timed inside the harness;
--repeats passes: the first includes jaxft's compiles, the last is reported as warm. The summary also compares
the two sides' answers: max |Δ loglikelihood| and the share of identical generations.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from benchlib import add_side_args, cpu_flags, noise_lines, ratio_lines, run_sides, serve_worker, table, write_json

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"loglikelihood": "jaxft_extract_mc", "generate_until": "jaxft_extract_gen"}


def hf_dir() -> Path:
    """The example GGUF as a float32 Hugging Face directory (made once, next to the GGUF)."""
    from jaxft.example import example_model

    gguf = example_model()
    out = gguf.parent / "SmolLM2-135M-Instruct-f32-hf"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):  # transformers refuses to save a model it read from a GGUF
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        tmp = out.with_name(out.name + ".part")
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def evaluate(lm, args) -> dict:
    """simple_evaluate --repeats times; per request type: seconds, requests, answers (the last pass)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "configs" / "lm_eval"))
    spent: dict = {}

    def timed(kind, fn):
        def run(requests, *a, **k):
            t0 = time.perf_counter()
            out = fn(requests, *a, **k)
            spent[kind] = dict(s=time.perf_counter() - t0, n=len(requests), answers=out)
            return out
        return run

    for kind in TASKS:
        setattr(lm, kind, timed(kind, getattr(lm, kind)))
    passes = []
    for i in range(args.repeats):
        spent.clear()
        lm_eval.simple_evaluate(model=lm, tasks=list(TASKS.values()), limit=args.limit, task_manager=tm)
        passes.append({k: dict(v) for k, v in spent.items()})
        print(f"  pass {i + 1}: " + ", ".join(f"{k} {v['n']} in {v['s']:.1f} s" for k, v in spent.items()),
              file=sys.stderr, flush=True)
    last = passes[-1]
    return dict(first={k: v["s"] for k, v in passes[0].items()}, seconds={k: v["s"] for k, v in last.items()},
                requests={k: v["n"] for k, v in last.items()},
                answers={k: [list(a) if isinstance(a, tuple) else a for a in v["answers"]] for k, v in last.items()})


def jaxft_side(args) -> dict:
    import jax

    from jaxft.lm_eval import JaxftLM, score_calls

    t0 = time.perf_counter()
    lm = JaxftLM(str(hf_dir()), batch_size=args.batch_size)
    load = time.perf_counter() - t0
    r = evaluate(lm, args)
    return dict(r, framework="jaxft", load_s=load, compiles=score_calls(), version=f"jax {jax.__version__}")


def hflm_side(args) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(hf_dir()), dtype="float32", device="cpu", batch_size=args.batch_size)
    load = time.perf_counter() - t0
    r = evaluate(lm, args)
    return dict(r, framework="HFLM", load_s=load, version=f"torch {torch.__version__} ({torch.get_num_threads()} "
                                                              f"threads)")


def summarize(r, args):
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=48, help="documents per task (48: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="HFLM's batch size and JaxftLM's generation rows")
    ap.add_argument("--repeats", type=int, default=2, help="passes; the last is reported")
    add_side_args(ap, ["jaxft", "hflm"])
    args = ap.parse_args()
    if serve_worker(args, {"jaxft": jaxft_side, "hflm": hflm_side}):
        return
    hf_dir()  # convert once, outside the timed workers
    busy, res = run_sides(args, ["jaxft", "hflm"], summarize, __file__)
    rows = []
    for r in res.values():
        for kind in TASKS:
            rows.append(dict(side=r["framework"], kind=kind, n=r["requests"][kind], s=r["seconds"][kind],
                             first=r["first"][kind], rps=r["requests"][kind] / r["seconds"][kind]))
    print(f"\nexample model (SmolLM2-135M-Instruct, float32), tasks {', '.join(TASKS.values())}, --limit {args.limit}, "
          f"batch {args.batch_size}; cpu: {os.cpu_count()} cores, flags {' '.join(cpu_flags()) or 'none'}")
    print("\n".join(table([("side", "<6", "side"), ("request type", "<15", "kind"), ("requests", ">8", "n"),
                           ("warm s", ">8.1f", "s"), ("first pass s", ">12.1f", "first"),
                           ("requests/s", ">10.2f", "rps")], rows)))
    ratios = {}
    if len(res) == 2:
        j, h = res["jaxft"], res["hflm"]
        for kind in TASKS:
            ratios[f"{kind}: jaxft / HFLM requests/s"] = h["seconds"][kind] / j["seconds"][kind]
        lj, lh = j["answers"]["loglikelihood"], h["answers"]["loglikelihood"]
        dmax = max(abs(a[0] - b[0]) for a, b in zip(lj, lh))
        greedy = sum(a[1] == b[1] for a, b in zip(lj, lh))
        gj, gh = j["answers"]["generate_until"], h["answers"]["generate_until"]
        print(f"answers: max |Δ loglikelihood| {dmax:.2e} over {len(lj)} requests, is_greedy equal on "
              f"{greedy}/{len(lj)}; identical generations {sum(a == b for a, b in zip(gj, gh))}/{len(gj)}; "
              f"jaxft compiled {j['compiles']} scoring programs")
    print("\n".join(ratio_lines(ratios)))
    print("\n".join(noise_lines(res.values())))
    write_json(args.json, results={k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in res.items()},
               ratios=ratios, busy=busy)


if __name__ == "__main__":
    main()
