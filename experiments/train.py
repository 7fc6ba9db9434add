"""Train a contrastive dual encoder: ``python -m experiments.train --workdir DIR [flags]``.

Parses the flags into the config tree (:func:`contrastive.configs.parse_config`), trains or
resumes the run (:func:`contrastive.run.loop.train`) and prints one line: where the metrics are
and the final ones. Started again with the same ``--workdir`` it resumes. Defaults: the offline
``digits`` data set, a tiny GroupNorm ResNet, the InfoNCE loss, 300 steps of batch 256 (a few
minutes on a laptop CPU). ``--help`` lists every flag.

Exit status: 0 done (or stopped by SIGTERM/SIGINT with a checkpoint), 1 the run failed
(divergence, no usable checkpoint, a busy work dir, a dead peer), 2 bad input, 130 Ctrl-C
before training started (nothing written).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a command ended by Ctrl-C


def _interrupted() -> int:
    print(
        "interrupted before training started: nothing was trained or checkpointed; run the "
        "same command to start again",
        file=sys.stderr,
    )
    return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the run's own signal handling is installed (reading the data,
        # pre-training a locked tower): nothing was trained or checkpointed, and a work dir
        # this command created is gone again (contrastive.run.loop.train).
        return _interrupted()


def _main(argv: Sequence[str] | None) -> int:
    # Imported here, with Ctrl-C held back meanwhile: a KeyboardInterrupt raised inside a C
    # extension's initialisation (numpy, jaxlib) surfaces as an ImportError with a traceback,
    # so the signal is only noted while the modules load (about 2 s), and acted on after.
    seen: list[int] = []
    held = _hold_sigint(seen)
    try:
        import jax

        from contrastive.configs import ConfigError, parse_config
        from contrastive.run.loop import RunError, summary_line, train
        from contrastive.run.run_guard import StopNow
    finally:
        _release_sigint(held)
    if seen:
        return _interrupted()

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        # A second SIGTERM/SIGINT ends the command on the spot, with one line naming the
        # last good checkpoint (os._exit: no clean-up that could wait on the abandoned write).
        records = train(cfg, on_second_signal="exit")
    except StopNow as e:  # on_second_signal="raise" (library use) ends up here
        print(e.line, file=sys.stderr)
        return 128 + e.signum
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunError, RuntimeError) as e:  # RuntimeError: the multi-host runtime did not start
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        if cfg.hosts.enabled:
            # Skip jax.distributed's shutdown barrier at exit: with a dead peer it would end
            # this process with a fatal multi-line report instead of the line above.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    if jax.process_index() == 0:
        print(summary_line(records, cfg.run.workdir))
    return 0


def _hold_sigint(seen: list[int]) -> list[object]:
    """Note SIGINT in ``seen`` instead of raising; returns ``[handler to restore]``, or ``[]``
    off the main thread (where Python cannot set handlers) or when the handler was not set
    from Python (``signal.getsignal`` gives None: it could not be put back)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    if signal.getsignal(signal.SIGINT) is None:
        return []
    return [signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))]


def _release_sigint(held: list[object]) -> None:
    for handler in held:
        signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
