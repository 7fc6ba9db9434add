"""Several local processes standing in for hosts: a free port each, and no orphan peers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (each test asks for its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
