"""The benchmark harness that every scripts/bench_* script (and profile_* where it fits) shares.

A benchmark measures jaxft next to a reference (transformers + PEFT, TRL) on this machine, with the same
settings, in one run. The driver (`main`) runs each side in a fresh subprocess of its own script
(`script --worker SIDE --worker-out PATH`, Hugging Face offline), one after the other, so that each side's
peak RSS (ru_maxrss) is its own; the worker writes its figures as JSON and the driver adds how much CPU
other processes took meanwhile (the machine is shared). This module holds those pieces, the timing and
memory helpers the workers use, and the side-by-side table; each script keeps what it measures (its workers
and its own summary). It imports no jaxft, and torch / transformers only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# With `kernels` installed (transformers >= 5.25 pulls it in), bitsandbytes (which peft imports) fetches a kernel
# from the Hub at import on AVX512-BF16 CPUs: workers run offline, unless the caller set these.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1"}
NOISY_SHARE = 0.1  # other processes took more than this share of the machine: the figures are not trustworthy
NOISY = "  <-- NOISY: figures not trustworthy"


# ----------------------------------------------------------------------------------------------
# the command line and the fresh-process workers


def add_training_args(ap, steps: int = 5, warmup: int = 2, lr: float = 1e-4):
    """--steps, --warmup, --rank, --alpha, --lr: the settings every training benchmark takes."""
    ap.add_argument("--steps", type=int, default=steps, help="timed steps")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps before the timed ones")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=lr)


def training_argv(args) -> list[str]:
    """add_training_args's settings as a command line, for a worker of another script."""
    return [x for k in ("steps", "warmup", "rank", "alpha", "lr") for x in (f"--{k}", str(getattr(args, k)))]


def add_side_args(ap, sides, repeat: bool = True):
    """--only (the sides to run; repeatable unless repeat=False), --json OUT, and the workers' hidden
    --worker SIDE / --worker-out PATH."""
    import argparse

    ap.add_argument("--only", choices=list(sides), action="append" if repeat else "store",
                    help="run these sides only (repeatable)" if repeat else "run one side only")
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    ap.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)


def serve_worker(args, workers: dict) -> bool:
    """In a worker process (--worker SIDE): run workers[SIDE](args), write its figures to --worker-out, True."""
    if not getattr(args, "worker", None):
        return False
    Path(args.worker_out).write_text(json.dumps(workers[args.worker](args)))
    return True


def worker_argv(argv: list[str]) -> list[str]:
    """The command line minus --json / --only (what every side's worker gets)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--json", "--only"):
            skip = True
        elif not a.startswith(("--json=", "--only=")):
            out.append(a)
    return out


def offline_env() -> dict:
    """os.environ with OFFLINE_ENV's settings where the caller did not set them."""
    return {**OFFLINE_ENV, **os.environ}


def run_worker(name: str, argv: list[str], script: str, label: str | None = None, *,
               rss_budget_gb: float | None = None) -> dict:
    """Run one side (`script ARGV --worker name`) in a fresh subprocess; its figures plus wall_s, own_cpu_s and
    others_cpu_s (the CPU seconds other processes took meanwhile). Exits if the worker fails, unless
    rss_budget_gb is given: then a worker whose RSS passes the budget is killed, and a failed or killed worker
    gives {"failed": why} (bench_context.py looks for the longest sequence each side trains within a budget)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        print(f"[{label or name}] fresh subprocess ...", file=sys.stderr, flush=True)
        ru0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s(), time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(script), *argv, "--worker", name,
                                 "--worker-out", str(out)], env=offline_env())
        killed = _watch_rss(proc, rss_budget_gb) if rss_budget_gb else proc.wait() is None  # wait: an exit code
        ru1, busy1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s(), time.perf_counter() - t0
        if killed:
            return dict(failed=f"RSS passed {rss_budget_gb:g} GB", wall_s=wall)
        if proc.returncode != 0 or not out.exists():
            why = f"the {name} worker failed (exit code {proc.returncode})"
            if rss_budget_gb:
                return dict(failed=why, wall_s=wall)
            sys.exit(f"{Path(script).name}: {why}")
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        others = max(busy1 - busy0 - own, 0.0)
        return dict(json.loads(out.read_text()), wall_s=wall, own_cpu_s=own, others_cpu_s=others)


def _watch_rss(proc, budget_gb: float) -> bool:
    """Wait for proc, killing it once its RSS passes budget_gb (sampled every 0.1 s): True if killed."""
    import psutil

    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            if p.memory_info().rss / 1e9 > budget_gb:
                proc.kill()
                proc.wait()
                return True
        except psutil.Error:
            pass
        time.sleep(0.1)
    return False


def run_sides(args, sides, summarize, script: str) -> tuple[list[str], dict]:
    """The driver: warn of busy neighbours, then every side that --only selects in its own fresh worker, one
    after the other; (the busy processes, {side: summarize(its figures, args)})."""
    busy = warn_busy()
    only = [args.only] if isinstance(args.only, str) else args.only
    argv = worker_argv(sys.argv[1:])
    return busy, {s: summarize(run_worker(s, argv, script), args) for s in sides if not only or s in only}


def write_json(path: str | None, **figures):
    """Write the figures to --json's file, if one was given."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=1))


