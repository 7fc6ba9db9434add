"""Locked image towers (LiT / SigLiT): pre-train an image tower once, freeze it, cache its features.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", arXiv
2111.07991) and SigLiT (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
arXiv 2303.15343, Section 4) keep a pre-trained image tower *locked*: its weights never
change, so the embedding of every image is computed once and a contrastive step only runs
the text tower, the heads, the temperature, the bias and the loss. A step at B = 16,384
pairs then costs little more than the loss itself, which is what lets the batch-size study
reach large batches on a CPU.

The pieces, in the order a study uses them:

1. :func:`pretrain_image_tower`: supervised pre-training of a small image tower on the
   generated ``shapes`` data (:mod:`contrastive.data.captioned_shapes`): one softmax head
   per attribute (shape, colour, size, position, texture), AdamW, a fixed number of steps,
   deterministic given the seed. The held-out (``test`` split) accuracy of every attribute
   is in the returned ``info``. :func:`pretrained_image_tower` caches the parameters, keyed
   by the pre-training config, so a study pre-trains once.
2. :func:`image_features`: the frozen tower's features of examples ``[0, N)`` of a split,
   float32 ``[N, F]``, computed in jitted batches; :func:`cached_features` stores them as
   ``.npy`` keyed by the tower's config, a sha256 of its parameter values, the split, the
   count and the data seed (:func:`tower_features` ties the two together).
   :func:`load_feature_file` reads a user's own features computed with any model.
3. :class:`LockedFeatures`: an "image tower" whose input *is* the feature row; with
   :class:`BagOfWordsText` as the text tower, :func:`locked_dual_encoder` builds the
   :class:`~contrastive.models.DualEncoder` that trains on top of the locked features.

Example (the study's flow; a few seconds at this size)::

    cfg = PretrainConfig(train_examples=2048, steps=300)
    pre = pretrained_image_tower(cfg, cache_dir="/tmp/lit")       # pre-trains once
    feats = tower_features(pre, split="train", num_examples=4096, cache_dir="/tmp/lit")
    tokens, _ = shapes_captions("train", 4096)                   # int32 [4096, 16]
    model = locked_dual_encoder(
        feats.shape[1], BagOfWordsText(VOCAB_SIZE, TEXT_LEN, rngs=nnx.Rngs(0)),
        embed_dim=64, rngs=nnx.Rngs(0))
    # batches: (feats[idx], tokens[idx]) for the train step, as (inputs_x, inputs_y).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from contrastive.data.captioned_shapes import (
    ATTRIBUTES,
    TEXT_LEN,
    CaptionedShapes,
    caption_id,
    encode,
)
from contrastive.models import (
    CLIP_INIT_TEMPERATURE,
    IMAGE_ENCODERS,
    DualEncoder,
    dropout,
    make_image_encoder,
)

__all__ = [
    "PretrainConfig",
    "PretrainedTower",
    "build_image_tower",
    "pretrain_image_tower",
    "pretrained_image_tower",
    "image_features",
    "params_digest",
    "cached_features",
    "tower_features",
    "load_feature_file",
    "shapes_captions",
    "LockedFeatures",
    "BagOfWordsText",
    "locked_dual_encoder",
]

# Part of every cache key: bump it when what a cached file holds changes meaning.
_CACHE_VERSION = 1
_IMAGE_SHAPE = (32, 32, 3)


# ------------------------------------------------------------------ pre-training


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Supervised pre-training of the image tower on ``shapes`` (five attribute heads).

    The default (an MLP of width 128 on the 3,072 pixels, 8,192 examples, 1,500 steps of
    128) takes about 17 s of CPU time, mostly compilation, and reaches on ``test`` (whose odd
    examples are (shape, colour) pairs never seen in training): shape 42.7 % (chance
    12.5 %), colour 99.2 %, size 87.6 %, position 100 %, texture 51.3 % (chance 33 %).
    Shape and texture are the hard attributes for a tower without convolutions;
    ``encoder="resnet"`` learns texture better but costs about 10x more per step on a CPU.
    """

    encoder: str = "mlp"  # one of contrastive.models.IMAGE_ENCODERS
    width: int = 128  # mlp: hidden width = feature width F; resnet: first-stage channels
    depth: int = 2  # mlp: layers; resnet: blocks per stage
    train_examples: int = 8192
    test_examples: int = 1000
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0  # initialisation and batch order
    data_seed: int = 0  # the CaptionedShapes seed of both splits

    def __post_init__(self):
        if self.encoder not in IMAGE_ENCODERS:
            raise ValueError(
                f"PretrainConfig.encoder={self.encoder!r}: use one of {', '.join(IMAGE_ENCODERS)}"
            )
        for name in ("width", "depth", "train_examples", "test_examples", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"PretrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"PretrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"PretrainConfig.{name} must be an integer >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PretrainedTower:
    """A pre-trained image tower: ``tower(images [B, 32, 32, 3] in [0, 1]) -> [B, F]``.

    ``info``: ``accuracy`` and ``chance`` per attribute on ``test``, ``loss_start`` and
    ``loss_end`` (summed cross-entropy of the five heads, mean over the first / last tenth
    of the steps), ``seconds``, ``params_sha256``, and ``from_cache``.
    """

    tower: nnx.Module
    config: PretrainConfig
    info: dict[str, Any]

    @property
    def features(self) -> int:
        return int(self.tower.features)

    def tower_config(self) -> dict[str, Any]:
        """The description of the tower used in feature-cache keys."""
        return {"kind": "pretrained_shapes", **self.config.to_dict()}


def build_image_tower(config: PretrainConfig) -> nnx.Module:
    """A fresh image tower for ``config``, initialised from ``config.seed``."""
    return make_image_encoder(
        config.encoder,
        _IMAGE_SHAPE,
        width=config.width,
        depth=config.depth,
        rngs=nnx.Rngs(config.seed),
    )


class _AttributeHeads(nnx.Module):
    """The tower and one linear softmax head per attribute: [B, F] -> five [B, n_k] logits.

    The five heads are one ``(F, sum_k n_k)`` matrix, sliced per attribute: one random
    draw at initialisation instead of five (each distinct shape compiles its own draw).
    """

    def __init__(self, tower: nnx.Module, *, rngs: nnx.Rngs):
        self.tower = tower
        sizes = [len(values) for values in ATTRIBUTES.values()]
        self.head = nnx.Linear(tower.features, sum(sizes), rngs=rngs)
        self.splits = tuple(np.cumsum(sizes)[:-1].tolist())

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        logits = self.head(self.tower(images))  # (B, F) · (F, 31) -> (B, 31)
        return jnp.split(logits, self.splits, axis=-1)  # (B, n_k), k = 1..5


def _to_float(images: jax.Array) -> jax.Array:
    # The pipeline's convention (contrastive.data.pipeline): uint8 pixels -> [0, 1].
    return images.astype(jnp.float32) / 255.0


def _shapes_arrays(split: str, start: int, stop: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 32, 32, 3] and attribute labels int32 [n, 5] of examples [start, stop)."""
    src = CaptionedShapes(split, num_examples=max(stop, 1), seed=seed)
    images = np.empty((stop - start, *_IMAGE_SHAPE), np.uint8)
    labels = np.empty((stop - start, len(ATTRIBUTES)), np.int32)
    for row, i in enumerate(range(start, stop)):
        example = src[i]
        images[row] = example["image"]
        labels[row] = [example[k] for k in ATTRIBUTES]
    return images, labels


def _batched(fn: Callable, params: Any, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``fn(params, batch)`` over ``images`` in equal batches (the last one padded, so one
    compilation serves all), outputs concatenated; ``fn`` returns a list of arrays."""
    n = images.shape[0]
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        result = fn(params, chunk)
        outs.append([np.asarray(r)[: batch_size - pad] for r in result])
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def pretrain_image_tower(config: PretrainConfig | None = None) -> PretrainedTower:
    """Pre-train an image tower on ``shapes`` with one softmax head per attribute.

    The loss is the sum over the five attributes ``k`` of the mean cross-entropy
    ``-(1/B) sum_i log softmax(W_k h_i + c_k)[label_ik]``, ``h_i = tower(image_i)`` [F];
    AdamW with cosine decay from ``learning_rate`` over ``steps`` steps of ``batch_size``
    examples drawn with replacement from the first ``train_examples`` of ``train``. All
    steps run in one jitted ``lax.scan``; the batch order comes from ``config.seed``, so the
    result is deterministic (bitwise on one machine). The heads are dropped afterwards:
    what a locked tower emits is ``tower(image)``, [F] (F = ``width`` for the MLP).

    Example::

        pre = pretrain_image_tower(PretrainConfig(train_examples=2048, steps=300))
        pre.info["accuracy"]  # {'shape': ..., 'colour': ..., ...} on test
    """
    config = PretrainConfig() if config is None else config
    start_time = time.perf_counter()
    images, labels = _shapes_arrays("train", 0, config.train_examples, config.data_seed)
    test_images, test_labels = _shapes_arrays("test", 0, config.test_examples, config.data_seed)

    tower = build_image_tower(config)
    model = _AttributeHeads(tower, rngs=nnx.Rngs(config.seed + 1))
    graphdef, params = nnx.split(model)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    order = np.random.default_rng([config.seed, 1]).integers(
        0, config.train_examples, (config.steps, config.batch_size)
    )

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(_to_float(x))
        return sum(
            jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y[:, k]))
            for k, lg in enumerate(logits)
        )

    @jax.jit
    def train(p, data_x, data_y, order):
        def step(carry, idx):
            p, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, data_x[idx], data_y[idx])
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), order)
        return p, losses

    params, step_losses = train(params, images, labels, order)

    @jax.jit
    def predict(p, x):
        return [jnp.argmax(lg, axis=-1) for lg in nnx.merge(graphdef, p)(_to_float(x))]

    predictions = _batched(predict, params, test_images, 512)
    nnx.update(model, params)
    step_losses = np.asarray(step_losses)
    tenth = max(1, config.steps // 10)
    info = {
        "accuracy": {
            name: float(np.mean(pred == test_labels[:, k]))
            for k, (name, pred) in enumerate(zip(ATTRIBUTES, predictions, strict=True))
        },
        "chance": {name: 1.0 / len(values) for name, values in ATTRIBUTES.items()},
        "test_examples": config.test_examples,
        "loss_start": float(step_losses[:tenth].mean()),
        "loss_end": float(step_losses[-tenth:].mean()),
        "seconds": time.perf_counter() - start_time,
        "params_sha256": params_digest(nnx.state(tower)),
        "from_cache": False,
    }
    return PretrainedTower(tower, config, info)


# ------------------------------------------------------------------ caching


def params_digest(params: Any) -> str:
    """sha256 of a parameter pytree's values: every leaf's path, dtype, shape and bytes.

    Equal digests mean bitwise-equal parameters (up to sha256 collisions); a change of a
    single bit of any leaf changes the digest.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_digest(obj: Any, what: str) -> str:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        msg = f"{what} must be JSON-serialisable (a plain dict of str/int/float): {e}"
        raise ValueError(msg) from e
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete: write a
    temporary file in the same directory (same file system), fsync it, then ``os.replace``,
    which is atomic on POSIX. A failure removes the temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_entry(data_path: Path, data: bytes, meta: dict[str, Any]) -> None:
    """The data file first, then its JSON: a reader trusts the data only once the JSON with
    the matching key exists, so a crash between the two writes leaves a miss, not a lie."""
    data_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(data_path, data)
    _atomic_write(data_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())


def _read_meta(data_path: Path, key: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(data_path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key and data_path.exists() else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40]


def _check_features(features: Any, num_examples: int, what: str) -> np.ndarray:
    a = np.asarray(features)
    if a.ndim != 2 or a.shape[0] != num_examples:
        raise ValueError(f"{what} gave shape {a.shape}; expected [{num_examples}, F]")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} gave dtype {a.dtype}; expected floating point features")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} gave non-finite features; fix the tower before caching")
    return a


def cached_features(
    cache_dir: str | os.PathLike,
    tower_config: dict[str, Any],
    params: Any,
    split: str,
    num_examples: int,
    compute_fn: Callable[[], Any],
    *,
    data_seed: int = 0,
) -> np.ndarray:
    """The features of examples ``[0, num_examples)`` of ``split``, from the cache or computed.

    The key is the sha256 of (``tower_config`` as canonical JSON, :func:`params_digest` of
    ``params``, ``split``, ``num_examples``, ``data_seed``, the cache format): a different
    config, a single changed parameter bit, another split, count or data seed is a miss. A
    miss calls ``compute_fn()`` (no arguments; it must return ``[num_examples, F]`` floats,
    stored as float32) and writes ``features-<split>-<N>-<key>.npy`` and a ``.json`` beside
    it, each atomically (temporary file + ``os.replace``): a killed writer leaves at most a
    hidden ``.tmp`` file, never a half-written entry. A hit loads the ``.npy``; an entry
    that does not load or has the wrong shape is recomputed.

    Returns float32 ``[num_examples, F]``.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    params_sha = params_digest(params)
    description = {
        "version": _CACHE_VERSION,
        "tower_config": tower_config,
        "params_sha256": params_sha,
        "split": split,
        "num_examples": num_examples,
        "data_seed": data_seed,
    }
    key = _json_digest(description, "tower_config")
    path = Path(cache_dir) / f"features-{_safe(split)}-{num_examples}-{key[:24]}.npy"
    meta = _read_meta(path, key)
    if meta is not None:
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            features = None
        if (
            features is not None
            and features.dtype == np.float32
            and features.shape == tuple(meta["shape"])
            and features.shape[0] == num_examples
        ):
            return features
    features = _check_features(compute_fn(), num_examples, "compute_fn")
    _write_entry(path, _npy_bytes(features), {"key": key, "shape": features.shape, **description})
    return features


def pretrained_image_tower(
    config: PretrainConfig | None = None, *, cache_dir: str | os.PathLike | None = None
) -> PretrainedTower:
    """:func:`pretrain_image_tower`, with the parameters cached in ``cache_dir``.

    Keyed by a sha256 of ``config`` (and the cache format): the first call pre-trains and
    writes ``tower-<key>.npz`` (the tower's state leaves) and ``tower-<key>.json`` (config,
    info, parameter digest), atomically; later calls with the same config rebuild the tower
    and load the parameters, checking their digest (a mismatch pre-trains again).
    ``cache_dir=None`` always pre-trains.
    """
    config = PretrainConfig() if config is None else config
    if cache_dir is None:
        return pretrain_image_tower(config)
    key = _json_digest({"version": _CACHE_VERSION, "pretrain": config.to_dict()}, "config")
    path = Path(cache_dir) / f"tower-{key[:24]}.npz"
    meta = _read_meta(path, key)
    if meta is not None:
        tower = build_image_tower(config)
        state = nnx.state(tower)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        try:
            with np.load(path, allow_pickle=False) as stored:
                loaded = [stored[f"leaf_{i:04d}"] for i in range(len(leaves))]
        except (OSError, ValueError, KeyError):
            loaded = None
        if loaded is not None and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(loaded, leaves, strict=True)
        ):
            new_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in loaded])
            if params_digest(new_state) == meta["info"]["params_sha256"]:
                nnx.update(tower, new_state)
                return PretrainedTower(tower, config, {**meta["info"], "from_cache": True})
    pre = pretrain_image_tower(config)
    leaves = jax.tree_util.tree_leaves(nnx.state(pre.tower))
    buffer = io.BytesIO()
    np.savez(buffer, **{f"leaf_{i:04d}": np.asarray(a) for i, a in enumerate(leaves)})
    meta = {"key": key, "config": config.to_dict(), "info": pre.info}
    _write_entry(path, buffer.getvalue(), meta)
    return pre


