"""Shared helpers of the loss tests: random embeddings, the loss options, comparisons."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import event
from hypothesis import strategies as st

import losses
from losses import reference
from losses._tiles import choose_tiling

LOSSES = ("infonce", "sigmoid", "decoupled")

# Every option of every loss; hyperparameters that are arrays (differentiable) are kept
# apart from the static ones.
OPTIONS = {
    "infonce": [
        {},
        {"symmetric": False},
        {"intra_view": True},
        {"intra_view": True, "symmetric": False},
    ],
    "decoupled": [
        {},
        {"symmetric": False},
        {"sigma": 0.5},
        {"intra_view": True},
        {"intra_view": True, "sigma": 0.8, "symmetric": False},
    ],
    "sigmoid": [{}],
}
CASES = [(name, opts) for name in LOSSES for opts in OPTIONS[name]]


def case_id(case) -> str:
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def embeddings(seed: int, batch: int, dim: int, *, normalise: bool = True, dtype=jnp.float32):
    """A pair of (batch, dim) embeddings whose rows are noisy copies of each other."""
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, dim), jnp.float32)
    y = x + 0.7 * jax.random.normal(ky, (batch, dim), jnp.float32)
    if normalise:
        # Rows of norm <= 1, so |s| <= 1 / temperature, as for L2-normalised embeddings;
        # dividing by the largest norm keeps the values continuous even at dim = 1.
        x = x / jnp.max(jnp.linalg.norm(x, axis=1))
        y = y / jnp.max(jnp.linalg.norm(y, axis=1))
    return x.astype(dtype), y.astype(dtype)


def hyper(name: str, temperature: float, bias: float = -1.0) -> dict:
    """Array hyperparameters, so that their gradients are checked too."""
    h = {"temperature": jnp.float32(temperature)}
    if name == "sigmoid":
        h["bias"] = jnp.float32(bias)
    return h


def dense_value_and_grads(name: str, opts: dict, x, y, hp):
    f = getattr(reference, name)
    fn = lambda x, y, hp: f(x, y, **hp, **opts)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, y, hp)


def enable_x64():
    try:
        return jax.enable_x64(True)
    except AttributeError:  # older jax
        from jax.experimental import enable_x64 as ctx

        return ctx()


def oracle(name: str, opts: dict, x, y, hp):
    """The dense reference evaluated in float64: the truth, as numpy arrays.

    Float64 keeps the oracle's own rounding out of the comparison: where the softmax
    saturates, the float32 dense loss loses digits that the tiled one keeps.
    """
    with enable_x64():
        x64, y64 = (np.asarray(a, np.float64) for a in (x, y))
        hp64 = {k: np.float64(v) for k, v in hp.items()}
        return jax.tree.map(np.asarray, dense_value_and_grads(name, opts, x64, y64, hp64))


def tiled_value_and_grads(name: str, opts: dict, x, y, hp, **engine):
    f = getattr(losses, name)
    fn = lambda x, y, hp: f(x, y, **hp, **opts, **engine)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, y, hp)


def assert_close(actual, expected, *, rtol: float, what: str = "") -> None:
    """Norm-wise relative comparison, leaf by leaf: max |a - e| <= rtol * max |e|."""
    leaves = jax.tree_util.tree_leaves_with_path(actual)
    for (path, a), e in zip(leaves, jax.tree.leaves(expected), strict=True):
        where = f"{what}{jax.tree_util.keystr(path)}"
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (where, a.shape, e.shape)
        assert np.all(np.isfinite(a)), f"{where}: non-finite values"
        scale = max(np.max(np.abs(e)), 1e-30) if e.size else 1.0
        err = np.max(np.abs(a - e)) / scale if e.size else 0.0
        assert err <= rtol, f"{where}: relative error {err:.2e} > {rtol:.0e}"


def counted_pairs(batch: int, rows: int, valid=None, ids=None):
    """NumPy ``(positive, negative)`` masks ``(B, M)`` of the pairs a loss counts."""
    v = np.ones(rows, bool) if valid is None else np.asarray(valid)
    eye = np.arange(batch)[:, None] == np.arange(rows)[None, :]
    both = v[:batch, None] & v[None, :]
    negative = both & ~eye
    if ids is not None:
        ids = np.asarray(ids)
        negative &= ids[:batch, None] != ids[None, :]
    return both & eye, negative


def summed_terms(x, y, hp, dx, dy, valid=None, ids=None) -> dict:
    """The size of the terms each hyperparameter's gradient sums, float64.

    dL/dτ = -Σ_ij G_ij s_ij / τ and dL/db = Σ_ij G_ij (G = dL/ds) are sums of terms of both
    signs that can cancel to almost nothing (a hard negative against a misplaced positive),
    where no float32 computation, the dense one included, keeps relative digits. They are
    compared against the size of their terms: (Σ_i |x_i·dx_i| + Σ_j |y_j·dy_j|) / (2τ)
    for the temperature and Σ_ij |G_ij| over the pairs that count for the bias.
    """
    x, y, dx, dy = (np.asarray(a, np.float64) for a in (x, y, dx, dy))
    tau = float(hp["temperature"])
    terms = {"temperature": (np.abs(np.sum(x * dx, 1)).sum() + np.abs(np.sum(y * dy, 1)).sum())}
    terms["temperature"] /= 2 * tau
    if "bias" in hp:  # the sigmoid loss: |G_ij| = sigmoid(-z_ij (s_ij + b)) / V
        positive, negative = counted_pairs(x.shape[0], y.shape[0], valid, ids)
        zs = np.where(positive, 1.0, -1.0) * (x @ y.T / tau + float(hp["bias"]))
        g = np.where(positive | negative, np.exp(-np.logaddexp(0.0, zs)), 0.0)
        terms["bias"] = np.sum(g) / max(np.sum(np.diag(positive[:, : x.shape[0]])), 1)
    return terms


def assert_hyper_grads_close(got: dict, want: dict, terms: dict, *, what: str) -> None:
    """Each hyperparameter's gradient within 1e-4 of the larger of its value and its terms."""
    for k, w in want.items():
        err = abs(float(got[k]) - float(w))
        scale = max(abs(float(w)), terms[k], 1e-30)
        assert err <= 1e-4 * scale, f"{what} d{k}: {err:.2e} vs scale {scale:.2e}"


