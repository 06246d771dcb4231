"""Orbax checkpoints of a run: trainable params, optimizer state, step counters, data position, config.

    <out_dir>/checkpoints/<step>/state   the train state pytree (never the frozen base weights)
    <out_dir>/checkpoints/<step>/meta    JSON: step, data position, the resolved run config

Orbax writes each step to a temporary directory and renames it when complete, so a run killed while
saving leaves no half checkpoint under a final name. A checkpoint that exists but does not restore
(damaged files) is reported, moved aside to `<step>.damaged-<time>` and the previous one is used; when
none restores, resuming is an error (never a silent restart from step 0). A checkpoint is never written
from non-finite arrays.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxft.errors import JaxftError


class Checkpoints:
    def __init__(self, out_dir: str | Path, keep: int):
        self.dir = Path(out_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Asynchronous: returns once the arrays are copied off the devices. JaxftError (nothing written)
        when any array of `state` holds NaN/Inf: such a checkpoint would poison every resume and export."""
        bad = nonfinite_paths(state)
        if bad:
            raise JaxftError(f"{self.dir / str(step)}: not written: {len(bad)} array(s) of the train state hold "
                             f"NaN/Inf (first: {bad[0]}); lower optim.lr or check the data and the base model")
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def damaged(self) -> list[Path]:
        """Checkpoints moved aside as damaged (by this or an earlier resume), oldest step first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if ".damaged-" in p.name),
                      key=lambda p: (int(p.name.split(".")[0]) if p.name.split(".")[0].isdigit() else -1, p.name))

    def restore_latest(self, abstract_state) -> tuple[object, dict] | None:
        """The newest checkpoint that restores, or None when there is none at all; damaged ones are moved
        aside and skipped. JaxftError when checkpoints exist (or were moved aside as damaged) but none
        restores: resuming must not silently become a run from step 0."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                jax.block_until_ready(out.state)
                return out.state, dict(out.meta)
            except Exception as e:  # noqa: BLE001 — any failure to read means "damaged"
                cause = str(e).splitlines()[0] if str(e) else type(e).__name__
                aside = self.dir / f"{step}.damaged-{int(time.time())}"
                print(f"jaxft: checkpoint {self.dir / str(step)} is damaged ({type(e).__name__}: {cause[:200]}); "
                      f"moved to {aside.name}, trying the previous one", file=sys.stderr)
                (self.dir / str(step)).rename(aside)  # kept for inspection, out of the way of new saves
                self.manager.reload()
        if self.steps():  # a reload still lists steps it could not move (should not happen, but never restart)
            raise JaxftError(f"{self.dir}: no checkpoint restores (all {len(self.steps())} damaged)")
        if damaged := self.damaged():
            raise JaxftError(f"{self.dir}: no checkpoint restores; {len(damaged)} damaged, moved aside to "
                             f"{', '.join(p.name for p in damaged)}; pass --restart to train from step 0 "
                             "(the checkpoints directory is kept as checkpoints.old-<time>)")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_trainable(out_dir: str | Path, params_like) -> tuple[object, dict]:
    """The trainable params of a run's newest restorable checkpoint, onto the shardings of `params_like`
    (e.g. one device, whatever mesh or hosts trained it): only `state/params` is read, never the
    optimizer state. Returns (params, meta); a JaxftError when no checkpoint restores."""
    ckpt_dir = Path(out_dir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False)) \
        if ckpt_dir.is_dir() else None
    try:
        steps = sorted(manager.all_steps()) if manager else []
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params_like)
        item = {"params": abstract}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        errors = []
        for step in reversed(steps):
            try:
                out = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
                    meta=ocp.args.JsonRestore()))
                return out.state["params"], dict(out.meta)
            except Exception as e:  # noqa: BLE001 — a damaged checkpoint: try the previous one
                errors.append(f"{step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if errors:
            raise JaxftError(f"{ckpt_dir}: no checkpoint restores ({'; '.join(errors)})")
        raise JaxftError(f"{Path(out_dir)}: no checkpoint to read (train first)")
    finally:
        if manager is not None:
            manager.close()


def nonfinite_paths(tree) -> list[str]:
    """The paths ("['params']['q_proj']...") of the floating-point arrays of tree that hold NaN/Inf."""
    flat = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not flat:
        return []
    finite = jax.device_get(_all_finite_per_leaf([x for _, x in flat]))
    return [path for (path, _), ok in zip(flat, finite) if not ok]


@jax.jit
def _all_finite_per_leaf(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def set_aside(out_dir: str | Path) -> Path | None:
    """Move <out_dir>/checkpoints to checkpoints.old-<time> (kept, never deleted) so that a run can start
    over from step 0 in the same directory; returns where they went (None when there were none)."""
    ckpts = Path(out_dir).absolute() / "checkpoints"
    if not ckpts.exists():
        return None
    aside = ckpts.with_name(f"checkpoints.old-{int(time.time())}")
    ckpts.rename(aside)
    return aside
