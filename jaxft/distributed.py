"""Several processes (hosts): start-up, who writes, and stopping together on a preemption notice.

    init_distributed(run.mesh)     # before anything touches a device
    if is_primary(): write(...)    # process 0 writes logs, progress, plots and exports
    stop = Preemption()            # stop(step) is True at the step every process saves and stops
    if everywhere(ok): ...         # ok on every process; gathered(x), from_primary(x), max_over_processes(a):
                                   # the other host-side collectives (every process calls them at the same point)
"""

from __future__ import annotations

import json
import pickle
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.config import MeshConfig
from jaxft.errors import JaxftError


def init_distributed(cfg: MeshConfig) -> None:
    """jax.distributed.initialize from mesh.coordinator_address / num_processes / process_id; unset
    ones come from the environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI) or, on Cloud TPU, are
    detected. Call before anything touches a device."""
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    except (ValueError, RuntimeError) as e:
        raise JaxftError(f"mesh.distributed: jax.distributed.initialize failed ({str(e).splitlines()[0]})") from None


def is_primary() -> bool:
    """Process 0 writes logs, progress, plots and exports."""
    return jax.process_index() == 0


def everywhere(ok: bool) -> bool:
    """True when `ok` is true on every process. A collective: every process calls it at the same point, so a
    process whose step failed reports it here instead of leaving the others waiting in the next collective."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def listed_everywhere(steps) -> list[int]:
    """The steps that every process lists, sorted (a collective, like `everywhere`)."""
    return sorted(set.intersection(*(set(s) for s in gathered(sorted(steps)))))


def gathered(value) -> list:
    """[each process's `value`], in process order (JSON-able values; a collective when there are several)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(data)]))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[:int(n)]).decode()) for r, n in zip(rows, np.ravel(sizes))]


def from_primary(obj):
    """Process 0's `obj` on every process (pickled; a collective when there are several): what process 0 alone
    looked at or ordered (files on disk, lm-eval's requests), acted on alike everywhere."""
    if jax.process_count() == 1:
        return obj
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = multihost_utils.broadcast_one_to_all(data if is_primary() else np.zeros(n, np.uint8))
    return pickle.loads(np.asarray(buf).tobytes())


def max_over_processes(x: np.ndarray) -> np.ndarray:
    """The elementwise max of a host array over every process (a collective); with one process, x itself."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (`name`: the same on all, new for each use)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Preemption:
    """SIGTERM (a TPU preemption notice is one) or a first Ctrl-C → stop at a step boundary that every
    process agrees on, with a checkpoint.

    One process: signal handlers set `requested` ("SIGTERM" or "Ctrl-C"); a second Ctrl-C raises
    KeyboardInterrupt at once (stop without saving). Several: JAX's preemption sync service (it catches
    SIGTERM itself) names the same step on every host, and Ctrl-C keeps Python's meaning. `close()` restores
    the previous handlers."""

    def __init__(self, say=None):
        self.requested: str | None = None
        self.multi = jax.process_count() > 1
        self.say = say or (lambda *a: None)
        self._old: dict = {}
        if not self.multi:
            for sig, handler in ((signal.SIGTERM, self._term), (signal.SIGINT, self._interrupt)):
                try:
                    self._old[sig] = signal.signal(sig, handler)
                except ValueError:  # not the main thread: leave the signals alone
                    pass

    def _term(self, signum, frame):
        self.requested = self.requested or "SIGTERM"

    def _interrupt(self, signum, frame):
        if self.requested == "Ctrl-C":  # the second one: stop now
            raise KeyboardInterrupt
        self.requested = "Ctrl-C"
        self.say("\njaxft: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, without one)")

    def __call__(self, step: int) -> bool:
        """True at the step where the run should save and stop (call it at every step, on every process)."""
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