def check_against_dense(name, opts, x, y, hp, **engine):
    v, (dx, dy, dh) = tiled_value_and_grads(name, opts, x, y, hp, **engine)
    vr, (dxr, dyr, dhr) = oracle(name, opts, x, y, hp)
    assert_close(v, vr, rtol=1e-5, what=f"{name}{opts} value")
    assert_close((dx, dy), (dxr, dyr), rtol=1e-4, what=f"{name}{opts} dx, dy")
    terms = summed_terms(x, y, hp, dxr, dyr, opts.get("valid"), opts.get("ids"))
    assert_hyper_grads_close(dh, dhr, terms, what=f"{name}{opts}")


temperatures = st.floats(min_value=0.01, max_value=10.0).map(lambda t: float(np.float32(t)))


# --- drawn cases ---------------------------------------------------------------------------
#
# "None or any block size" made almost every drawn example a single tile: hypothesis favours
# simple values, and any block of at least the batch is one tile. The strategies below favour
# several tiles with a ragged last one, where tiling, padding and masks can go wrong; each
# property test records what it drew and checks the mix after its run (`assert_mix`), so
# that coverage cannot silently collapse again.

# Tile layouts drawn, by weight: several tiles with a ragged last one (5 in 8), several even
# tiles, one tile, the default block (one tile below 1024 rows).
_LAYOUTS = ("ragged",) * 5 + ("even", "one tile", "default")


def tile_layout(rows: int, block: int | None) -> str:
    """What ``block`` makes of ``rows`` rows: "ragged", "even" (several tiles) or "one tile"."""
    t = choose_tiling(rows, block)
    if t.count == 1:
        return "one tile"
    return "ragged" if t.ragged else "even"


@st.composite
def block_sizes(draw, rows: int) -> int | None:
    """A block size for ``rows`` rows; most draws cut them into 2 to 12 tiles, the last one
    ragged (possible from 3 rows on)."""
    layouts = _LAYOUTS if rows >= 3 else tuple(k for k in _LAYOUTS if k != "ragged")
    layout = draw(st.sampled_from(layouts))
    if layout == "ragged":
        block = -(-rows // draw(st.integers(2, 12)))
        while rows % block == 0:  # rows - 1 never divides rows >= 3: this ends below rows
            block += 1
        return block
    if layout == "even":
        divisors = [k for k in range(1, rows) if rows % k == 0 and rows // k <= 16]
        return draw(st.sampled_from(divisors)) if divisors else rows
    if layout == "one tile":
        return draw(st.integers(rows, rows + 32))
    return None


def options(name: str, *, sigma: bool = True):
    """One of the loss's option sets (see ``OPTIONS``)."""
    opts = [o for o in OPTIONS[name] if sigma or "sigma" not in o]
    return st.sampled_from(opts)


def record(drawn: list, rows: int, block: int | None, **features) -> None:
    """Note one drawn example's tile layout and other features, in ``drawn`` and in
    hypothesis' statistics (``pytest --hypothesis-show-statistics``)."""
    layout = tile_layout(rows, block)
    features = {"layout": layout, "tiles": "one" if layout == "one tile" else "several", **features}
    drawn.append(features)
    event(" ".join(f"{k}={v}" for k, v in features.items()))


def assert_mix(drawn: list[dict], **at_least: tuple[object, float]) -> None:
    """Each ``feature=(value, share)``: at least that share of the drawn examples has it.

    Ask for well under what the strategies draw (a ragged layout: 5 draws in 8): under the
    CI profile the examples are fixed, and a random run (the local profile) should miss the
    share with odds of about one in a thousand or less.
    """
    assert drawn, "no example ran"
    for feature, (value, share) in at_least.items():
        counts = Counter(d[feature] for d in drawn)
        got = counts[value] / len(drawn)
        assert got >= share, (
            f"only {got:.0%} of {len(drawn)} drawn examples have {feature}={value!r} "
            f"(want >= {share:.0%}): {dict(counts)}"
        )