def image_features(
    tower: nnx.Module,
    *,
    split: str,
    num_examples: int,
    data_seed: int = 0,
    batch_size: int = 1024,
) -> np.ndarray:
    """The frozen ``tower``'s features of ``shapes`` examples ``[0, num_examples)`` of ``split``.

    Images are generated ``batch_size`` at a time (uint8 -> [0, 1] floats, as in
    pre-training) and encoded by one jitted function (the last batch padded, so it compiles
    once); no dropout. Returns float32 ``[num_examples, F]`` in example order.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    graphdef, state = nnx.split(tower)

    @jax.jit
    def encode_batch(state, images):
        return [nnx.merge(graphdef, state)(_to_float(images)).astype(jnp.float32)]

    out = np.empty((num_examples, tower.features), np.float32)
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        images, _ = _shapes_arrays(split, start, stop, data_seed)
        (out[start:stop],) = _batched(encode_batch, state, images, batch_size)
    return out


def tower_features(
    pretrained: PretrainedTower,
    *,
    split: str,
    num_examples: int,
    data_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """:func:`image_features` of a pre-trained tower, through :func:`cached_features` when
    ``cache_dir`` is set. float32 ``[num_examples, F]``."""

    def compute():
        return image_features(
            pretrained.tower,
            split=split,
            num_examples=num_examples,
            data_seed=data_seed,
            batch_size=batch_size,
        )

    if cache_dir is None:
        return compute()
    return cached_features(
        cache_dir,
        pretrained.tower_config(),
        nnx.state(pretrained.tower),
        split,
        num_examples,
        compute,
        data_seed=data_seed,
    )


def shapes_captions(
    split: str, num_examples: int, *, data_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Caption tokens int32 ``[N, TEXT_LEN]`` and caption ids int32 ``[N]`` of ``shapes``
    examples ``[0, N)``, exactly ``src[i]["text"]`` and ``src[i]["caption_id"]``, without
    rendering the images (about 10x faster): the text side of a locked-tower data set."""
    src = CaptionedShapes(split, num_examples=num_examples, seed=data_seed)
    tokens = np.empty((num_examples, TEXT_LEN), np.int32)
    ids = np.empty((num_examples,), np.int32)
    for i in range(num_examples):
        attrs, _ = src.attributes(i)
        tokens[i] = encode(attrs, attrs["template"])
        ids[i] = caption_id(*(attrs[k] for k in ATTRIBUTES))
    return tokens, ids


