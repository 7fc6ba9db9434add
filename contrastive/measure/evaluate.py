"""Evaluation of frozen embeddings: linear probe, k-NN, zero-shot accuracy, retrieval recall@k.

All functions take plain arrays (NumPy or JAX) of embeddings, so they work with any encoder;
:func:`embed` computes embeddings in fixed-size batches with a jitted apply function, and
:func:`evaluate_model` runs the metrics that fit a data set on a dual encoder's towers.

For an image-caption set with class captions (``shapes``)::

    tokens, ids = contrastive.data.class_captions("shapes")       # int32[K, L], int32[K]
    test = contrastive.data.eval_arrays("shapes", "test")
    img = embed(image_fn, test["image"])                          # (N, D)
    txt = embed(text_fn, test["text"])                            # (N, D)
    cls = embed(text_fn, tokens)                                  # (K, D)
    zero_shot_accuracy(img, cls, test["caption_id"])              # top-1 among K captions
    retrieval_recall(img, txt, ks=(1, 5), ids=test["caption_id"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contrastive.data import class_captions
from contrastive.data.pipeline import DatasetSpec
from contrastive.mesh import replicated, shard_batch

__all__ = [
    "embed",
    "linear_probe",
    "knn_accuracy",
    "retrieval_recall",
    "zero_shot_accuracy",
    "zero_shot_cross_entropy",
    "zero_shot_metrics",
    "ZERO_SHOT_TEMPERATURE",
    "evaluate_model",
]

# The zero-shot classifier's fixed temperature for its cross-entropy: the same for every loss,
# batch size and step, so that the metric depends on the embeddings alone (a learned
# temperature would make it depend on the loss's parametrisation). CLIP's initial 0.07 is in
# the same range; 0.05 keeps the metric sensitive once the cosines separate.
ZERO_SHOT_TEMPERATURE = 0.05


def embed(
    apply_fn: Callable[[jax.Array], jax.Array],
    inputs: np.ndarray,
    *,
    batch_size: int = 256,
    jit: bool = True,
) -> np.ndarray:
    """``apply_fn`` over ``inputs [N, ...]`` in batches -> ``float32[N, D]`` on the host.

    The last batch is padded to ``batch_size`` so that ``apply_fn`` compiles once.
    ``jit=False`` calls ``apply_fn`` as given (one that places its host input on a mesh
    itself, then calls a jitted function, must not be traced).
    """
    n = len(inputs)
    if n == 0:
        raise ValueError("embed needs at least one input")
    fn = jax.jit(apply_fn) if jit else apply_fn
    outs = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(inputs[start : start + batch_size])
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(np.asarray(fn(chunk), np.float32)[: batch_size - pad])
    return np.concatenate(outs)


def _check_features(name: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} features must be [N, D], got shape {x.shape}")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise ValueError(f"{name} labels must be [N] with N={len(x)}, got shape {y.shape}")


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    l2: float = 1e-3,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of multinomial logistic regression on frozen features.

    Args:
      train_x: ``[N, D]`` training embeddings; ``train_y``: ``[N]`` integer labels.
      test_x: ``[M, D]``; ``test_y``: ``[M]``.
      l2: weight of the L2 penalty (``C = 1 / (l2 * N)`` in scikit-learn's terms).

    Features are standardised with the training set's mean and std first, as in SimCLR's
    linear evaluation, so that ``l2`` means the same for every encoder. L-BFGS on the
    convex objective: deterministic, no learning rate to tune.
    """
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_features("train", train_x, train_y)
    _check_features("test", test_x, test_y)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=max_iter, tol=1e-6)
    clf.fit((train_x - mean) / std, train_y)
    return float((clf.predict((test_x - mean) / std) == test_y).mean())


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN accuracy on cosine similarity (Wu et al. 2018, used by SimCLR/DINO).

    Each test embedding votes with its ``k`` nearest training embeddings, weighted by
    ``exp(cos / temperature)``. Shapes as in :func:`linear_probe`.
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_features("train", train_x, train_y)
    _check_features("test", test_x, test_y)
    k = min(k, len(train_x))
    c = int(num_classes or max(train_y.max(), test_y.max()) + 1)

    @jax.jit
    def predict(q: jax.Array, keys: jax.Array, labels: jax.Array) -> jax.Array:
        sim = _normalise(q) @ _normalise(keys).T  # (m, D) · (D, N) -> (m, N)
        top, idx = jax.lax.top_k(sim, k)  # (m, k)
        votes = jax.nn.one_hot(labels[idx], c) * jnp.exp(top / temperature)[..., None]
        return jnp.argmax(votes.sum(1), axis=-1)

    keys, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    preds = [
        np.asarray(predict(jnp.asarray(test_x[i : i + chunk]), keys, labels))
        for i in range(0, len(test_x), chunk)
    ]
    return float((np.concatenate(preds) == test_y).mean())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``a [N, D]`` and ``b [M, D]`` -> ``float32[N, M]``."""
    # (N, D) · (D, M) -> (N, M)
    return np.asarray(_normalise(jnp.asarray(a)) @ _normalise(jnp.asarray(b)).T)


def zero_shot_accuracy(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = 1,
    chunk: int = 1024,
) -> float:
    """Zero-shot top-``k`` accuracy: each image against the embeddings of every class caption.

    Args:
      image_emb: ``[N, D]`` image embeddings.
      class_emb: ``[K, D]`` embeddings of the ``K`` class captions (``class_captions``).
      labels: ``int[N]``, the row of ``class_emb`` that describes each image (for ``shapes``
        its ``caption_id``).
      k: an image counts as right when its caption is among its ``k`` most similar.
      chunk: images compared at a time (memory ``chunk * K`` floats).

    The prediction is ``argmax_c cos(image, class_c)`` (CLIP's zero-shot classifier,
    Radford et al. 2021). The rank of the true caption counts captions strictly more similar,
    so ties do not count against it, as in :func:`retrieval_recall`.

    Example::

        >>> zero_shot_accuracy(np.eye(3), np.eye(3), np.array([0, 1, 1]))
        0.6666666666666666
    """
    a, c, labels = _zero_shot_inputs(image_emb, class_emb, labels)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ahead, _ = _zero_shot_rows(a, c, labels, ZERO_SHOT_TEMPERATURE, chunk)
    return float((ahead < k).mean())


@jax.jit
def _zero_shot_chunk(a: jax.Array, c: jax.Array, labels: jax.Array, inv_t: jax.Array):
    """Per image of a chunk: the captions strictly more similar than its own, and its
    cross-entropy among all captions at inverse temperature ``inv_t``."""
    sim = _normalise(a) @ _normalise(c).T  # (m, D) · (D, K) -> (m, K)
    true = jnp.take_along_axis(sim, labels[:, None], axis=1)[:, 0]
    ahead = (sim > true[:, None]).sum(1)
    xent = jax.nn.logsumexp(sim * inv_t, axis=1) - true * inv_t
    return ahead, xent


def _zero_shot_rows(
    a: np.ndarray, c: np.ndarray, labels: np.ndarray, temperature: float, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(ahead int[N], xent float[N])`` for every image, one similarity pass per chunk."""
    ahead, xent = [], []
    inv_t = jnp.float32(1.0 / temperature)
    cj = jnp.asarray(c)
    for start in range(0, len(a), chunk):
        h, x = _zero_shot_chunk(jnp.asarray(a[start : start + chunk]), cj,
                                jnp.asarray(labels[start : start + chunk]), inv_t)  # fmt: skip
        ahead.append(np.asarray(h))
        xent.append(np.asarray(x, np.float64))
    return np.concatenate(ahead), np.concatenate(xent)


