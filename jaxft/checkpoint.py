"""Orbax checkpoints of a run: trainable params, optimizer state, step counters, data position, config.

    <out_dir>/checkpoints/<step>/state   the train state pytree (never the frozen base weights)
    <out_dir>/checkpoints/<step>/meta    JSON: step, data position, the resolved run config

Orbax writes each step to a temporary directory and renames it when complete, so a run killed while
saving leaves no half checkpoint under a final name. A checkpoint that exists but does not restore
(damaged files) is reported, moved aside to `<step>.damaged-<time>` and the previous one is used; when
none restores, resuming is an error (never a silent restart from step 0). A checkpoint is never written
from non-finite arrays.

Orbax checks no sums: a flipped bit in a compressed chunk often still decodes, to other numbers. So the meta
holds two 32-bit sums of each array's words (`checksums`), written with the checkpoint and compared after
every restore: a checkpoint whose arrays do not match them, or whose meta names another step, is damaged
(checkpoints written before the sums existed restore unchecked).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxft.distributed import barrier, everywhere, is_primary, listed_everywhere
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
        bad, sums = _summaries(state)
        if bad:
            raise JaxftError(f"{self.dir / str(step)}: not written: {len(bad)} array(s) of the train state hold "
                             f"NaN/Inf (first: {bad[0]}); lower optim.lr or check the data and the base model")
        meta = {**meta, CHECKSUMS: sums}
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
        """The newest checkpoint that restores on every process, or None when there is none at all; damaged
        ones are moved aside and skipped. JaxftError when checkpoints exist (or were moved aside as damaged)
        but none restores: resuming must not silently become a run from step 0. With several processes,
        every one restores the same step (see `newest_agreed`)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if restored := newest_agreed(self.dir, self.steps(), args, self._set_aside):
            return restored
        if everywhere(not self.steps() and not self.damaged()):
            return None
        if self.steps():  # listed here but not on every process (a host's own copy), or not movable
            raise JaxftError(f"{self.dir}: no checkpoint restores on every process (steps "
                             f"{', '.join(map(str, self.steps()))} are not listed on every process)")
        damaged = self.damaged()
        raise JaxftError(f"{self.dir}: no checkpoint restores; {len(damaged)} damaged, moved aside to "
                         f"{', '.join(p.name for p in damaged) or '(on another host)'}; pass --restart to train "
                         "from step 0 (the checkpoints directory is kept as checkpoints.old-<time>)")

    def _set_aside(self, step: int, error: Exception | None) -> None:
        """Step `step` failed on this process (`error`) or on another (None): process 0 moves it aside (out of
        the way of new saves, kept for inspection); after it, a process that still sees the step moves its
        own copy (a host's local directory)."""
        where = self.dir / str(step)
        if error is not None:
            on = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
            print(f"jaxft: checkpoint {where} is damaged{on} ({describe(error)})", file=sys.stderr)
        if is_primary():
            self._move_aside(where)
        barrier(f"jaxft: step {step} moved aside")
        if where.exists():
            self._move_aside(where)
        self.manager.reload()

    def _move_aside(self, where: Path) -> None:
        aside = where.with_name(f"{where.name}.damaged-{int(time.time())}")
        where.rename(aside)
        print(f"jaxft: moved {where} to {aside.name}; trying the previous one", file=sys.stderr)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def newest_agreed(ckpt_dir: Path, steps, args, failed) -> tuple[object, dict] | None:
    """(state, meta) of the newest of `steps` that restores and verifies on every process, or None.

    Every process calls it (a collective). Only steps that every process lists are tried, newest first; each
    process restores on its own, with no barrier of Orbax's (its restore ends in one that a process whose read
    failed never reaches: the others would wait there for ever, or meet a process that went on to an older
    step in the next one and mix the two), and then they agree whether all restored. A step that failed on any
    process is `failed(step, this process's error or None)` on every process, and the previous one is tried."""
    alone = ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})
    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone)
    try:
        for step in reversed(listed_everywhere(steps)):
            out, error = None, None
            try:
                with quiet_background_errors():
                    out = reader.restore(ckpt_dir / str(step), args=args)
                    jax.block_until_ready(out.state)
            except Exception as e:  # noqa: BLE001 — any failure to read means "damaged"
                error = e
            if everywhere(error is None):  # the sums are a collective: taken once every process holds the step
                try:
                    meta = verified(out.state, out.meta, step)
                except Exception as e:  # noqa: BLE001 — a meta or sums that do not match: damaged
                    error = e
                if everywhere(error is None):
                    return out.state, meta
            failed(step, error)
    finally:
        reader.close()
    return None


def describe(error: Exception) -> str:
    """`Type: the first line of the message` (200 characters at most)."""
    cause = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {cause[:200]}" if cause else type(error).__name__


