"""Optimizers over the trainable subtree: AdamW with warmup + decay, clipping, a decay mask, LoRA+, and the
per-adapter optimizer of a multi-adapter bank.

    tx = run_optimizer(run, run.train.steps, params)     # make_optimizer, or bank_optimizer with `adapters:`

Functions of config values and the params' tree structure: no model, no I/O.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxft.config import OptimConfig, RunConfig

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


def leaf_names(params) -> object:
    """A tree like params whose leaves are the parameter's name (kernel, embedding, scale, bias, a, b)."""
    def name(path, _):
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]

    return jax.tree_util.tree_map_with_path(name, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, params) -> optax.GradientTransformation:
    """AdamW with warmup + decay, global-norm clipping, decay masked to matrices, LoRA+ lr for B."""
    sched = schedule(cfg, total_steps)
    names = leaf_names(params)
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


def bank_optimizer(run, total_steps: int, params):
    """The optimizer of a multi-adapter run: N separate runs' optimizers on the stacked adapter axis.

    What make_optimizer does for one adapter, per adapter n: global-norm clipping over adapter
    n's slices only, AdamW (elementwise, so stacking changes nothing), and adapter n's own learning rate
    schedule (its adapters[n].lr, else optim.lr; LoRA+'s B ratio on top). Every trainable leaf is a bank
    factor [L, N, ...] (adapters: admits no modules_to_save), so axis 1 is the adapter axis everywhere."""
    cfg = run.optim
    scheds = list(lr_schedules(run, total_steps).values())
    names = leaf_names(params)
    mult = jax.tree.map(lambda n: cfg.lora_b_lr_ratio if n == "b" else 1.0, names)
    decay_mask = jax.tree.map(lambda n: n not in NO_DECAY_LEAVES, names)
    along = lambda v, t: v.reshape((1, -1) + (1,) * (t.ndim - 2)).astype(t.dtype)  # noqa: E731 — [N] on axis 1

    def clip(max_norm):
        def update(updates, state, params=None):
            sq = sum(jnp.sum(jnp.square(t), axis=tuple(i for i in range(t.ndim) if i != 1))
                     for t in jax.tree.leaves(updates))
            norm = jnp.sqrt(sq)  # [N]: each adapter's own global norm
            keep = lambda t: (norm < max_norm).reshape(along(norm, t).shape)  # noqa: E731 — per adapter, as optax
            return jax.tree.map(lambda t: jnp.where(keep(t), t, (t / along(norm, t)) * max_norm), updates), state
        return optax.GradientTransformation(optax.init_empty_state, update)

    def scale_by_schedules():
        def init(params):
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

        def update(updates, state, params=None):
            lrs = jnp.stack([s(state.count) for s in scheds])  # [N]
            new = jax.tree.map(lambda g, m: along(-(lrs * m) if m != 1.0 else -lrs, g) * g, updates, mult)
            return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        return optax.GradientTransformation(init, update)

    tx = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask), scale_by_schedules())
    return optax.chain(clip(cfg.clip_norm), tx) if cfg.clip_norm else tx


def lr_schedules(run: RunConfig, total_steps: int) -> dict[str, optax.Schedule]:
    """The learning rates a run follows, by the name its metrics log them under: {"lr": optim.lr's schedule},
    or with `adapters:` one `lr_<name>` per adapter (its adapters[n].lr, else optim.lr)."""
    if not run.adapters:
        return {"lr": schedule(run.optim, total_steps)}
    return {f"lr_{a.name}": schedule(dataclasses.replace(run.optim, lr=run.optim.lr if a.lr is None else a.lr),
                                     total_steps) for a in run.adapters}


def run_optimizer(run: RunConfig, total_steps: int, params) -> optax.GradientTransformation:
    """The run's optimizer: one AdamW over the trainable tree, or with `adapters:` N adapters' own optimizers
    on the bank's adapter axis."""
    return bank_optimizer(run, total_steps, params) if run.adapters else make_optimizer(run.optim, total_steps, params)