# ------------------------------------------------------------------ a user's own features

_WIDENED = (np.float16, ml_dtypes.bfloat16)


def load_feature_file(
    path: str | os.PathLike, *, num_examples: int, split_name: str = "training"
) -> np.ndarray:
    """A user's own image features: a ``.npy`` array ``[N, D]``, row ``i`` = example ``i``.

    Computed with any model, in the data set's example order, for the ``N = num_examples``
    examples of the split named ``split_name`` (used in messages only). Checked from the
    file's header before the values are read, then:

    - float32 is returned as is;
    - float16 and bfloat16 are widened to float32 (exact). NumPy writes an
      ``ml_dtypes.bfloat16`` array as raw 2-byte records (``V2``); a ``V2`` array is read
      as bfloat16;
    - float64 is rounded to float32 (the precision the model computes in); a value beyond
      float32's range is refused;
    - integer, boolean, complex or other dtypes are refused (features are not labels);
    - NaN or infinity anywhere is refused.

    Each problem is a one-line ``ValueError`` that says what to change. Returns float32
    ``[N, D]``.

    Example::

        np.save("features.npy", my_model(images).astype(np.float32))   # [1000, 512]
        x = load_feature_file("features.npy", num_examples=1000)
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ValueError(
            f"feature file {str(path)!r} does not exist: save your features there with "
            f"np.save, one row per example of the {split_name} split ({num_examples} rows)"
        )
    if path.suffix != ".npy":
        raise ValueError(f"{name} is not a .npy file: save the [N, D] array with np.save")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name} is not a readable .npy array ({e}): save it with np.save") from e
    if array.ndim != 2:
        raise ValueError(
            f"{name} has shape {array.shape}; features must be 2-D [N, D], one row per example"
        )
    if array.dtype == np.dtype("V2") and array.dtype.names is None:
        array = array.view(ml_dtypes.bfloat16)
    dtype = array.dtype
    if not (dtype in (np.float32, np.float64) or any(dtype == np.dtype(t) for t in _WIDENED)):
        raise ValueError(
            f"{name} holds {dtype} values; features must be floating point: save them as "
            "float32 (float16, bfloat16 and float64 are converted to float32)"
        )
    if array.shape[0] != num_examples:
        raise ValueError(
            f"{name} has {array.shape[0]} rows but the {split_name} split has {num_examples} "
            "examples: save one row per example, in the data set's order"
        )
    if array.shape[1] < 1:
        raise ValueError(f"{name} has shape {array.shape}: features need D >= 1 columns")
    values = np.asarray(array, dtype=np.float64 if dtype == np.float64 else np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (NaN/inf; first in row {row}): "
            "recompute or drop those examples"
        )
    if dtype == np.float64:
        if np.max(np.abs(values)) > np.finfo(np.float32).max:
            raise ValueError(
                f"{name} has float64 values beyond float32's range: rescale the features"
            )
        values = values.astype(np.float32)
    return values


# ------------------------------------------------------------------ the locked model


class LockedFeatures(nnx.Module):
    """The locked "image tower": its input is the precomputed feature row, [B, F] -> [B, F].

    No parameters: the pre-trained tower already ran, once, when the features were cached
    (LiT, Zhai et al. 2022). ``normalize=True`` divides each row by its L2 norm, a fixed
    map that makes features of any model (whose scale is arbitrary) the same size for the
    trainable head on top, so its learning rate carries over; ``False`` passes the rows
    through unchanged (cast to float32). The input is under ``stop_gradient``: nothing
    upstream of the features can be trained through this tower.

    Example::

        tower = LockedFeatures(128)
        tower(jnp.ones((4, 128))).shape  # (4, 128)
    """

    def __init__(self, features: int, *, normalize: bool = True):
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive integer, got {features!r}")
        self.features = features
        self.normalize = normalize

    def __call__(self, inputs: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if inputs.ndim != 2 or inputs.shape[-1] != self.features:
            raise ValueError(
                f"LockedFeatures({self.features}) takes feature rows [B, {self.features}], "
                f"got shape {inputs.shape}: pass the cached features, not images"
            )
        x = jax.lax.stop_gradient(inputs.astype(jnp.float32))
        if self.normalize:
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
        return x


class BagOfWordsText(nnx.Module):
    """A cheap text tower: mean of learned token embeddings, then a 2-layer MLP.

    ``e = (1/n) sum_{t: tok_t != pad} E[tok_t]`` [width] over the ``n`` real tokens (a
    caption of only padding gives 0), then ``h = W2 gelu(W1 LN(e) + b1) + b2`` [width]
    with dropout after the GELU. Forward cost per caption: ``L`` gathers and two
    ``width x hidden`` matmuls, about ``4 width hidden`` = 33 kFLOP at the defaults, against
    ``2 B D`` per caption for the similarities of the loss (2.1 MFLOP at B = 16,384,
    D = 64): at large batches the step's cost is the loss's.
    Word order is ignored, which is enough for ``shapes`` captions (every attribute is a
    distinct word; position is "top left", "left", ...). The call signature is that of
    :class:`contrastive.models.TextTransformer`: ``tower(tokens [B, L], key=None)``, and
    ``features`` is the output width.

    Example::

        text = BagOfWordsText(36, 16, rngs=nnx.Rngs(0))
        text(jnp.ones((4, 16), jnp.int32)).shape  # (4, 64)
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int = 64,
        hidden: int | None = None,
        *,
        pad_id: int = 0,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = hidden or 2 * width
        self.embed = nnx.Embed(vocab_size, width, **kw)
        self.ln = nnx.LayerNorm(width, **kw)
        self.fc1 = nnx.Linear(width, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, width, **kw)
        self.pad_id = pad_id
        self.max_len = max_len
        self.dropout_rate = dropout_rate
        self.features = width

    def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(
                f"BagOfWordsText takes tokens [B, L] with L <= max_len={self.max_len}, "
                f"got shape {tokens.shape}"
            )
        mask = (tokens != self.pad_id)[..., None].astype(jnp.float32)  # (B, L, 1)
        e = self.embed(tokens).astype(jnp.float32)  # (B, L) -> (B, L, width)
        e = jnp.sum(e * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        h = jax.nn.gelu(self.fc1(self.ln(e)))  # (B, width) · (width, hidden) -> (B, hidden)
        h = dropout(h, self.dropout_rate, key)
        return self.fc2(h)  # (B, hidden) · (hidden, width) -> (B, width)


def locked_dual_encoder(
    features: int,
    text_tower: nnx.Module,
    *,
    train_head: bool = True,
    normalize: bool = True,
    embed_dim: int | None = None,
    head_hidden: int | None = None,
    init_temperature: float = CLIP_INIT_TEMPERATURE,
    init_bias: float | None = None,
    learn_temperature: bool = True,
    rngs: nnx.Rngs,
) -> DualEncoder:
    """A :class:`~contrastive.models.DualEncoder` on locked image features and a text tower.

    Its first input is the feature rows ``[B, features]`` (:class:`LockedFeatures`), its
    second the text tower's input. What trains:

    - ``train_head=True`` (default): the image-side projection head ``[F] -> [D]`` (linear,
      or two layers with ``head_hidden``), the text tower and its head, the temperature and
      the bias. The head is the only part of the image side that can adapt.
      ``embed_dim`` None means D = 64.
    - ``train_head=False``: LiT proper (Zhai et al. 2022, Section 3): no image head at all;
      the image embedding is the L2-normalised locked feature, so ``D = features``
      (``embed_dim`` None or equal to ``features``), and only the text side, temperature
      and bias train.

    Either way the model holds no image-tower parameters, so nothing frozen receives (or
    could receive) a gradient, and the optimiser state covers only what trains.
    """
    if not train_head:
        if embed_dim not in (None, features):
            raise ValueError(
                f"train_head=False uses the locked features as the image embedding, so "
                f"embed_dim must equal features={features} (got {embed_dim}): drop embed_dim"
            )
        embed_dim = features
    elif embed_dim is None:
        embed_dim = 64
    model = DualEncoder(
        LockedFeatures(features, normalize=normalize),
        text_tower,
        embed_dim=embed_dim,
        head_hidden=head_hidden,
        init_temperature=init_temperature,
        init_bias=init_bias,
        learn_temperature=learn_temperature,
        head_x=train_head,
        rngs=rngs,
    )
    return model
