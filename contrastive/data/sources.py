"""Random-access sources built from others (what grain's ``MapDataset`` reads by index)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Subrange"]


class Subrange:
    """Examples ``[start, stop)`` of a random-access source, as a source of their own."""

    def __init__(self, source: Sequence, start: int, stop: int):
        if not 0 <= start <= stop <= len(source):
            raise ValueError(
                f"examples [{start}, {stop}) do not fit a split of {len(source)} examples"
            )
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self.source[self.start + int(index)]
