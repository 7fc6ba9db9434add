"""Train a contrastive dual encoder: ``python -m experiments.train --workdir DIR [flags]``.

Reads top to bottom: config -> mesh -> data -> model -> shard -> step -> checkpoint -> loop.
Writes ``DIR/metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``, ...,
and the evaluation results at evaluation steps) and ``DIR/checkpoints/`` (orbax).

Started again with the same ``--workdir`` it resumes from the latest checkpoint, and a run
killed at any moment then ends with exactly the per-step losses of an uninterrupted run:
the batches are a pure function of (seed, step), and the checkpoint holds the parameters,
optimiser state, PRNG key, step and data position.

Defaults: the offline ``digits`` dataset (prepared from scikit-learn on first use, nothing
downloads), a small MLP encoder, the InfoNCE loss, 300 steps of batch 256 (about a minute
on a laptop CPU). ``--help`` lists every flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from contrastive.checkpoint import Checkpointer
from contrastive.data import BatchIterator, HashTokenizer, eval_arrays, get_spec, train_dataset
from contrastive.data.pipeline import DatasetSpec
from contrastive.evaluate import embed, knn_accuracy, linear_probe, retrieval_recall
from contrastive.mesh import make_mesh, place_params, shard_batch
from contrastive.models import DualEncoder, TextTransformer, make_image_encoder
from contrastive.optim import OptimConfig, make_optimizer
from contrastive.train_step import LossConfig, TrainConfig, create_train_state, make_train_step
from experiments.config import Config, ConfigError, parse_config

METRICS_FILE = "metrics.jsonl"


def build_model(cfg: Config, spec: DatasetSpec) -> DualEncoder:
    """The dual encoder for ``cfg``: one tower on two views, or image + text towers."""
    rngs = nnx.Rngs(cfg.seed)
    s, c = spec.image_size, spec.channels
    shape = (s * s * c,) if cfg.model == "mlp" else (s, s, c)
    image_tower = make_image_encoder(
        cfg.model, shape, width=cfg.width, depth=cfg.depth, dropout_rate=cfg.dropout, rngs=rngs
    )
    text_tower = None
    if spec.kind == "image_text":
        text_tower = TextTransformer(
            cfg.vocab_size, cfg.text_len, dropout_rate=cfg.dropout, rngs=rngs
        )
    return DualEncoder(
        image_tower,
        text_tower,
        embed_dim=cfg.embed_dim,
        head_hidden=cfg.head_hidden,
        init_temperature=cfg.init_temperature,
        init_bias=cfg.bias if cfg.loss == "sigmoid" else None,
        learn_temperature=cfg.learn_temperature,
        rngs=rngs,
    )


def train_config(cfg: Config) -> TrainConfig:
    loss = LossConfig(
        name=cfg.loss,
        symmetric=cfg.symmetric,
        intra_view=cfg.intra_view,
        sigma=cfg.sigma,
        block_size=cfg.block_size,
        ring=cfg.ring,
    )
    optim = OptimConfig(
        name=cfg.optimizer,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
    )
    return TrainConfig(loss=loss, optim=optim, chunk_size=cfg.chunk_size)


def evaluate(
    graphdef: nnx.GraphDef, params: Any, spec: DatasetSpec, data: dict, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """Linear probe and k-NN on the encoder features (labelled data), or retrieval recall.

    Image datasets are probed on the image tower's output, before the projection head
    (SimCLR's protocol: the head's output discards information the loss does not need).
    """
    n_dev = mesh.devices.size
    batch = 256 * n_dev  # embed pads the last batch; sharding needs a multiple of n_dev

    def run(method: str):
        fn = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), method)(x))
        return lambda x: fn(params, shard_batch(x, mesh))

    if spec.kind == "image":
        features = run("tower_x")
        tr = embed(features, data["train"]["image"], batch_size=batch)
        te = embed(features, data["test"]["image"], batch_size=batch)
        ytr, yte = data["train"]["label"], data["test"]["label"]
        return {
            "linear_probe": linear_probe(tr, ytr, te, yte),
            "knn": knn_accuracy(tr, ytr, te, yte, num_classes=spec.num_classes),
        }
    img = embed(run("embed_x"), data["test"]["image"], batch_size=batch)
    txt = embed(run("embed_y"), data["test"]["text"], batch_size=batch)
    return retrieval_recall(img, txt)


def _read_metrics(path: str, upto: int) -> list[dict]:
    """The records of steps <= ``upto`` (a killed run may have logged past its checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["step"] <= upto]


def _write_metrics(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


@dataclasses.dataclass
class Setup:
    """What a run is made of, built in order: mesh -> data -> model -> shard -> step."""

    mesh: jax.sharding.Mesh
    spec: DatasetSpec
    train_ds: Any
    eval_data: dict
    views: tuple[str, str]
    graphdef: nnx.GraphDef
    state: Any  # TrainState, placed on the mesh
    key: jax.Array
    step_fn: Any


def _strong(tree: Any) -> Any:
    # Scalars made from Python floats are weakly typed; the state coming out of a step is
    # not. One dtype signature for the step avoids a second compilation, and the first step
    # and a resumed step then run the very same program (bitwise-equal losses).
    return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=a.dtype), tree)


