"""Train a contrastive dual encoder: ``python -m experiments.train --workdir DIR [flags]``.

Reads top to bottom: config -> mesh -> data -> model -> shard -> step -> checkpoint -> loop.
Writes ``DIR/metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``, ...,
and the evaluation results at evaluation steps) and ``DIR/checkpoints/`` (orbax), and
ends with a one-line summary.

Started again with the same ``--workdir`` it resumes from the latest checkpoint, and a run
killed at any moment then ends with exactly the per-step losses of an uninterrupted run:
the batches are a pure function of (seed, step), and the checkpoint holds the parameters,
optimiser state, PRNG key, step and data position.

Defaults: the offline ``digits`` data set (prepared from scikit-learn on first use, nothing
downloads), a tiny GroupNorm ResNet, the InfoNCE loss, 300 steps of batch 256 (a few
minutes on a laptop CPU). ``--help`` lists every flag.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import losses
from contrastive.checkpoint import Checkpointer, NoUsableCheckpointError
from contrastive.data import (
    BatchIterator,
    HashTokenizer,
    captioned_shapes,
    class_captions,
    eval_arrays,
    get_spec,
    train_dataset,
)
from contrastive.data.pipeline import DatasetSpec
from contrastive.evaluate import (
    embed,
    knn_accuracy,
    linear_probe,
    retrieval_recall,
    zero_shot_accuracy,
)
from contrastive.hosts import Watchdog, start
from contrastive.mesh import make_mesh, place_params, replicated, shard_batch
from contrastive.models import DualEncoder, TextTransformer, make_image_encoder
from contrastive.optim import make_optimizer
from contrastive.run_guard import MetricsLog, StopSignals, WorkdirLock, WorkdirLockedError
from contrastive.train_step import Batch, create_train_state, make_train_step, place_state
from experiments.config import Config, ConfigError, check_devices, differences, parse_config

METRICS_FILE = "metrics.jsonl"
DEFAULT_VOCAB, DEFAULT_TEXT_LEN = 8192, 32  # hashed-word captions (coco_captions)


def build_model(cfg: Config, spec: DatasetSpec) -> DualEncoder:
    """The dual encoder for ``cfg``: one tower on two views, or image + text towers."""
    m = cfg.model
    rngs = nnx.Rngs(cfg.run.seed)
    s, c = spec.image_size, spec.channels
    shape = (s * s * c,) if m.encoder == "mlp" else (s, s, c)
    image_tower = make_image_encoder(
        m.encoder, shape, width=m.width, depth=m.depth, dropout_rate=m.dropout, rngs=rngs
    )
    text_tower = None
    if spec.kind == "image_text":
        vocab, length = text_shape(cfg, spec)
        text_tower = TextTransformer(vocab, length, dropout_rate=m.dropout, rngs=rngs)
    return DualEncoder(
        image_tower,
        text_tower,
        embed_dim=m.embed_dim,
        head_hidden=m.head_hidden,
        init_temperature=cfg.init_temperature,
        init_bias=cfg.init_bias,
        learn_temperature=m.learn_temperature,
        rngs=rngs,
    )


def text_shape(cfg: Config, spec: DatasetSpec) -> tuple[int, int]:
    """(vocabulary size, caption length): the flags', else the data set's, else hashed words."""
    vocab = cfg.model.vocab_size or spec.vocab_size or DEFAULT_VOCAB
    length = cfg.model.text_len or spec.text_len or DEFAULT_TEXT_LEN
    if spec.vocab_size is not None and vocab < spec.vocab_size:
        raise ConfigError(
            f"--vocab-size {vocab} is smaller than the {spec.vocab_size} token ids of the data "
            "set: drop the flag"
        )
    if spec.text_len is not None and length != spec.text_len:
        raise ConfigError(
            f"--text-len {length} differs from the data set's captions of {spec.text_len} "
            "tokens: drop the flag"
        )
    return vocab, length


def _embedder(graphdef: nnx.GraphDef, params: Any, method: str, mesh: jax.sharding.Mesh):
    """``x [N, ...] -> float32[N, D]`` on the host through ``model.<method>``, on the mesh.

    Every process passes the same whole array; each feeds its own rows to the mesh, and
    the result comes back replicated, so this is correct with several processes too.
    """
    fn = jax.jit(
        lambda p, x: getattr(nnx.merge(graphdef, p), method)(x),
        out_shardings=replicated(mesh),
    )
    count, index = jax.process_count(), jax.process_index()

    def apply(x):
        rows = len(x) // count
        return fn(params, shard_batch(x[index * rows : (index + 1) * rows], mesh))

    return apply


def evaluate(
    graphdef: nnx.GraphDef,
    params: Any,
    spec: DatasetSpec,
    data: dict,
    mesh: jax.sharding.Mesh,
    dataset: str,
) -> dict[str, float]:
    """Linear probe and k-NN (labelled images), or retrieval recall and zero-shot accuracy.

    Image data sets are probed on the image tower's output, before the projection head
    (SimCLR's protocol: the head's output discards information the loss does not need).
    Image-text data sets get image->text and text->image recall@k on the test pairs; with
    class captions (``shapes``) also zero-shot top-1 accuracy among every caption, overall
    and on the compositions never seen in training, and recall that counts a retrieved
    item with the same caption as a match.
    """
    batch = 256 * mesh.devices.size  # embed pads the last batch to this; a multiple of it

    def emb(method: str, x) -> np.ndarray:
        return embed(_embedder(graphdef, params, method, mesh), x, batch_size=batch, jit=False)

    if spec.kind == "image":
        tr = emb("tower_x", data["train"]["image"])
        te = emb("tower_x", data["test"]["image"])
        ytr, yte = data["train"]["label"], data["test"]["label"]
        return {
            "linear_probe": linear_probe(tr, ytr, te, yte),
            "knn": knn_accuracy(tr, ytr, te, yte, num_classes=spec.num_classes),
        }
    test = data["test"]
    img, txt = emb("embed_x", test["image"]), emb("embed_y", test["text"])
    if not spec.class_captions:
        return retrieval_recall(img, txt)
    tokens, _ = class_captions(dataset)
    captions = emb("embed_y", tokens)
    ids = test["caption_id"]
    out = {"zero_shot_top1": zero_shot_accuracy(img, captions, ids)}
    if "novel" in test and np.any(test["novel"]):
        novel = np.asarray(test["novel"], bool)
        out["zero_shot_top1_novel"] = zero_shot_accuracy(img[novel], captions, ids[novel])
    out.update(retrieval_recall(img, txt, ks=(1, 5), ids=ids))
    return out


def batch_builder(cfg: Config, spec: DatasetSpec, mesh: jax.sharding.Mesh):
    """``f(host batch, step) -> Batch``: this host's rows of the step's global batch.

    Image data: the two views. Image-text: images and captions; with ``--hard-negatives
    K`` also K captions one attribute away from each image's own (``shapes``), laid out as
    the ring loss reads them (each device: its captions, then their hard negatives); with
    ``--skip-duplicate-negatives`` the caption ids, so that equal captions are not
    negatives.
    """
    d = cfg.data
    if spec.kind == "image":
        return lambda host, step: Batch(host["view1"], host["view2"])
    local_devices = len(mesh.local_devices)
    seed = cfg.run.seed

    def build(host: dict, step: int) -> Batch:
        text, ids = host["text"], host.get("caption_id")
        if d.hard_negatives:
            b = len(text)
            first = jax.process_index() * b  # global row of this host's first example
            extra = [
                captioned_shapes.one_attribute_apart(
                    ids[i : i + 1], d.hard_negatives, np.random.default_rng([seed, step, first + i])
                )
                for i in range(b)
            ]
            k = d.hard_negatives
            tokens = np.concatenate([t for t, _ in extra])  # [b, K, L]
            extra_ids = np.concatenate([n for _, n in extra])  # [b, K]
            # Each device: its captions, then their hard negatives (the ring losses' layout).
            text = np.asarray(losses.interleave(text, tokens.reshape(b * k, -1), local_devices))
            ids = np.asarray(losses.interleave(ids, extra_ids.reshape(b * k), local_devices))
        keep_ids = d.skip_duplicate_negatives
        return Batch(host["image"], text, ids=ids if keep_ids else None)

    return build


@dataclasses.dataclass
class Setup:
    """What a run is made of, built in order: mesh -> data -> model -> shard -> step."""

    mesh: jax.sharding.Mesh
    spec: DatasetSpec
    train_ds: Any
    eval_data: dict
    make_batch: Any  # (host batch, step) -> Batch for the step
    graphdef: nnx.GraphDef
    state: Any  # TrainState, placed on the mesh
    key: jax.Array
    step_fn: Any


def setup(cfg: Config) -> Setup:
    """Build everything up to the jitted step (nothing compiled yet).

    Every configuration error surfaces here as a :class:`ConfigError`, before any long work.
    """
    # --- config: the checks that need the devices ----------------------------------------
    devices = jax.devices()
    n_dev = cfg.run.num_devices or len(devices)
    if n_dev > len(devices):
        raise ConfigError(f"--num-devices {n_dev} but only {len(devices)} devices are present")
    check_devices(cfg, n_dev)

    # --- mesh ----------------------------------------------------------------------------
    mesh = make_mesh(num_devices=n_dev)

    # --- data ------------------------------------------------------------------------------
    d = cfg.data
    spec = get_spec(d.dataset, d.image_size)
    vocab, length = text_shape(cfg, spec) if spec.kind == "image_text" else (None, None)
    tokenizer = HashTokenizer(vocab or DEFAULT_VOCAB, length or DEFAULT_TEXT_LEN)
    try:
        train_ds = train_dataset(
            d.dataset,
            global_batch_size=cfg.run.batch_size,
            seed=cfg.run.seed,
            data_dir=d.data_dir,
            image_size=d.image_size,
            tokenizer=tokenizer,
        )
        eval_data = {
            split: eval_arrays(
                d.dataset,
                name,
                data_dir=d.data_dir,
                image_size=d.image_size,
                max_examples=d.eval_examples,
                tokenizer=tokenizer,
            )
            for split, name in [("train", spec.train_split), ("test", spec.test_split)]
            if spec.kind == "image" or split == "test"
        }
    except ValueError as e:
        raise ConfigError(str(e)) from e
    make_batch = batch_builder(cfg, spec, mesh)

    # --- model -----------------------------------------------------------------------------
    try:
        model = build_model(cfg, spec)
    except ValueError as e:  # e.g. a ViT patch that does not divide the image
        raise ConfigError(str(e)) from e
    tx = make_optimizer(cfg.train.optim)
    graphdef, state = create_train_state(model, tx)
    key = jax.random.key(cfg.run.seed + 1)  # dropout; the step folds in the step number

    # --- shard -----------------------------------------------------------------------------
    state = place_state(state, mesh, shard_optimizer=cfg.train.shard_optimizer)
    key = place_params(key, mesh)

    # --- step ------------------------------------------------------------------------------
    step_fn = make_train_step(graphdef, cfg.train, mesh, tx=tx)
    return Setup(mesh, spec, train_ds, eval_data, make_batch, graphdef, state, key, step_fn)


def evaluate_init(cfg: Config) -> dict[str, float]:
    """Evaluation of the randomly initialised model of ``cfg`` (the no-training baseline)."""
    s = setup(cfg)
    return evaluate(s.graphdef, s.state.params, s.spec, s.eval_data, s.mesh, cfg.data.dataset)


class RunError(RuntimeError):
    """The run cannot go on (divergence, no usable checkpoint, a busy work dir); one line."""


def check_paths(cfg: Config) -> None:
    """Refuse a work dir that is a file and a data dir that would be created out of nowhere."""
    workdir, data_dir = cfg.run.workdir, cfg.data.data_dir
    if not workdir:
        raise ConfigError("--workdir is required: pass a directory for checkpoints and metrics")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file: pass a directory")
    if data_dir is not None:
        parent = os.path.dirname(os.path.abspath(data_dir))
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise ConfigError(f"--data-dir {data_dir} is a file: pass a directory")
        if not os.path.isdir(parent):
            raise ConfigError(
                f"--data-dir {data_dir}: its parent directory {parent} does not exist; create it "
                "or pass an existing directory"
            )


def check_same_run(meta: dict, cfg: Config) -> None:
    """Before a checkpoint is restored: it was written by a run with these settings, else a
    :class:`ConfigError` naming every flag that differs, with its old and new value."""
    changed = differences(meta.get("config") or {}, cfg.identity())
    if changed:
        raise ConfigError(
            f"{cfg.run.workdir} holds a run with other settings ({'; '.join(changed)}): use a "
            "new --workdir, or the same settings to resume it"
        )


def _finite(value: float) -> bool:
    return bool(np.isfinite(value))


def run(cfg: Config, *, watchdog: Watchdog | None = None) -> list[dict]:
    """Train (or resume) the run in ``cfg.run.workdir``; returns every metrics record.

    Nothing a run has finished is lost: only finite states are checkpointed (a non-finite
    loss, gradient norm or state stops the run at that step with :class:`RunError`), a
    corrupted newest checkpoint is reported and skipped, changed settings are refused
    before anything is restored, one run holds the work dir at a time, and SIGTERM or
    SIGINT end the run after the current step with a checkpoint (exit status 0).
    """
    r = cfg.run
    check_paths(cfg)
    s = setup(cfg)
    lead = jax.process_index() == 0
    beat = watchdog.beat if watchdog is not None else (lambda: None)
    os.makedirs(r.workdir, exist_ok=True)
    try:
        lock = WorkdirLock(r.workdir).acquire()
    except WorkdirLockedError as e:
        raise RunError(str(e)) from None
    try:
        with StopSignals() as stop:
            return _train(cfg, s, stop, beat, lead)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective whose peer died fails here (or hangs until the watchdog ends it).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(
            f"process {jax.process_index()} of {jax.process_count()}: a step across the hosts "
            f"failed ({first}); a peer process is probably dead: restart every process with "
            "the same command to resume from the last checkpoint"
        ) from None
    finally:
        lock.release()


def _train(cfg: Config, s: Setup, stop: StopSignals, beat, lead: bool) -> list[dict]:
    r = cfg.run
    # --- checkpoint ------------------------------------------------------------------------
    ckpt = Checkpointer(r.workdir, every=r.checkpoint_every, keep=r.keep_checkpoints)
    try:
        restored, meta, restored_step = ckpt.restore_latest(
            {"train": s.state, "key": s.key}, check_meta=lambda m: check_same_run(m, cfg)
        )
    except NoUsableCheckpointError as e:
        ckpt.close()
        raise RunError(str(e)) from None
    except ConfigError:
        ckpt.close()
        raise
    beat()
    state, key = restored["train"], restored["key"]
    start = int(meta.get("step", 0)) if restored_step is not None else 0
    batches = BatchIterator(s.train_ds)
    if meta:
        batches.set_state(meta["data"])
    log = MetricsLog.open(os.path.join(r.workdir, METRICS_FILE), upto_step=start, write=lead)

    # --- loop ------------------------------------------------------------------------------
    def save(step: int, force: bool = False) -> None:
        meta = {"step": step, "data": batches.get_state(), "config": cfg.identity()}
        tree = {"train": state, "key": key}
        if force:
            ckpt.save(step, tree, meta, force=True)
        else:
            ckpt.maybe_save(step, tree, meta)

    t0 = time.perf_counter()
    bar = tqdm(total=r.steps, initial=start, disable=not (r.progress and lead), desc="train")
    try:
        for step in range(start + 1, r.steps + 1):  # `step` counts completed steps
            host = next(batches)
            batch = shard_batch(s.make_batch(host, step), s.mesh)
            state, m = s.step_fn(state, batch, key)
            values = {k: float(v) for k, v in m.items()}  # waits for the step
            beat()
            bad = [k for k in ("loss", "grad_norm") if not _finite(values[k])]
            if bad or values["finite"] != 1.0:
                what = ", ".join(f"{k} = {values[k]}" for k in bad) or "the new state"
                last = ckpt.latest_step()
                verb = "are" if len(bad) > 1 else "is"
                raise RunError(
                    f"step {step}: {what} {verb} not finite: the run diverged and stopped before "
                    f"saving that step; {'checkpoint ' + str(last) if last else 'no checkpoint'} "
                    "on disk holds a finite state (a lower --learning-rate, in a new --workdir, "
                    "may help)"
                )
            last = step == r.steps
            do_eval = last or (r.eval_every and step % r.eval_every == 0)
            if do_eval or step % r.log_every == 0 or step == 1:
                rec = {"step": step, **values}
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                if do_eval:
                    rec.update(
                        evaluate(
                            s.graphdef, state.params, s.spec, s.eval_data, s.mesh, cfg.data.dataset
                        )
                    )
                    beat()
                log.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            stopping = stop.agreed()
            save(step, force=last or stopping)
            beat()
            if stopping:
                if lead:
                    tqdm.write(
                        f"stopped by {stop.name or 'a signal to another process'} after step "
                        f"{step}: checkpoint saved in {r.workdir}; run the same command to resume"
                    )
                break
            if r.stop_after is not None and step >= r.stop_after:
                break  # as if killed here: no checkpoint beyond the periodic ones
    finally:
        bar.close()
        batches.close()
        ckpt.close()
        log.close()
    return log.records()


def summary_line(records: list[dict], workdir: str) -> str:
    """The last line a run prints: where it is, how far it got, its final metrics."""
    if not records:
        return f"nothing to do: {workdir} holds a finished run"
    final = records[-1]
    keep = ("loss", "temperature", "linear_probe", "knn", "zero_shot_top1", "i2t_r@1", "t2i_r@1")
    parts = [f"{k} {final[k]:.4g}" for k in keep if k in final]
    return f"step {final['step']}: " + ", ".join(parts) + f" (metrics: {workdir}/{METRICS_FILE})"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h = cfg.hosts
    watchdog = None
    try:
        if h.enabled:
            start(h.coordinator_address, h.num_processes, h.process_id, timeout_s=h.peer_timeout)
            watchdog = Watchdog(h.peer_timeout, "the multi-host run").__enter__()
        records = run(cfg, watchdog=watchdog)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunError, RuntimeError) as e:  # RuntimeError: the multi-host runtime did not start
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        if h.enabled:
            # Skip jax.distributed's shutdown barrier at exit: with a dead peer it would end
            # this process with a fatal multi-line report instead of the line above.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    finally:
        if watchdog is not None:
            watchdog.stop()
    if jax.process_index() == 0:
        print(summary_line(records, cfg.run.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
