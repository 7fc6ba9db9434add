"""A vocabulary-free tokenizer for captions: words hashed into a fixed number of ids.

Good enough for small image-text runs and for tests; real CLIP runs plug in a trained
tokenizer with the same call signature (``str -> int32[max_len]``).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

PAD, BOS, EOS = 0, 1, 2
_RESERVED = 3
_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    """Lower-case, split on non-alphanumerics, map each word to ``3 + crc32(word) % (V - 3)``.

    crc32 rather than ``hash()``: Python's string hash is salted per process, and ids must
    be the same on every host and in every run.
    """

    def __init__(self, vocab_size: int = 8192, max_len: int = 32):
        if vocab_size <= _RESERVED:
            raise ValueError(f"vocab_size must exceed {_RESERVED}, got {vocab_size}")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (BOS and EOS), got {max_len}")
        self.vocab_size = vocab_size
        self.max_len = max_len

    def __call__(self, text: str | bytes) -> np.ndarray:
        """``text -> int32[max_len]``: BOS, word ids (truncated), EOS, then PAD."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        words = _WORD.findall(text.lower())[: self.max_len - 2]
        ids = [BOS]
        ids += [_RESERVED + zlib.crc32(w.encode()) % (self.vocab_size - _RESERVED) for w in words]
        ids.append(EOS)
        out = np.full((self.max_len,), PAD, np.int32)
        out[: len(ids)] = ids
        return out
