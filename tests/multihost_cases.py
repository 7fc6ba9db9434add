"""Inputs and loss options shared by the two-process test and its single-process twin."""

import numpy as np

CASES = {
    "infonce": ("infonce", {"temperature": 0.1}),
    "ntxent": ("infonce", {"temperature": 0.2, "intra_view": True, "block_size": 3}),
    "sigmoid": ("sigmoid", {"temperature": 0.1, "bias": -2.0}),
    "dclw": ("decoupled", {"temperature": 0.1, "sigma": 0.5}),
}


def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = (x + 0.5 * rng.standard_normal((32, 16))).astype(np.float32)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    return norm(x), norm(y)
