"""A locked-tower train step at a large batch against the loss's own forward and backward.

``python -m experiments.bench_locked_step`` (B = 16,384 by default) times, per loss, one
train step of the batch-size study's model and the loss alone on embeddings of the same
shape, in one process, calls alternating (``--repeats`` paired rounds, medians), and reports
the ratio step / loss: what locking the image tower leaves on top of the loss (the issue's
target: at most 1.5x).

The model (SigLiT, Zhai et al. 2023, arXiv 2303.15343, Fig. 2; LiT, Zhai et al. 2022,
arXiv 2111.07991): the image tower is locked, so its input is the cached feature row
``f [B, F]``, L2-normalised, with no parameters; a trainable head ``F -> 256 -> D``; a
bag-of-words text tower (the mean of the caption's token embeddings, LayerNorm, an MLP
``w -> 2w -> w``) and its head ``w -> 256 -> D``; a learned temperature (and the sigmoid
loss's bias). The step: both towers forward, the loss as a ring over the devices (a ring of
one on one device), its gradient pulled back through both towers, one all-reduce of the
parameter gradients, gradient clipping and AdamW (weight decay on matrices only). It is
:func:`contrastive.step.train_step.train_step` without gradient caching, written out here: that
module (through :mod:`contrastive.configs`) imports the data pipeline, hence
``tensorflow_datasets`` and ``grain``, which the accelerator machine lacks; so does
:mod:`contrastive.models.locked_tower`, whose two towers this file restates
(``tests/test_study_runs.py`` checks both against the library: same parameters, same
outputs, same step). Importing this script pulls in neither package.

The reference: ``jax.value_and_grad`` of the loss (``losses.<loss>`` through
``losses.sharded``, the same ring) with respect to the two ``[B, D]`` embeddings, on unit
embeddings of the same shape, at the loss's default temperature.

Per pair, the towers' forward pass is about 98k multiply-adds at the defaults (image head
``F·256 + 256·D`` = 49k; text MLP ``2·w·2w`` and head ``w·256 + 256·D`` = 49k), forward and
backward about 3x that, against ``4·B·D`` for the tiled loss (forward, recomputed tile and two
gradient products: 4.2M at B = 16,384, D = 64): at large batches the step should cost little
more than its loss.

Writes ``bench_locked_step.{json,md}`` into the run directory (``--out``).

Example (toy size, seconds on a CPU)::

    python -m experiments.bench_locked_step --batch 256 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive.loss_registry import LOSS_NAMES, LOSSES
from contrastive.mesh import DATA_AXIS, make_mesh, place_params, replicated, shard_batch
from contrastive.models import DualEncoder
from experiments.common import benchmarking as bm
from experiments.common import run_dir
from experiments.common.cli import command_parser, name_list, positive_int, run_main

STEM = "bench_locked_step"
TARGET_RATIO = 1.5  # the bound on step / loss

__all__ = [
    "LockedRows",
    "BagOfWords",
    "locked_model",
    "synthetic_batch",
    "make_locked_step",
    "run",
    "main",
]


class LockedRows(nnx.Module):
    """The locked image tower: its input is the cached feature row, L2-normalised, [B, F] ->
    [B, F], no parameters (as :class:`contrastive.models.locked_tower.LockedFeatures`)."""

    def __init__(self, features: int):
        self.features = features

    def __call__(self, inputs: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = lax.stop_gradient(inputs.astype(jnp.float32))
        return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class BagOfWords(nnx.Module):
    """Mean of the real tokens' embeddings, LayerNorm, ``w -> 2w -> w`` MLP (as
    :class:`contrastive.models.locked_tower.BagOfWordsText` without dropout):
    ``[B, L] -> [B, w]``."""

    def __init__(self, vocab_size: int, max_len: int, width: int = 64, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, 2 * width, rngs=rngs)
        self.fc2 = nnx.Linear(2 * width, width, rngs=rngs)
        self.features = width

    def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mask = (tokens != 0)[..., None].astype(jnp.float32)  # (B, L, 1); 0 is padding
        e = self.embed(tokens).astype(jnp.float32)  # (B, L) -> (B, L, w)
        e = jnp.sum(e * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        h = jax.nn.gelu(self.fc1(self.ln(e)))  # (B, w) · (w, 2w) -> (B, 2w)
        return self.fc2(h)  # (B, 2w) · (2w, w) -> (B, w)


def locked_model(
    loss: str,
    *,
    features: int = 128,
    vocab_size: int = 36,
    text_len: int = 16,
    embed_dim: int = 64,
    head_hidden: int = 256,
    seed: int = 0,
) -> DualEncoder:
    """The study's locked-tower dual encoder for ``loss`` (its initial temperature and bias).

    The defaults are the study's: 128 locked features (the pre-trained MLP tower), the
    ``shapes`` captions (36 tokens, 16 per caption), D = 64, heads 256 wide.

    >>> locked_model("sigmoid").bias_value()
    Array(-10., dtype=float32)
    """
    spec = LOSSES[loss]
    rngs = nnx.Rngs(seed)
    text = BagOfWords(vocab_size, text_len, rngs=rngs)  # built first, as the library does
    return DualEncoder(
        LockedRows(features),
        text,
        embed_dim=embed_dim,
        head_hidden=head_hidden,
        init_temperature=spec.temperature,
        init_bias=spec.bias,
        rngs=rngs,
    )


def synthetic_batch(
    batch: int, *, features: int = 128, vocab_size: int = 36, text_len: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random feature rows ``float32[B, F]`` and captions ``int32[B, L]`` (ids ``1..V-1``,
    the last quarter of each caption padding), the shapes of a study batch."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((batch, features), dtype=np.float32)
    tokens = rng.integers(1, vocab_size, (batch, text_len), dtype=np.int32)
    tokens[:, text_len - text_len // 4 :] = 0
    return feats, tokens


def make_locked_step(
    graphdef: nnx.GraphDef, loss: str, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation
):
    """``step((params, opt_state), (feats, tokens)) -> ((params, opt_state), metrics)``,
    jitted, the state donated: the train step of the library without gradient caching."""
    spec = LOSSES[loss]

    def local(params: Any, batch: tuple[jax.Array, jax.Array]):
        # Varying parameters: their gradients are this device's share, summed once below.
        params = jax.tree_util.tree_map(lambda p: lax.pcast(p, DATA_AXIS, to="varying"), params)

        def loss_of(p):
            model = nnx.merge(graphdef, p)
            x, y = model.embed_x(batch[0]), model.embed_y(batch[1])  # (b, D) each
            kw = {"temperature": model.temperature(), "axis_name": DATA_AXIS}
            if spec.has_bias:
                kw["bias"] = model.bias_value()
            return spec(x, y, **kw)

        value, grads = jax.value_and_grad(loss_of)(params)
        return value, jax.tree_util.tree_map(lambda g: lax.psum(g, DATA_AXIS), grads)

    grad_fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))

    def step(state, batch):
        params, opt_state = state
        value, grads = grad_fn(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return (optax.apply_updates(params, updates), opt_state), metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=replicated(mesh))


def study_optimizer(learning_rate: float = 4e-3) -> optax.GradientTransformation:
    """The study's optimiser at a constant rate: clip at 1, AdamW, decay 1e-4 on matrices."""
    decay = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(learning_rate, weight_decay=1e-4, mask=decay)
    return optax.chain(optax.clip_by_global_norm(1.0), adamw)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser("python -m experiments.bench_locked_step", __doc__)
    p.add_argument("--batch", type=positive_int, default=16384, help="global batch (pairs)")
    p.add_argument("--losses", type=name_list, default=",".join(LOSS_NAMES),
                   help="losses, comma-separated")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=5, help="paired rounds")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="use the first N devices of the default backend; default: all")  # fmt: skip
    p.add_argument("--embed-dim", type=positive_int, default=64, help="D of both")
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    unknown = [x for x in args.losses if x not in LOSS_NAMES]
    if unknown:
        p.error(f"unknown loss {unknown[0]!r} in --losses: use {', '.join(LOSS_NAMES)}")
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    have = len(jax.devices())
    n = args.devices or have
    if n > have or args.batch % n:
        raise ValueError(
            f"--devices {n} with --batch {args.batch}: {have} devices here, and the batch must "
            "be a multiple of the devices used"
        )
    out = run_dir.create(STEM, args.out)
    mesh = make_mesh(num_devices=n)
    feats, tokens = synthetic_batch(args.batch)
    batch = shard_batch((feats, tokens), mesh)
    rows = []
    for loss in args.losses:
        graphdef, params = nnx.split(locked_model(loss, embed_dim=args.embed_dim))
        tx = study_optimizer()
        holder = [place_params((params, tx.init(params)), mesh)]
        step = make_locked_step(graphdef, loss, mesh, tx)

        def train_step(step=step, holder=holder):
            holder[0], metrics = step(holder[0], batch)
            return holder[0], metrics

        x, y = bm.unit_embeddings(args.batch, args.embed_dim, jax.sharding.NamedSharding(
            mesh, P(DATA_AXIS)))  # fmt: skip
        loss_only = bm.loss_grad_fn("ring", loss, mesh)
        t0 = time.perf_counter()
        step_s, loss_s = bm.median_seconds(
            [train_step, functools.partial(loss_only, x, y)], repeats=args.repeats
        )
        rows.append({"loss": loss, "step_s": step_s, "loss_s": loss_s, "ratio": step_s / loss_s,
                     "meets_target": step_s / loss_s <= TARGET_RATIO,
                     "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(f"{loss}: step {step_s * 1e3:.2f} ms, loss {loss_s * 1e3:.2f} ms, "
              f"ratio {step_s / loss_s:.2f}", flush=True)  # fmt: skip
    device = jax.devices()[0]
    summary = {
        "command": " ".join(
            ["python -m experiments.bench_locked_step", *(sys.argv[1:] if argv is None else argv)]
        ),  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_results")},
        "device": f"{device.platform} {device.device_kind}",
        "devices": n,
        "rows": rows,
    }
    text = "\n".join([
        f"Locked-tower train step against the loss alone, B = {args.batch}, D = "
        f"{args.embed_dim}, {n} x {summary['device']}; medians of {args.repeats} paired rounds "
        f"(target: step / loss <= {TARGET_RATIO}).",
        "",
        "| loss | step ms | loss fwd+bwd ms | step / loss | within target |",
        "|---|---:|---:|---:|---|",
        *(f"| {r['loss']} | {r['step_s'] * 1e3:.2f} | {r['loss_s'] * 1e3:.2f} | "
          f"{r['ratio']:.2f} | {'yes' if r['meets_target'] else 'no'} |" for r in rows),
    ]) + "\n"  # fmt: skip
    print(text)
    bm.save_outputs(out, {f"{STEM}.json": json.dumps(summary, indent=2), f"{STEM}.md": text},
                    update_results=args.update_results)  # fmt: skip
    print(f"run directory: {out}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