def restore_trainable(out_dir: str | Path, params_like) -> tuple[object, dict]:
    """The trainable params of a run's newest restorable checkpoint, onto the shardings of `params_like`
    (e.g. one device, whatever mesh or hosts trained it): only `state/params` is read, never the
    optimizer state. Returns (params, meta); a JaxftError when no checkpoint restores."""
    ckpt_dir = Path(out_dir).absolute() / "checkpoints"
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params_like)
    item = {"params": abstract}
    args = ocp.args.Composite(meta=ocp.args.JsonRestore(), state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    errors = []
    restored = newest_agreed(ckpt_dir, saved_steps(out_dir), args, lambda step, e: errors.append(
        f"{step}: {describe(e) if e is not None else 'damaged on another process'}"))
    if restored:
        return restored[0]["params"], restored[1]
    if errors:
        raise JaxftError(f"{ckpt_dir}: no checkpoint restores ({'; '.join(errors)})")
    raise JaxftError(f"{Path(out_dir)}: no checkpoint to read (train first)")


CHECKSUMS = "checksums"  # meta key: {array path: [sum of its words, index-weighted sum], both mod 2**32}


def verified(state, meta, step: int) -> dict:
    """The checkpoint's meta, after checking it names `step` and that every restored array of `state` has the
    sums written with it; ValueError (a damaged checkpoint) otherwise. The sums are taken first, whatever the
    meta says: with several processes they are a collective that every process must reach."""
    _, sums_of = _summaries(state)
    if not isinstance(meta, dict) or meta.get("step") != step or isinstance(meta.get("step"), bool):
        named = meta.get("step") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"its meta names step {str(named)[:40]}, not {step}")
    want = meta.get(CHECKSUMS)
    if want is None:  # written before the sums existed
        return dict(meta)
    if not isinstance(want, dict):
        raise ValueError(f"its meta's {CHECKSUMS} is not a mapping")
    for path, sums in sums_of.items():
        if path not in want:
            raise ValueError(f"its meta has no checksum for {path}")
        if want[path] != sums:
            raise ValueError(f"{path} does not match the checksum written with it (damaged data)")
    return dict(meta)


def _summaries(tree) -> tuple[list[str], dict[str, list[int]]]:
    """(paths of the floating-point arrays holding NaN/Inf, {path: [Σ words, Σ (i + 1) · word_i] mod 2**32})
    of every array of tree, in one pass over the devices. Integer sums are exact in any order, so they do
    not depend on the mesh or the shards an array is read back onto."""
    flat = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)]
    if not flat:
        return [], {}
    finite, s1, s2 = jax.device_get(_leaf_summaries([x for _, x in flat]))
    bad = [path for (path, _), ok in zip(flat, finite) if not ok]
    return bad, {path: [int(a), int(b)] for (path, _), a, b in zip(flat, s1, s2)}


@jax.jit
def _leaf_summaries(leaves):
    finite, s1, s2 = [], [], []
    for x in leaves:
        x = jnp.asarray(x)
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
        if x.dtype == jnp.bool_:
            words = x.astype(jnp.uint32)
        else:
            words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
            words = words.astype(jnp.uint32)
        index, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for d in reversed(range(x.ndim)):  # the flat index, mod 2**32
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
            stride *= x.shape[d]
        s1.append(jnp.sum(words, dtype=jnp.uint32))
        s2.append(jnp.sum(words * (index + jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(finite), jnp.stack(s1), jnp.stack(s2)


@contextlib.contextmanager
def quiet_background_errors():
    """Orbax restores in an asyncio loop of its own: when one array of a damaged checkpoint fails, the reads
    still pending end after that loop closed, and Python prints each as an "Exception ignored in ..."
    traceback, then or much later (a thread finishing a read). They say nothing that the error (reported in
    one line by the caller) does not, so from the first restore on, unraisable errors of orbax's reads are
    dropped; every other one still reaches the hook that was installed before."""
    if not isinstance(sys.unraisablehook, _DropOrbaxLeftovers):
        sys.unraisablehook = _DropOrbaxLeftovers(sys.unraisablehook)
    try:
        yield
    finally:
        gc.collect()  # the failed reads' coroutines are collected (and dropped) now


class _DropOrbaxLeftovers:
    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        where = getattr(code, "co_filename", "") or ""
        if "orbax" in where or "Event loop is closed" in str(unraisable.exc_value):
            return
        self.previous(unraisable)


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


def saved_steps(out_dir: str | Path) -> list[int]:
    """The steps of a run's finished checkpoints, from the directory listing alone (nothing is read: cheap, for
    the checks made before a model loads); damaged ones moved aside and unfinished saves are not steps."""
    d = Path(out_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()) if d.is_dir() else []


def require_checkpoint(out_dir: str | Path) -> None:
    """JaxftError when the run has no checkpoint to read (before its model is loaded for nothing)."""
    if not saved_steps(out_dir):
        raise JaxftError(f"{Path(out_dir)}: no checkpoint to read (train first; `jaxft eval --base-only` evaluates "
                         "the base model alone)")


def set_aside(out_dir: str | Path) -> Path | None:
    """Move <out_dir>/checkpoints to checkpoints.old-<time> (kept, never deleted) so that a run can start
    over from step 0 in the same directory; returns where they went (None when there were none)."""
    ckpts = Path(out_dir).absolute() / "checkpoints"
    if not ckpts.exists():
        return None
    aside = ckpts.with_name(f"checkpoints.old-{int(time.time())}")
    ckpts.rename(aside)
    return aside
