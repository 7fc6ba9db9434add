"""Train a contrastive dual encoder: ``python -m experiments.train --workdir DIR [flags]``.

Parses the flags into the config tree (:func:`contrastive.configs.parse_config`), trains or
resumes the run (:func:`contrastive.loop.train`) and prints one line: where the metrics are
and the final ones. Started again with the same ``--workdir`` it resumes. Defaults: the offline
``digits`` data set, a tiny GroupNorm ResNet, the InfoNCE loss, 300 steps of batch 256 (a few
minutes on a laptop CPU). ``--help`` lists every flag.

Exit status: 0 done (or stopped by SIGTERM/SIGINT with a checkpoint), 1 the run failed
(divergence, no usable checkpoint, a busy work dir, a dead peer), 2 bad input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax

from contrastive.configs import ConfigError, parse_config
from contrastive.loop import RunError, summary_line, train
from contrastive.run_guard import StopNow


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
