"""Several local processes standing in for hosts: a free port each, and no orphan peers."""

from __future__ import annotations

import random
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (``bind`` to port 0, the local end of
    an outgoing connection): 32768 on Linux unless configured."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a coordinator that binds it a few seconds later
    (each test asks for its own).

    Drawn at random below the kernel's ephemeral range. A port from that range (what
    ``bind(("127.0.0.1", 0))`` returns) is free when picked, but until the coordinator binds
    it any connection on the machine can take it as its local port: the gloo and gRPC
    connections of another two-process test running beside this one (pytest-xdist), say. Below
    the range only an explicit ``bind`` takes a port, and two tests that draw at random out of
    thousands almost never draw the same one.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12_000)
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high - 1} on 127.0.0.1")


def start(commands: Sequence[Sequence[str]], env: dict[str, str]) -> list[subprocess.Popen]:
    """Start every command from the repository root, stdout and stderr together."""
    return [
        subprocess.Popen(
            list(cmd),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cmd in commands
    ]


def finish(procs: Sequence[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """``(exit status, output)`` of each process, waiting at most ``timeout`` s for each;
    every process is killed at the end, so that no peer is left waiting on a failed test."""
    out = []
    try:
        for p in procs:
            log = p.communicate(timeout=timeout)[0]
            out.append((p.returncode, log))
    finally:
        for p in procs:
            p.kill()
    return out
