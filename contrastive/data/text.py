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
DEFAULT_VOCAB, DEFAULT_TEXT_LEN = 8192, 32  # hashed-word captions (coco_captions, own pairs)


class HashTokenizer:
    """Lower-case, split on non-alphanumerics, map each word to ``3 + crc32(word) % (V - 3)``.

    crc32 rather than ``hash()``: Python's string hash is salted per process, and ids must
    be the same on every host and in every run.
    """

    def __init__(self, vocab_size: int = DEFAULT_VOCAB, max_len: int = DEFAULT_TEXT_LEN):
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


def text_shape(
    vocab_size: int | None,
    text_len: int | None,
    data_vocab: int | None,
    data_len: int | None,
) -> tuple[int, int]:
    """(vocabulary size, caption length) of a run: the flags' (``vocab_size``, ``text_len``),
    else the data set's own tokens' (``data_vocab``, ``data_len``), else hashed words'.

    ValueError (one line, naming the flag) when the flags contradict the data set's tokens.
    """
    vocab = vocab_size or data_vocab or DEFAULT_VOCAB
    length = text_len or data_len or DEFAULT_TEXT_LEN
    if data_vocab is not None and vocab < data_vocab:
        raise ValueError(
            f"--vocab-size {vocab} is smaller than the {data_vocab} token ids of the data "
            "set: drop the flag"
        )
    if data_len is not None and length != data_len:
        raise ValueError(
            f"--text-len {length} differs from the data set's captions of {data_len} "
            "tokens: drop the flag"
        )
    return vocab, length


def run_tokenizer(vocab_size: int | None, text_len: int | None, kind: str) -> HashTokenizer:
    """The caption tokenizer of a run on a data set of ``kind`` whose captions are strings:
    the flags' vocabulary and length (hashed words' defaults otherwise)."""
    if kind != "image_text":
        return HashTokenizer()
    return HashTokenizer(vocab_size or DEFAULT_VOCAB, text_len or DEFAULT_TEXT_LEN)
