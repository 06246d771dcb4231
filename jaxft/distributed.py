"""Several processes (hosts): start-up, who writes, and stopping together on a preemption notice.

    init_distributed(run.mesh)     # before anything touches a device
    if is_primary(): write(...)    # process 0 writes logs, progress, plots and exports
    stop = Preemption()            # stop(step) is True at the step every process saves and stops
"""

from __future__ import annotations

import signal

import jax

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


class Preemption:
    """SIGTERM (a TPU preemption notice is one) → stop at a step boundary that every process agrees on.

    One process: a signal handler sets a flag. Several: JAX's preemption sync service (it catches
    SIGTERM itself) names the same step on every host. `close()` restores the previous handler."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._old = None
        if not self.multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave SIGTERM alone
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self, step: int) -> bool:
        """True at the step where the run should save and stop (call it at every step, on every process)."""
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