# ----------------------------------------------------------------------------------------------
# measuring, inside a worker


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


class RssSampler:
    """Highest RSS seen by a background thread (every `every` s) while active: the training-phase peak."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0.0, every, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gb())
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_gb())


def log_step(n: int, warmup: int, seconds: float, loss: float | None = None):
    """The progress line of step n (1-based) on stderr."""
    print(f"  step {n}{' (warmup)' if n <= warmup else ''}: {seconds:.2f} s" + ("" if loss is None else
          f"  loss {loss:.4f}"), file=sys.stderr, flush=True)


def run_steps(step, batches, warmup: int) -> tuple[list[float], list[float]]:
    """Call step(batch) → loss (a float, so the step has finished) for every batch; (times, losses)."""
    times, losses = [], []
    for b in batches:
        t0 = time.perf_counter()
        loss = step(b)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        log_step(len(times), warmup, times[-1], loss)
    return times, losses


def timed(fn, repeats: int):
    """(median seconds of `repeats` calls of fn(), the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def step_stats(r: dict, warmup: int, tokens: int) -> dict:
    """r plus first_step_s and, over the timed steps (r["times"] after `warmup`), step_s_median and the median
    and mean of tokens / step time."""
    steps = r["times"][warmup:]
    tps = [tokens / t for t in steps]
    return dict(r, first_step_s=r["times"][0], step_s_median=statistics.median(steps),
                tokens_per_s_median=statistics.median(tps), tokens_per_s_mean=statistics.mean(tps))


def trainer_step_times(warmup: int):
    """A transformers TrainerCallback that times every optimizer step into its .times (logged as run_steps does)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            log_step(len(self.times), warmup, self.times[-1])

    return StepTimes()


def in_order(trainer_cls):
    """A subclass of a transformers Trainer class that takes its training rows in order, like the jaxft side."""
    import torch

    class InOrder(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                      else self.train_dataset)

    return InOrder


# ----------------------------------------------------------------------------------------------
# the machine: CPU flags and the neighbours' load


def cpu_flags() -> list[str]:
    """This CPU's flags that decide matmul speed: avx512f*, avx512_bf16, amx*."""
    with open("/proc/cpuinfo") as f:
        return sorted({x for line in f if line.startswith("flags") for x in line.split()
                       if x.startswith(("avx512_bf16", "amx", "avx512f"))})


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def busy_processes() -> list[str]:
    """Other processes using CPU right now (a noisy machine skews the figures): 'pid name %cpu'."""
    import psutil

    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
        except psutil.Error:
            continue
        if c >= 20:
            busy.append(f"{p.pid} {p.info['name']} {c:.0f}%")
    return busy


def warn_busy() -> list[str]:
    """busy_processes(), also printed as a warning on stderr when there are any."""
    busy = busy_processes()
    if busy:
        print(f"warning: other busy processes: {'; '.join(busy)}", file=sys.stderr)
    return busy


def others_share(r: dict) -> float:
    """The share of the machine (all cores) that other processes took while r's worker ran."""
    return r["others_cpu_s"] / (r["wall_s"] * os.cpu_count())


def noise_lines(results) -> list[str]:
    """Per side: its worker's wall time and the share of the machine other processes took meanwhile."""
    return [f"{r['framework']}: worker {r['wall_s']:.0f} s wall; other processes {100 * others_share(r):.0f}% of the "
            f"machine" + (NOISY if others_share(r) > NOISY_SHARE else "") for r in results]


# ----------------------------------------------------------------------------------------------
# the summary


def table(columns, rows) -> list[str]:
    """A side-by-side table: a header, a rule as wide, a line per row, columns joined by " | ". `columns` are
    (title, spec, value): spec formats the value ('<13', '>12.1f', '>11,') and its alignment and width place
    the title; value is the row's key or a function of the row (a string for a figure with a unit: "1.23x")."""
    head = " | ".join(f"{title:{re.match(r'[<>^]?[0-9]*', spec).group()}}" for title, spec, _ in columns)
    return [head, "-" * len(head)] + [" | ".join(format(value(r) if callable(value) else r[value], spec)
                                                 for _, spec, value in columns) for r in rows]


def ratio_lines(ratios: dict) -> list[str]:
    """'name: 1.23x' per ratio."""
    return [f"{k}: {v:.2f}x" for k, v in ratios.items()]
