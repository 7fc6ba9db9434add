"""Multi-host training from the CLI: two processes x 2 CPU devices (gloo) train exactly like
one process x 4 devices on the same global batch, and survive a dead peer.

Each process is ``python -m experiments.train ... --coordinator-address 127.0.0.1:PORT
--num-processes 2 --process-id I`` with its own free port and a deadline, as a user would
start them on two hosts sharing one work dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from contrastive.configs import parse_config
from contrastive.data import prepare_digits
from contrastive.run import loop
from tests import processes
from tests.processes import free_port

# Seconds without progress before a process gives up on its peer. The watchdog starts before
# the set-up and the first step's compilation, which beat no progress: on a machine loaded
# several times over (a 2-core CI runner beside other jobs) they took over 60 s, and the
# healthy run ended as if its peer were dead. The watchdog itself is tested on its own
# (test_watchdog_ends_a_process_without_progress); here it only has to stay out of the way.
PEER_TIMEOUT = 300
# The run whose peer is killed: its survivor is not always told by a collective that the
# peer is dead (in about a third of runs it waits outside one); the watchdog ends it after
# this long. Enough for the start-up and the first steps, on programs the first run has
# compiled (the session's compilation cache), on a heavily loaded machine.
KILLED_PEER_TIMEOUT = 90

RUN = [
    "--model", "mlp", "--width", "32", "--embed-dim", "16", "--head-hidden", "none",
    "--batch-size", "32", "--chunk-size", "8", "--steps", "12", "--checkpoint-every", "4",
    "--log-every", "1", "--warmup-steps", "2", "--eval-examples", "64", "--no-progress",
]  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    return env


def _start_hosts(
    workdir: Path, data_dir: str, port: int, peer_timeout: float = PEER_TIMEOUT
) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "experiments.train", "--workdir", str(workdir),
               "--data-dir", data_dir, *RUN, "--coordinator-address", f"127.0.0.1:{port}",
               "--num-processes", "2", "--peer-timeout", str(peer_timeout)]  # fmt: skip
    return processes.start([[*command, "--process-id", str(i)] for i in range(2)], _env(2))


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    steps = sorted(want)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)


@pytest.mark.slow
def test_two_hosts_train_like_one_and_resume_after_a_dead_peer(tmp_path):
    data_dir = str(tmp_path / "tfds")
    prepare_digits(data_dir)

    # Two processes x 2 devices, the same global batch of 32 (16 rows per host); started
    # first, so that their start-up overlaps the reference run in this process.
    two = tmp_path / "two"
    hosts = _start_hosts(two, data_dir, free_port())

    # One process, 4 of this process's 8 simulated devices: the reference.
    one = ["--workdir", str(tmp_path / "one"), "--data-dir", data_dir, *RUN, "--num-devices", "4"]
    try:
        reference = loop.train(parse_config(one))
    finally:
        results = processes.finish(hosts, timeout=600)
    want = {r["step"]: r["loss"] for r in reference}
    for i, (code, log) in enumerate(results):
        assert code == 0, f"process {i}:\n{log[-3000:]}"
    _assert_same_losses(_losses(two), want)
    assert "step 12:" in results[0][1]  # process 0 prints the summary
    final = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
    np.testing.assert_allclose(final["linear_probe"], reference[-1]["linear_probe"], atol=1e-9)

    # Kill one process after the checkpoint of step 4: its peer ends within a bounded time
    # with a one-line error, whether a collective finds the peer dead or the watchdog ends
    # its wait (test_watchdog_ends_a_process_without_progress checks that path on its own),
    # and both, started again, finish with the same losses.
    killed = tmp_path / "killed"
    procs = _start_hosts(killed, data_dir, free_port(), KILLED_PEER_TIMEOUT)
    deadline = time.time() + 480
    while time.time() < deadline and not (killed / "checkpoints" / "4").is_dir():
        if any(p.poll() is not None for p in procs):
            logs = [log[-3000:] for _, log in processes.finish(procs, timeout=60)]
            pytest.fail(f"a process ended before the first save: {logs}")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    (code, log), _ = processes.finish(procs, timeout=KILLED_PEER_TIMEOUT * 3)
    waited = time.time() - t0
    assert code != 0, log[-2000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: ") and "peer" in last, log[-3000:]
    assert waited < KILLED_PEER_TIMEOUT * 3
    results = processes.finish(_start_hosts(killed, data_dir, free_port()), timeout=600)
    for i, (code, log) in enumerate(results):
        assert code == 0, f"restarted process {i}:\n{log[-3000:]}"
    _assert_same_losses(_losses(killed), want)


def test_watchdog_ends_a_process_without_progress():
    """A process that beats stays alive past the timeout; once it stops beating (blocked,
    say, in a barrier with a dead peer), it ends within about the timeout: exit status 3 and
    one line on stderr."""
    code = """
import time
from contrastive.run.hosts import Watchdog
with Watchdog(1.0, "the probe") as dog:
    for _ in range(30):  # 3 s of beats: three times the timeout
        dog.beat()
        time.sleep(0.1)
    print("alive after beating", flush=True)
    time.sleep(60)  # no more beats
print("not stopped")
"""
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=processes.REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "alive after beating\n", done.stdout + done.stderr[-2000:]
    assert done.returncode == 3, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: the probe made no progress for "), line
    assert "(process 0 of 1): a peer process is missing or dead; restart every" in line, line
    assert time.time() - t0 < 45  # 3 s of beats, about 1 s more; not the 60 s sleep
