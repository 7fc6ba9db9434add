"""Several processes (hosts) on one global mesh, and what keeps them from hanging.

``start`` brings up ``jax.distributed`` (gloo collectives on CPU, so that two local
processes can stand in for two hosts in tests). After it, ``jax.devices()`` lists every
process's devices, :func:`contrastive.mesh.make_mesh` builds one mesh over all of them,
and each process feeds its own rows of the global batch.

A process whose peer is missing or dead would otherwise wait in a collective for ever;
:class:`Watchdog` ends it with one line on stderr once nothing has progressed for a
bounded time.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np

__all__ = ["start", "Watchdog"]


def start(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    timeout_s: float,
) -> None:
    """``jax.distributed.initialize`` with bounded waits; RuntimeError (one line) on failure.

    Flags left None are detected by JAX from the cluster's environment. Must run before
    anything touches a JAX backend.
    """
    # Cross-process collectives between CPU devices need gloo; other backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=max(1, int(timeout_s)),
            # Later than the watchdog, which ends a stalled process with a clearer message.
            heartbeat_timeout_seconds=max(10, int(timeout_s) + 30),
            shutdown_timeout_seconds=max(10, int(timeout_s)),
        )
        # One collective over every device now, while the processes have just met: XLA's
        # CPU collectives (gloo) give the processes a fixed 30 s to meet the first time a
        # group of devices runs a collective, however long that group's later collectives
        # may wait. Set up here, the group's first meeting cannot be the first step's, which
        # a process may reach minutes after its peer (compiling, reading data, under load).
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("contrastive.run.hosts.start")
    except Exception as e:  # noqa: BLE001 - JAX raises several types; one message for all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RuntimeError(
            f"could not join the multi-host run at {coordinator_address} as process "
            f"{process_id} of {num_processes} within {timeout_s:g} s ({first}); start every "
            "process with the same --coordinator-address and --num-processes"
        ) from None


class Watchdog:
    """Ends this process (exit status 3, one line on stderr) after ``timeout_s`` without
    a :meth:`beat`. A daemon thread; :meth:`stop` (or leaving the ``with`` block) ends it.

    What it prevents: a process blocked for ever in a collective whose peer died, or in
    start-up waiting for a peer that never comes.
    """

    def __init__(self, timeout_s: float, what: str = "the run"):
        self.timeout_s = timeout_s
        self.what = what
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                where = f"process {jax.process_index()} of {jax.process_count()}"
                sys.stderr.write(
                    f"error: {self.what} made no progress for {idle:.0f} s ({where}): a peer "
                    "process is missing or dead; restart every process with the same command "
                    "to resume from the last checkpoint\n"
                )
                sys.stderr.flush()
                os._exit(3)


# --- multi-process agreement ---------------------------------------------------------------


def all_processes(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
