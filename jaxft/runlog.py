"""What a run reports: metrics.jsonl (+ TensorBoard), the progress bar, the loss plot.

    log = RunLog(out, start, run, objective, primary, progress)
    log.step(step, metrics)      # device metrics of a step; read one step late, so the device keeps busy
    log.eval(step, results)      # objective.evaluate's {"eval_loss": …}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

from jaxft.errors import JaxftError
from jaxft.files import atomic_path, write_text


class MetricsLog:
    """metrics.jsonl (+ TensorBoard event files) in the run directory."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled  # only process 0 of a multi-host run writes
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop what the interrupted run logged after its checkpoint
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
            write_text(self.path, "".join(r + "\n" for r in rows))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class RunLog:
    """Per-step rows (loss, lr, grad norm, the objective's count and metrics, throughput), evaluation
    rows, the progress bar; raises when too many steps in a row were non-finite."""

    def __init__(self, out: Path, start: int, run, objective, primary: bool, progress: bool):
        from tqdm import tqdm

        self.run, self.obj = run, objective
        self.metrics = MetricsLog(out, start, enabled=primary)
        self.say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
        self.bar = tqdm(total=run.train.steps, initial=start, disable=not progress, dynamic_ncols=True,
                        file=sys.stderr)
        self.t0, self.tokens, self.rate_from = time.perf_counter(), 0, None  # throughput excludes compilation
        self.pending, self.last = None, {}

    def step(self, step: int, metrics: dict):
        """Record step `step`'s (device) metrics; the previous step's are read now."""
        self.flush()
        self.pending = (step, metrics, time.perf_counter())
        self.bar.update(1)

    def flush(self) -> dict:
        if self.pending is None:
            return self.last
        step, m, t = self.pending
        self.pending = None
        m = {k: v.item() for k, v in jax.device_get(m).items()}
        self.tokens += int(m["tokens"])
        if self.rate_from is None:
            self.rate_from = (t, self.tokens)
        rate = (self.tokens - self.rate_from[1]) / (t - self.rate_from[0]) if t > self.rate_from[0] else 0.0
        lrs = {k: m[k] for k in m if k == "lr" or k.startswith("lr_")}  # one per adapter of a multi-adapter run
        row = dict(step=step, loss=m["loss"], **lrs, grad_norm=m["grad_norm"], tokens=int(m["tokens"]),
                   **{self.obj.count_name: int(m["targets"])}, tokens_per_s=rate, elapsed=t - self.t0,
                   skipped=not m["finite"], **{k: m[k] for k in self.obj.metrics if k in m})
        if step % self.run.train.log_every == 0 or step == self.run.train.steps:
            self.metrics.write(row)
        shown = {k.replace("/", "_"): f"{m[k]:.4g}" for k in self.obj.progress if k in m}
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", **shown, tok_s=f"{rate:.0f}")
        if m["bad_steps"] >= self.run.train.max_bad_steps:
            raise JaxftError(f"stopped at step {step}: loss, gradients or updated weights were NaN/Inf for "
                             f"{m['bad_steps']} steps in a row (updates skipped; no checkpoint written). "
                             f"Lower optim.lr or check the data.")
        if not m["finite"]:
            self.say(f"\nstep {step}: non-finite loss/gradients/update, update skipped")
        self.last = row
        return row

    def eval(self, step: int, results: dict):
        self.flush()
        self.metrics.write(dict(step=step, **results))
        self.last.update(results)
        extra = ", ".join(f"{k.removeprefix('eval_')} {results[k]:.4f}" for k in self.obj.headline if k in results)
        self.say(f"\nstep {step}: validation loss {results['eval_loss']:.4f} ({extra})")

    def close(self):
        self.bar.close()
        self.metrics.close()


def plot_losses(metrics_path: Path, out_png: Path, extra: tuple[str, ...] = ()):
    """Training loss (and validation loss) against step, written to a PNG; `extra` step metrics (the
    objective's progress names: an RL run's reward and KL, whose loss says little) get a panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in metrics_path.read_text().splitlines() if r]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in extra}
    series = {k: v for k, v in series.items() if v}
    fig, axes = plt.subplots(1 + len(series), 1, figsize=(7, 4 + 2.5 * len(series)), sharex=True, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_ylabel("loss (per counted unit)")
    ax.grid(alpha=0.3)
    ax.legend()
    for a, (k, pts) in zip(axes[1:, 0], series.items()):
        a.plot(*zip(*pts), lw=1, color="tab:green")
        a.set_ylabel(k)
        a.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
