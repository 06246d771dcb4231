"""Optimizer, the pure train step, and the plain training loop.

    state, metrics = step(state, frozen, batch)      # jax.jit, state donated

`state` holds only what trains (LoRA factors / modules_to_save / every weight for full fine-tuning),
the optimizer state and counters; `frozen` holds the base weights and is never differentiated.
A step takes `grad_accum` micro-batches [A, B, S]: (loss sum, target count) and gradient sums are
carried across them and divided once, so every target token weighs the same whatever the split.
A step whose loss, gradients, new weights or optimizer state are not finite changes nothing and is counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import lora
from jaxft.config import OptimConfig, RunConfig, check_files
from jaxft.errors import JaxftError
from jaxft.losses import sft_loss

NO_DECAY_LEAVES = ("scale", "bias")  # norms and biases: no weight decay


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine / linear decay to lr * min_lr_ratio (or constant)."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(cfg.lr / warm, cfg.lr, warm - 1), decay], [warm])


def _leaf_names(params) -> object:
    """A tree like params whose leaves are the parameter's name (kernel, embedding, scale, bias, a, b)."""
    def name(path, _):
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]

    return jax.tree_util.tree_map_with_path(name, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, params) -> optax.GradientTransformation:
    """AdamW with warmup + decay, global-norm clipping, decay masked to matrices, LoRA+ lr for B."""
    sched = schedule(cfg, total_steps)
    names = _leaf_names(params)
    decay_mask = jax.tree.map(lambda n: n not in NO_DECAY_LEAVES, names)

    def adamw(mult: float):
        return optax.adamw(lambda s: sched(s) * mult, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)

    tx = adamw(1.0)
    if cfg.lora_b_lr_ratio != 1.0:
        labels = jax.tree.map(lambda n: "lora_b" if n == "b" else "rest", names)
        tx = optax.multi_transform({"rest": adamw(1.0), "lora_b": adamw(cfg.lora_b_lr_ratio)}, labels)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def init_state(params, tx) -> dict:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 — distinct buffers: the state is donated
    return dict(params=params, opt_state=tx.init(params), step=zero(), bad_steps=zero(), skipped=zero())


def make_train_step(graphdef, tx, loss_fn: Callable = sft_loss, *, seed: int = 0, dropout: bool = False,
                    lr_schedule: optax.Schedule | None = None, out_shardings=None):
    """The jitted, donated step: (state, frozen, batch [A, B, S]) → (state, metrics).

    out_shardings: (state shardings, metrics sharding) keep a sharded state in place step to step."""
    base_key = jax.random.key(seed)

    def step(state, frozen, batch):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])

        def f(p, mb, k):  # loss_fn returns (sum, count) or (sum, count, {metric: sum})
            s, c, *aux = loss_fn(nnx.merge(graphdef, p, frozen), mb, k)
            return s, (c, aux[0] if aux else {})

        def micro(carry, xs):
            mb, i = xs
            k = jax.random.fold_in(key, i) if dropout else None
            (s, (c, aux)), g = jax.value_and_grad(f, has_aux=True)(params, mb, k)
            return jax.tree.map(jnp.add, carry, (s, c, aux, g)), None

        A = jax.tree.leaves(batch)[0].shape[0]
        aux_shape = jax.eval_shape(f, params, jax.tree.map(lambda x: x[0], batch), None)[1][1]
        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape),
                 jax.tree.map(jnp.zeros_like, params))
        (s, c, aux, g), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(A)))
        denom = jnp.maximum(c, 1.0)
        loss = s / denom
        grads = jax.tree.map(lambda x: x / denom, g)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # Finite gradients can still give non-finite weights (an infinite lr, an update that overflows,
        # Adam moments that overflow): keep the step only if everything it would keep is finite.
        finite &= _all_finite((new_params, opt_state))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731 — a bad step changes nothing
        new_state = dict(
            params=jax.tree.map(keep, new_params, params),
            opt_state=jax.tree.map(keep, opt_state, state["opt_state"]),
            step=state["step"] + 1,
            bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1),
            skipped=state["skipped"] + (~finite).astype(jnp.int32),
        )
        metrics = dict(loss=loss, targets=c, tokens=jnp.sum(batch["segment_ids"] > 0), grad_norm=grad_norm,
                       finite=finite, bad_steps=new_state["bad_steps"], **{k: v / denom for k, v in aux.items()})
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return new_state, metrics

    return jax.jit(step, donate_argnums=0, **({} if out_shardings is None else dict(out_shardings=out_shardings)))


def _all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of tree is free of NaN / Inf (a scalar bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def make_eval_step(graphdef, loss_fn: Callable = sft_loss):
    """(params, frozen, batch [B, S]) → loss_fn's (loss sum, target count[, metric sums])."""
    return jax.jit(lambda params, frozen, batch: loss_fn(nnx.merge(graphdef, params, frozen), batch, None))


def evaluate_loss(eval_step, params, frozen, batches, n: int) -> dict:
    """Mean loss and perplexity over the first n batches of a deterministic batch stream (n=0: all)."""
    n = len(batches) if n == 0 else min(n, len(batches))
    s = c = 0.0
    for i in range(n):
        bs, bc = eval_step(params, frozen, batches.batch(i))
        s, c = s + float(bs), c + float(bc)
    loss = s / max(c, 1.0)
    return dict(eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), eval_tokens=int(c))