def zero_shot_metrics(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """``{"zero_shot_top1", "zero_shot_xent"}`` from one pass over the similarities (what a
    run stopping at a target checks at every evaluation)."""
    a, c, labels = _zero_shot_inputs(image_emb, class_emb, labels)
    ahead, xent = _zero_shot_rows(a, c, labels, ZERO_SHOT_TEMPERATURE, 1024)
    return {"zero_shot_top1": float((ahead < 1).mean()), "zero_shot_xent": float(xent.mean())}


def _zero_shot_inputs(image_emb, class_emb, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, c = np.asarray(image_emb, np.float32), np.asarray(class_emb, np.float32)
    labels = np.asarray(labels)
    _check_features("image", a, labels)
    _check_features("class", c)
    if a.shape[1] != c.shape[1]:
        raise ValueError(
            f"image and class embeddings must have one width D, got {a.shape}, {c.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(c):
        raise ValueError(f"labels must be integer rows of class_emb in [0, {len(c)}), got {labels}")
    return a, c, labels


def zero_shot_cross_entropy(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    *,
    temperature: float = ZERO_SHOT_TEMPERATURE,
    chunk: int = 1024,
) -> float:
    """Zero-shot cross-entropy: the mean loss of classifying each image among all captions.

    ``mean_i [logsumexp_c (cos(x_i, t_c) / τ) − cos(x_i, t_{y_i}) / τ]`` over the ``N`` images,
    ``c`` over the ``K`` class captions, with a fixed ``τ`` (:data:`ZERO_SHOT_TEMPERATURE`).
    Unlike top-1 it moves smoothly with the embeddings (every image counts by how far its
    caption is from winning, not only whether it wins), and like top-1 it does not depend on
    the batch size a model was trained at. In nats; ``log K`` for embeddings that carry no
    information about the caption.

    Example::

        >>> xent = zero_shot_cross_entropy(np.eye(2), np.eye(2), np.array([0, 1]), temperature=1)
        >>> round(xent, 4)  # log(e + 1) - 1
        0.3133
    """
    a, c, labels = _zero_shot_inputs(image_emb, class_emb, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _, xent = _zero_shot_rows(a, c, labels, temperature, chunk)
    return float(xent.mean())


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k for paired embeddings: row ``i`` of ``image_emb [N, D]`` matches row ``i`` of
    ``text_emb [N, D]``.

    Returns ``{"i2t_r@k": ..., "t2i_r@k": ...}`` for each ``k``: the fraction of queries whose
    match is among the ``k`` most cosine-similar candidates. The rank of the match counts
    candidates strictly more similar, so ties do not count against it.

    Duplicates: with ``ids: int[N]`` (e.g. ``caption_id``), every candidate with the query's
    id is a match, not only row ``i``: two test images with the same caption have
    interchangeable texts, so retrieving either is right. A query's rank is then the number
    of non-matching candidates strictly more similar than its most similar match. Without
    ``ids`` (``ids = arange(N)``) only row ``i`` matches, the usual definition.
    """
    a, b = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    _check_features("image", a)
    _check_features("text", b)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings must have one shape, got {a.shape}, {b.shape}")
    sim = _cosine(a, b)  # (N, D) · (D, N) -> (N, N)
    if ids is None:
        pos = np.diag(sim)
        rank_i2t = (sim > pos[:, None]).sum(1)  # candidates ahead of the match, per image query
        rank_t2i = (sim > pos[None, :]).sum(0)  # per text query (columns)
    else:
        ids = np.asarray(ids)
        if ids.shape != (len(a),):
            raise ValueError(f"ids must be [N] with N={len(a)}, got shape {ids.shape}")
        match = ids[:, None] == ids[None, :]  # (N, N): image i and text j show one caption
        best_i2t = np.where(match, sim, -np.inf).max(1)  # most similar matching text, per image
        best_t2i = np.where(match, sim, -np.inf).max(0)  # most similar matching image, per text
        rank_i2t = ((sim > best_i2t[:, None]) & ~match).sum(1)
        rank_t2i = ((sim > best_t2i[None, :]) & ~match).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((rank_i2t < k).mean())
        out[f"t2i_r@{k}"] = float((rank_t2i < k).mean())
    return out


_EMBED_FNS: dict[tuple, Callable] = {}


def embedder(graphdef: nnx.GraphDef, params: Any, method: str, mesh: jax.sharding.Mesh):
    """``x [N, ...] -> float32[N, D]`` on the host through ``model.<method>``, on the mesh.

    Every process passes the same whole array; each feeds its own rows to the mesh, and
    the result comes back replicated, so this is correct with several processes too.
    """
    key = (graphdef, method, mesh)
    if key not in _EMBED_FNS:  # compiled once per model and tower, not per evaluation
        _EMBED_FNS[key] = jax.jit(
            lambda p, x: getattr(nnx.merge(graphdef, p), method)(x),
            out_shardings=replicated(mesh),
        )
    fn = _EMBED_FNS[key]
    count, index = jax.process_count(), jax.process_index()

    def apply(x):
        rows = len(x) // count
        return fn(params, shard_batch(x[index * rows : (index + 1) * rows], mesh))

    return apply


def evaluate_model(
    graphdef: nnx.GraphDef,
    params: Any,
    spec: DatasetSpec,
    data: dict,
    mesh: jax.sharding.Mesh,
    dataset: str,
    *,
    only: str | None = None,
) -> dict[str, float]:
    """Linear probe and k-NN (labelled images), or retrieval recall and zero-shot accuracy.

    Image data sets are probed on the image tower's output, before the projection head
    (SimCLR's protocol: the head's output discards information the loss does not need).
    Image-text data sets get image->text and text->image recall@k on the test pairs; with
    class captions (``shapes``) also zero-shot top-1 accuracy among every caption, overall
    and on the compositions never seen in training, and recall that counts a retrieved
    item with the same caption as a match. A ``data["val"]`` split (carved from the
    training split) adds the same metrics with a ``val_`` prefix. ``only="val_zero_shot_top1"``
    (or ``"zero_shot_top1"``, or the ``_xent`` ones) computes the two zero-shot metrics of that
    split alone: the cheap check of a run that stops at a target.
    """
    batch = 256 * mesh.devices.size  # embed pads the last batch to this; a multiple of it

    def emb(method: str, x) -> np.ndarray:
        return embed(embedder(graphdef, params, method, mesh), x, batch_size=batch, jit=False)

    if spec.kind == "image":
        tr = emb("tower_x", data["train"]["image"])
        te = emb("tower_x", data["test"]["image"])
        ytr, yte = data["train"]["label"], data["test"]["label"]
        return {
            "linear_probe": linear_probe(tr, ytr, te, yte),
            "knn": knn_accuracy(tr, ytr, te, yte, num_classes=spec.num_classes),
        }
    tokens, _ = class_captions(dataset) if spec.class_captions else (None, None)
    captions = None if tokens is None else emb("embed_y", tokens)
    quick = ("zero_shot_top1", "zero_shot_xent")
    if only is not None and only.removeprefix("val_") in quick and captions is not None:
        # The cheap check of a run stopping at a target: both zero-shot metrics of one split.
        prefix = "val_" if only.startswith("val_") else ""
        split = data["val" if prefix else "test"]
        metrics = zero_shot_metrics(emb("embed_x", split["image"]), captions, split["caption_id"])
        return {prefix + k: v for k, v in metrics.items()}
    out = _image_text_metrics(emb, data["test"], captions)
    if "val" in data:  # a validation split carved from train: what tuning reads
        val = _image_text_metrics(emb, data["val"], captions)
        out.update({f"val_{k}": v for k, v in val.items()})
    return out


def _image_text_metrics(emb: Callable, split: dict, captions: np.ndarray | None) -> dict:
    """Retrieval recall of a split's pairs; with class captions also zero-shot top-1 among
    them, overall and on never-seen compositions, and recall that counts same-caption items."""
    img, txt = emb("embed_x", split["image"]), emb("embed_y", split["text"])
    if captions is None:
        return retrieval_recall(img, txt)
    ids = split["caption_id"]
    out = zero_shot_metrics(img, captions, ids)
    if "novel" in split and np.any(split["novel"]):
        novel = np.asarray(split["novel"], bool)
        out["zero_shot_top1_novel"] = zero_shot_accuracy(img[novel], captions, ids[novel])
    out.update(retrieval_recall(img, txt, ks=(1, 5), ids=ids))
    return out
