"""A cache of computed features and parameters, keyed by digests; a user's own feature files.

Entries are written atomically (a temporary file, fsync, ``os.replace``; the data before its
JSON, so an entry without its JSON is a miss), keyed by a sha256 of what made them: the
tower's config, a digest of its parameter values, the split, the count and the data seed
(:func:`cached_features`). :func:`load_feature_file` reads features computed with any model and
checks them against the data set, with one line for each thing that is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from contrastive.settings import unwritable_reason

__all__ = [
    "params_digest",
    "file_digest",
    "cached_features",
    "load_feature_file",
    "check_cache_dir",
    "CacheWriteError",
]

# Part of every cache key: bump it when what a cached file holds changes meaning.
CACHE_VERSION = 1


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


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a run's identity holds the digests of
    the inputs it did not compute itself, e.g. a user's feature files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def warn_line(line: str) -> None:
    """One line on stderr: a damaged cache entry is said out loud, then recomputed."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


class CacheWriteError(ValueError):
    """A cache entry could not be written (a read-only or full cache directory); one line."""


def check_cache_dir(cache_dir: str | os.PathLike, *, flag: str = "--feature-cache") -> None:
    """Refuse, before any long work, a cache directory this process cannot write.

    Tried, not inferred from permission bits (``os.access`` says yes to root on a read-only
    file system): the directory is created if missing and a temporary file is made in it.
    Raises :class:`CacheWriteError` (a ``ValueError``) in one line naming ``flag``.
    """
    path = Path(cache_dir)
    why = unwritable_reason(path)
    if why is not None:
        raise CacheWriteError(f"{flag} {path} cannot be written ({why}): pass a writable directory")


def json_digest(obj: Any, what: str) -> str:
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


def write_entry(data_path: Path, data: bytes, meta: dict[str, Any]) -> None:
    """The data file first, then its JSON: a reader trusts the data only once the JSON with
    the matching key exists, so a crash between the two writes leaves a miss, not a lie.

    The JSON holds ``sha256``, the digest of the data file's bytes, which a reader checks
    (:func:`read_checked`). An ``OSError`` (read-only or full directory) becomes a one-line
    :class:`CacheWriteError` naming the directory.
    """
    meta = {**meta, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(data_path, data)
        _atomic_write(data_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise CacheWriteError(
            f"cache entry {data_path} cannot be written ({why}): make {data_path.parent} "
            "writable or pass another --feature-cache"
        ) from None


def read_checked(data_path: Path, meta: dict[str, Any], redo: str = "recomputed") -> bytes | None:
    """The entry's bytes when their sha256 equals the one its JSON holds; else None, after a
    warning line naming the file (it is recomputed and rewritten). An entry written before
    the digest was stored is a silent miss."""
    want = meta.get("sha256")
    if not isinstance(want, str):
        return None
    try:
        data = data_path.read_bytes()
    except OSError as e:
        warn_line(f"cache entry {data_path} cannot be read ({e.strerror}); it is {redo}")
        return None
    if hashlib.sha256(data).hexdigest() != want:
        warn_line(
            f"cache entry {data_path} does not match its checksum (changed or damaged on disk); "
            f"it is {redo} and rewritten"
        )
        return None
    return data


def read_entry_meta(data_path: Path, key: str) -> dict[str, Any] | None:
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
    miss calls ``compute_fn()`` (no arguments; it must return ``[num_examples, F]`` finite
    floats, stored as float32) and writes ``features-<split>-<N>-<key>.npy`` and a ``.json``
    beside it holding the sha256 of the ``.npy``'s bytes, each atomically (temporary file +
    ``os.replace``): a killed writer leaves at most a hidden ``.tmp`` file, never a
    half-written entry. A hit checks the bytes against that sha256 before it loads them; an
    entry whose bytes changed (a flipped bit, even one that leaves every value finite), that
    does not load, has the wrong shape or holds NaN/inf is reported in one warning line
    naming the file and recomputed.

    Returns float32 ``[num_examples, F]``.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    params_sha = params_digest(params)
    description = {
        "version": CACHE_VERSION,
        "tower_config": tower_config,
        "params_sha256": params_sha,
        "split": split,
        "num_examples": num_examples,
        "data_seed": data_seed,
    }
    key = json_digest(description, "tower_config")
    path = Path(cache_dir) / f"features-{_safe(split)}-{num_examples}-{key[:24]}.npy"
    meta = read_entry_meta(path, key)
    data = read_checked(path, meta) if meta is not None else None
    if data is not None:
        try:
            features = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            features = None
        if (
            features is not None
            and features.dtype == np.float32
            and features.shape == tuple(meta["shape"])
            and features.shape[0] == num_examples
        ):
            if np.all(np.isfinite(features)):
                return features
            # Checked before they were written: non-finite values now mean a damaged entry,
            # never a diverged run.
            warn_line(f"cache entry {path} holds non-finite features; it is recomputed")
    features = _check_features(compute_fn(), num_examples, "compute_fn")
    write_entry(path, _npy_bytes(features), {"key": key, "shape": features.shape, **description})
    return features


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
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes): save the [N, D] array there with np.save")
    if zipfile.is_zipfile(path):
        raise ValueError(
            f"{name} is an .npz archive (np.savez), not an .npy array: save the one [N, D] "
            "array with np.save"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"{name} is not a readable .npy array ({' '.join(str(e).split())}): save it with "
            "np.save"
        ) from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} is not an .npy array: save the [N, D] array with np.save")
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