class Prefetch:
    """Builds the batches of steps start, start+1, ... on a background thread: fetch(step) → batch
    [A, B, S] (jaxft.sharding.ShardedBatches.step: each process assembles only its rows)."""

    def __init__(self, fetch: Callable[[int], dict], start: int, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = False

        def work():
            step = start
            while not self.stop:
                try:
                    self.q.put(fetch(step))
                except BaseException as e:  # hand it to the loop instead of leaving it waiting forever
                    self.q.put(e)
                    return
                step += 1

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def next(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop = True
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass


class MetricsLog:
    """metrics.jsonl (+ TensorBoard event files) in the run directory."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled  # only process 0 of a multi-host run writes
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop what the interrupted run logged after its checkpoint
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
            _atomic_write(self.path, "".join(r + "\n" for r in rows))
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


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_losses(metrics_path: Path, out_png: Path):
    """Training loss (and validation loss) against step, written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in metrics_path.read_text().splitlines() if r]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


@dataclasses.dataclass
class Objective:
    """What a run trains on: batches, loss_fn(model, batch, key) → (sum, count[, metric sums]), and
    evaluate(params, frozen) → {eval_loss, ...} (None without a validation split)."""

    batches: object
    val_batches: object
    loss_fn: Callable
    evaluate: Callable | None


def sft_objective(run: RunConfig, setup, say, wrap: Callable = lambda b: b) -> Objective:
    """SFT batches (each wrapped by `wrap`, e.g. into sharded global batches), loss and validation."""
    from jaxft.data import Batches, load_examples

    def batches(split: str):
        examples, report = load_examples(run.data, setup.tokenizer, split)
        say(f"{split} data: {report.summary()}")
        return wrap(Batches(examples, run.train.batch_size, run.data.max_length, run.data.packing, run.data.seed))

    train_batches = batches("train")
    if run.data.validation is None and run.data.validation_fraction == 0:
        return Objective(train_batches, None, sft_loss, None)
    val_batches, eval_step = batches("validation"), make_eval_step(setup.graphdef)
    return Objective(train_batches, val_batches, sft_loss,
                     lambda p, f: evaluate_loss(eval_step, p, f, val_batches, run.train.eval_batches))


@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step (also used by eval and export)."""

    run: RunConfig
    model_path: Path
    tokenizer: object
    graphdef: object
    params: object
    frozen: object


def resolve_model_path(path: str) -> Path:
    if path == "example":
        from jaxft.example import example_model

        return example_model()
    return Path(path).expanduser()


def build_model(run: RunConfig, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Load the base model (+ tokenizer), attach LoRA, split trainable / frozen; with a mesh, every
    parameter is read straight into its shards (run.mesh.strategy) and activations are constrained."""
    from jaxft import sharding
    from jaxft.hf import load_pretrained, load_tokenizer

    path = resolve_model_path(run.model.path)
    compute = jnp.bfloat16 if run.model.dtype == "bf16" else jnp.float32
    param_dtype = compute if run.lora.enabled else jnp.float32  # full FT keeps fp32 master weights
    model = load_pretrained(path, dtype=param_dtype, compute_dtype=compute, remat=run.model.remat, quant=run.quant,
                            sharding=None if mesh is None else sharding.param_sharding(mesh, run.mesh.strategy))
    if mesh is not None and mesh.size > 1:
        model.constrain = sharding.activation_constraint(mesh)
    tokenizer = load_tokenizer(path)
    if run.lora.enabled and run.lora.init_adapter:  # continue from an existing PEFT adapter
        from jaxft.peft import load_adapter

        got = load_adapter(model, run.lora.init_adapter)
        if (got.r, got.alpha, got.rslora) != (run.lora.r, run.lora.alpha, run.lora.rslora):
            raise JaxftError(f"lora.init_adapter: {run.lora.init_adapter} has r={got.r}, alpha={got.alpha}, "
                             f"rslora={got.rslora}; set lora.r / lora.alpha / lora.rslora to match")
    elif run.lora.enabled:
        lora.attach(model, run.lora, jax.random.key(run.train.seed))
    graphdef, params, frozen = lora.split(model, run.lora)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # fp32 master weights + optimizer state
    if mesh is not None:  # LoRA factors are made on one device: move them to their shards
        params = sharding.place(params, sharding.tree_shardings(params, mesh, run.mesh.strategy))
        frozen = sharding.place(frozen, sharding.tree_shardings(frozen, mesh, run.mesh.strategy))
    return Setup(run, path, tokenizer, graphdef, params, frozen)


def train(run: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole SFT run; returns the final metrics. See README 'Training' for the run directory."""
    from tqdm import tqdm

    from jaxft import sharding
    from jaxft.checkpoint import Checkpoints

    check_files(run)
    sharding.init_distributed(run.mesh)
    mesh, primary = sharding.make_mesh(run.mesh), sharding.is_primary()
    progress = progress and primary
    out = Path(run.train.out_dir)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
        raise JaxftError(f"{out}: already holds checkpoints; pass --resume to continue or choose another "
                         f"train.out_dir")
    out.mkdir(parents=True, exist_ok=True)
    setup = build_model(run, mesh)
    say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)

    if run.objective == "dpo":
        from jaxft.dpo import objective
    else:
        objective = sft_objective
    obj = objective(run, setup, say, lambda b: sharding.ShardedBatches(b, mesh))
    batches, val_batches = obj.batches, obj.val_batches

    tx = make_optimizer(run.optim, run.train.steps, setup.params)
    state, state_sh = sharding.sharded_init(lambda p: init_state(p, tx), setup.params, mesh, run.mesh.strategy)
    ckpts = Checkpoints(out, run.train.keep)
    start = 0
    if resume:
        restored = ckpts.restore_latest(jax.tree.map(  # onto this run's mesh, whatever mesh saved it
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh))
        if restored is not None:
            state, meta = restored
            start = int(meta["step"])
            say(f"resumed from {ckpts.dir / str(start)} (step {start})")
    sched = schedule(run.optim, run.train.steps)
    step_fn = make_train_step(setup.graphdef, tx, obj.loss_fn, seed=run.train.seed,
                              dropout=run.lora.enabled and run.lora.dropout > 0, lr_schedule=sched,
                              out_shardings=(state_sh, sharding.replicated(mesh)))
    log = MetricsLog(out, start, enabled=primary)
    meta = lambda step: dict(step=step, data_position=step * run.train.grad_accum,  # noqa: E731
                             micro_batches_per_epoch=len(batches), config=run.to_dict())
    if primary:
        (out / "config.json").write_text(json.dumps(run.to_dict(), indent=1))

    frozen = setup.frozen
    prefetch = Prefetch(lambda s: batches.step(s, run.train.grad_accum), start)
    bar = tqdm(total=run.train.steps, initial=start, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    t0, tokens_seen, pending, last = time.perf_counter(), 0, None, {}
    rate_from = None  # (time, tokens) after the first step: throughput excludes compilation

    def flush(pending):  # read the previous step's metrics: the device is already busy with the next
        step, m, t = pending
        m = {k: v.item() for k, v in jax.device_get(m).items()}
        nonlocal tokens_seen, rate_from
        tokens_seen += int(m["tokens"])
        elapsed = t - t0
        if rate_from is None:
            rate_from = (t, tokens_seen)
        rate = (tokens_seen - rate_from[1]) / (t - rate_from[0]) if t > rate_from[0] else 0.0
        row = dict(step=step, loss=m["loss"], lr=m.get("lr"), grad_norm=m["grad_norm"], tokens=int(m["tokens"]),
                   targets=int(m["targets"]), tokens_per_s=rate, elapsed=elapsed,
                   skipped=not m["finite"], **{k: v for k, v in m.items() if "/" in k})
        if step % run.train.log_every == 0 or step == run.train.steps:
            log.write(row)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if m["bad_steps"] >= run.train.max_bad_steps:
            raise JaxftError(f"stopped at step {step}: loss, gradients or updated weights were NaN/Inf for "
                             f"{m['bad_steps']} steps "
                             f"in a row (updates skipped; no checkpoint written). Lower optim.lr or check the data.")
        if not m["finite"]:
            say(f"\nstep {step}: non-finite loss/gradients/update, update skipped")
        return row

    preempted = sharding.Preemption()  # SIGTERM → checkpoint at the next step boundary, then a clean exit
    try:
        for step in range(start + 1, run.train.steps + 1):
            state, metrics = step_fn(state, frozen, prefetch.next())
            if pending is not None:
                last = flush(pending)
            pending = (step, metrics, time.perf_counter())
            bar.update(1)
            end = step == run.train.steps
            if (run.train.eval_every and step % run.train.eval_every == 0) or (end and val_batches is not None):
                if val_batches is not None:
                    last = flush(pending) or last
                    pending = None
                    ev = obj.evaluate(state["params"], frozen)
                    log.write(dict(step=step, **ev))
                    last.update(ev)
                    extra = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in ev.items()
                                      if k in ("eval_ppl", "eval_rewards/accuracies", "eval_rewards/margins"))
                    say(f"\nstep {step}: validation loss {ev['eval_loss']:.4f} ({extra})")
            stop = preempted(step) and not end
            if (run.train.save_every and step % run.train.save_every == 0) or end or stop:
                if pending is not None:
                    last = flush(pending) or last
                    pending = None
                ckpts.save(step, state, meta(step))
            if stop:
                say(f"\nstopped at step {step} (SIGTERM / preemption notice): checkpoint saved, continue with --resume")
                break
        if pending is not None:
            last = flush(pending)
    finally:
        preempted.close()
        prefetch.close()
        bar.close()
        log.close()
        ckpts.close()
    if primary:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    say(f"run directory: {out}  (checkpoints/, metrics.jsonl, tensorboard/, loss.png)")
    return last
