"""Element-wise work on big tensors, a chunk of CHUNK elements at a time.

One chunk size for the whole package: every per-element temporary stays a few tens of MiB
whatever the tensor's size (an int64 one, the largest: 32 MiB), in the release scans and
attacks, the masked update's hooks and the licensee kit's restore. Results never depend on it;
tests shrink it (monkeypatch `CHUNK`) so that chunk boundaries fall inside small tensors.
"""
from __future__ import annotations

from collections.abc import Iterator

CHUNK = 1 << 22  # a multiple of 8: chunks of a packed mask start on a byte


def spans(numel: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of `numel` elements."""
    size = CHUNK
    for start in range(0, numel, size):
        yield start, min(numel, start + size)


def chunks(flat) -> Iterator[tuple[int, object]]:
    """(start, view) over a 1-D tensor, one chunk at a time."""
    for start, stop in spans(flat.numel()):
        yield start, flat[start:stop]
