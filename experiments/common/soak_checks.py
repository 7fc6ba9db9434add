"""The soak's checks: the soaked run against the uninterrupted one, bit for bit.

:func:`compare_metrics` reads both ``metrics.jsonl`` (every step once, in order, the same
values but the wall clock), :func:`compare_checkpoints` restores both final checkpoints with
orbax as host arrays and compares every leaf's bytes and the meta, and
:func:`compare_event_files` compares the TensorBoard scalars, when the loop writes any. Each
returns its problems as one line each (empty: none).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from experiments.common.cli import shared_module
from experiments.common.soak_runs import METRICS

WALL_CLOCK = {"elapsed_s"}  # metrics that measure time, not the computation


def records(workdir: Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (none if there is no file)."""
    path = workdir / METRICS
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def compare_metrics(ref: Path, soak: Path, steps: int) -> list[str]:
    """Problems with the soak's ``metrics.jsonl`` against the reference's (empty: none)."""
    problems = []
    a, b = records(ref), records(soak)
    sa, sb = [r["step"] for r in a], [r["step"] for r in b]
    if sa != list(range(1, steps + 1)):
        problems.append(f"the uninterrupted run logged steps {sa[:5]}... not 1..{steps}")
    twice = sorted({s for s in sb if sb.count(s) > 1})
    missing = sorted(set(sa) - set(sb))
    if twice:
        problems.append(f"steps logged twice: {twice}")
    if missing:
        problems.append(f"steps missing from the log: {missing}")
    if sb != sorted(sb):
        problems.append("steps logged out of order")
    ref_by_step = {r["step"]: r for r in a}
    for r in b:
        want = ref_by_step.get(r["step"])
        if want is None:
            continue
        for k in sorted((set(want) | set(r)) - WALL_CLOCK):
            if repr(want.get(k)) != repr(r.get(k)):
                problems.append(
                    f"step {r['step']}: {k} = {r.get(k)!r}, uninterrupted {want.get(k)!r}"
                )
                break
    return problems


def _restore(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({leaf path: numpy array}, meta)`` of one checkpoint, read with orbax as host arrays
    (any device count)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Metadata file does not exist" for the item folder
    try:
        with ocp.PyTreeCheckpointer() as c:
            md = c.metadata(checkpoint / "state")
            tree = getattr(md, "item_metadata", md)
            tree = getattr(tree, "tree", tree)
            args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = c.restore(checkpoint / "state", restore_args=args)
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
            meta = c.restore(checkpoint / "meta")
    finally:
        absl.setLevel(level)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def compare_checkpoints(ref: Path, soak: Path, steps: int) -> tuple[list[str], int]:
    """Problems with the soak's final checkpoint against the reference's, and the number of
    arrays compared."""
    a_dir, b_dir = ref / "checkpoints" / str(steps), soak / "checkpoints" / str(steps)
    for d in (a_dir, b_dir):
        if not d.is_dir():
            return [f"no final checkpoint {d}"], 0
    (a, meta_a), (b, meta_b) = _restore(a_dir), _restore(b_dir)
    problems = []
    if set(a) != set(b):
        problems.append(f"the checkpoints hold different leaves: {sorted(set(a) ^ set(b))[:3]}")
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            problems.append(f"final state{k} differs from the uninterrupted run's")
    if meta_a != meta_b:
        problems.append(f"final meta differs: {meta_b!r:.200} vs {meta_a!r:.200}")
    return problems, len(a)


def compare_event_files(ref: Path, soak: Path) -> tuple[list[str], int]:
    """Problems with the soak's TensorBoard scalars against the reference's, and the number
    of event-file directories compared (0: the loop writes none)."""
    dirs = sorted({p.parent for p in ref.rglob("*tfevents*") if p.is_file()})
    soak_dirs = sorted({p.parent for p in soak.rglob("*tfevents*") if p.is_file()})
    problems = []
    if len(soak_dirs) != len(dirs):
        problems.append(f"event files in {len(soak_dirs)} directories, uninterrupted {len(dirs)}")
    if not dirs:
        return problems, 0
    from contrastive.run.metric_writers import read_scalars

    for d in dirs:
        rel = d.relative_to(ref)
        want, got = read_scalars(d), read_scalars(soak / rel)
        for tag in sorted(set(want) | set(got)):
            ws, gs = want.get(tag, []), got.get(tag, [])
            steps = [s for s, _ in gs]
            twice = sorted({s for s in steps if steps.count(s) > 1})
            if twice:
                problems.append(f"{rel}/{tag}: steps written twice: {twice[:10]}")
            missing = sorted({s for s, _ in ws} - set(steps))
            if missing:
                problems.append(f"{rel}/{tag}: steps missing: {missing[:10]}")
            clock = tag.rsplit("/", 1)[-1] in WALL_CLOCK  # differs from run to run
            same = [(s, repr(v)) for s, v in gs] == [(s, repr(v)) for s, v in ws]
            if not (twice or missing or clock or same):
                problems.append(f"{rel}/{tag}: values differ from the uninterrupted run's")
    return problems, len(dirs)


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
