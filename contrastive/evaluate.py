"""Evaluation of frozen embeddings: linear probe, k-NN accuracy, image-text retrieval recall@k.

All functions take plain arrays (NumPy or JAX) of embeddings, so they work with any encoder;
:func:`embed` computes embeddings in fixed-size batches with a jitted apply function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["embed", "linear_probe", "knn_accuracy", "retrieval_recall"]


def embed(
    apply_fn: Callable[[jax.Array], jax.Array], inputs: np.ndarray, *, batch_size: int = 256
) -> np.ndarray:
    """``apply_fn`` over ``inputs [N, ...]`` in batches -> ``float32[N, D]`` on the host.

    The last batch is padded to ``batch_size`` so that ``apply_fn`` compiles once.
    """
    n = len(inputs)
    if n == 0:
        raise ValueError("embed needs at least one input")
    fn = jax.jit(apply_fn)
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


def retrieval_recall(
    image_emb: np.ndarray, text_emb: np.ndarray, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for paired embeddings: row ``i`` of ``image_emb [N, D]`` matches row ``i`` of
    ``text_emb [N, D]``.

    Returns ``{"i2t_r@k": ..., "t2i_r@k": ...}`` for each ``k``: the fraction of queries whose
    match is among the ``k`` most cosine-similar candidates. The rank of the match counts
    candidates strictly more similar, so ties do not count against it.
    """
    a, b = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    _check_features("image", a)
    _check_features("text", b)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings must have one shape, got {a.shape}, {b.shape}")
    sim = np.asarray(_normalise(jnp.asarray(a)) @ _normalise(jnp.asarray(b)).T)  # (N, N)
    pos = np.diag(sim)
    rank_i2t = (sim > pos[:, None]).sum(1)  # candidates ahead of the match, per image query
    rank_t2i = (sim > pos[None, :]).sum(0)  # per text query (columns)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((rank_i2t < k).mean())
        out[f"t2i_r@{k}"] = float((rank_t2i < k).mean())
    return out