def setup(cfg: Config) -> Setup:
    """Validate ``cfg`` and build everything up to the jitted step (nothing compiled yet).

    Every configuration error surfaces here as a :class:`ConfigError`, before any long work.
    """
    # --- config: every check that needs neither data nor compilation --------------------
    devices = jax.devices()
    n_dev = cfg.num_devices or len(devices)
    if n_dev > len(devices):
        raise ConfigError(f"--num-devices {n_dev} but only {len(devices)} devices are present")
    cfg.validate(num_devices=n_dev)

    # --- mesh ----------------------------------------------------------------------------
    mesh = make_mesh(num_devices=n_dev)

    # --- data ------------------------------------------------------------------------------
    spec = get_spec(cfg.dataset, cfg.image_size)
    tokenizer = HashTokenizer(cfg.vocab_size, cfg.text_len)  # image-text datasets only
    try:
        train_ds = train_dataset(
            cfg.dataset,
            global_batch_size=cfg.batch_size,
            seed=cfg.seed,
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            tokenizer=tokenizer,
        )
        eval_data = {
            split: eval_arrays(
                cfg.dataset,
                name,
                data_dir=cfg.data_dir,
                image_size=cfg.image_size,
                max_examples=cfg.eval_examples,
                tokenizer=tokenizer,
            )
            for split, name in [("train", spec.train_split), ("test", spec.test_split)]
            if spec.kind == "image" or split == "test"
        }
    except ValueError as e:
        raise ConfigError(str(e)) from e
    views = ("view1", "view2") if spec.kind == "image" else ("image", "text")

    # --- model -----------------------------------------------------------------------------
    try:
        model = build_model(cfg, spec)
        tcfg = train_config(cfg)
    except ValueError as e:  # e.g. a ViT patch that does not divide the image
        raise ConfigError(str(e)) from e
    tx = make_optimizer(tcfg.optim)
    graphdef, state = create_train_state(model, tx)
    key = jax.random.key(cfg.seed + 1)  # dropout; the step folds in the step number

    # --- shard -----------------------------------------------------------------------------
    state = place_params(_strong(state), mesh)
    key = place_params(key, mesh)

    # --- step ------------------------------------------------------------------------------
    step_fn = make_train_step(graphdef, tcfg, mesh, tx=tx)
    return Setup(mesh, spec, train_ds, eval_data, views, graphdef, state, key, step_fn)


def evaluate_init(cfg: Config) -> dict[str, float]:
    """Evaluation of the randomly initialised model of ``cfg`` (the no-training baseline)."""
    s = setup(cfg)
    return evaluate(s.graphdef, s.state.params, s.spec, s.eval_data, s.mesh)


def run(cfg: Config) -> list[dict]:
    """Train (or resume) the run in ``cfg.workdir``; returns every metrics record of the run."""
    s = setup(cfg)
    os.makedirs(cfg.workdir, exist_ok=True)

    # --- checkpoint ------------------------------------------------------------------------
    ckpt = Checkpointer(cfg.workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    restored, meta = ckpt.restore_or({"train": s.state, "key": s.key})
    if meta and meta.get("config") != cfg.identity():
        ckpt.close()
        raise ConfigError(
            f"{cfg.workdir} holds checkpoints of a different run ({meta.get('config')}): "
            "use a new --workdir or the same settings"
        )
    state, key = restored["train"], restored["key"]
    start = int(meta.get("step", 0))
    batches = BatchIterator(s.train_ds)
    if meta:
        batches.set_state(meta["data"])
    metrics_path = os.path.join(cfg.workdir, METRICS_FILE)
    records = _read_metrics(metrics_path, upto=start)
    _write_metrics(metrics_path, records)

    # --- loop ------------------------------------------------------------------------------
    def save(step: int, force: bool = False) -> None:
        meta = {"step": step, "data": batches.get_state(), "config": cfg.identity()}
        tree = {"train": state, "key": key}
        if force:
            ckpt.save(step, tree, meta, force=True)
        else:
            ckpt.maybe_save(step, tree, meta)

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc="train")
    with open(metrics_path, "a") as log:
        for step in range(start + 1, cfg.steps + 1):  # `step` counts completed steps
            host = next(batches)
            batch = shard_batch(tuple(host[v] for v in s.views), s.mesh)
            state, m = s.step_fn(state, batch, key)
            last = step == cfg.steps
            do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
            if do_eval or step % cfg.log_every == 0 or step == 1:
                rec = {"step": step, **{k: float(v) for k, v in m.items()}}
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                if do_eval:
                    rec.update(evaluate(s.graphdef, state.params, s.spec, s.eval_data, s.mesh))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                records.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            save(step, force=last)
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break  # as if killed here: no checkpoint beyond the periodic ones
    bar.close()
    batches.close()
    ckpt.close()
    return records


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        records = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = records[-1] if records else {}
    summary = {k: v for k, v in final.items() if k not in ("elapsed_s",)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
