"""``edgeward simulate-worker``: a host that runs a simulation's workers.

A run started elsewhere with ``--worker-host THIS_HOST:PORT`` invites this
host's actor system into its Thespian convention and makes its WorkerShards
here (only systems offering ``WORKER_CAPABILITY`` may host them), so the
load generator's CPU is not taken from the broker's cores. The system stays
up for one run after another until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from .actors import WORKER_CAPABILITY, WORKER_ENV


class PortInUse(RuntimeError):
    pass


def _check_free(port: int) -> None:
    # An actor system already on the port would be joined, not started: say so.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} is taken ({exc.strerror}): another simulate-worker, or give --port"
            ) from None


def serve(
    port: int,
    *,
    address: str | None = None,
    name: str | None = None,
    out: Any = print,
    stop: threading.Event | None = None,
) -> int:
    """Host workers on ``port`` until Ctrl-C (or ``stop`` is set); raises
    :class:`PortInUse` if the port is taken."""
    _check_free(port)
    name = name or f"{socket.gethostname()}:{port}"
    # Inherited by the actor system's processes: the shards say where they ran.
    os.environ[WORKER_ENV] = name
    if address:
        os.environ["THESPIAN_BASE_IPADDR"] = address
    from thespian.actors import ActorSystem

    stop = stop or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    # The admin forked now must not die of the terminal's Ctrl-C: this process
    # takes it and shuts the system down.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        asys = ActorSystem(
            "multiprocTCPBase",
            {"Admin Port": port, WORKER_CAPABILITY: name},
            logDefs={
                "version": 1,
                "handlers": {"e": {"class": "logging.StreamHandler"}},
                "root": {"handlers": ["e"], "level": "WARNING"},
            },
        )
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    shown = f"{address}:{port}" if address else f"THIS_HOST:{port}"
    out(
        f"simulate-worker {name}: hosting workers for runs started with "
        f"--worker-host {shown}; Ctrl-C to stop",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        out("simulate-worker: stopping (its workers end with it)", flush=True)
        asys.shutdown()
    return 0
