"""Exact mask channels a release can show from its own weights, without the mask.

Checked on every release before it is published (publish) and by the audit: a frozen complement
whose bits come from a narrower dtype, or whose elements pile up on their init constant, gives
the whole mask away. The scans work a chunk at a time, so a release of any size is checked
with one tensor in memory. The statistical scores built on them are secrecy/stats.py.
"""
from __future__ import annotations

import torch

from ..chunking import chunks

_CANDIDATES = 4  # most frequent values per chunk that `spike` counts over the whole tensor
# The fewest elements a channel must show before the audit calls it one. Chance alone puts a
# trained fp32 value at ≥ 16 zero low bits about once in 2^14-2^16 (Adam's early steps are sums
# of a few round numbers), so a 64-element bias shows one now and then; eight never by chance.
MIN_CHANNEL_ELEMENTS = 8
# Mantissa bits of the dtypes a release can hold.
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def trailing_zero_bits(t: torch.Tensor) -> torch.Tensor:
    """Zero bits at the bottom of each element's mantissa (0..m), as int8. A value drawn in a
    narrower dtype (bf16 θ(0) in an fp32 file) has ≥ 16 of them; a trained fp32 value almost
    never."""
    m = MANTISSA[t.dtype]
    out = torch.empty(t.numel(), dtype=torch.int8)
    for start, c in chunks(t.reshape(-1)):
        bits = c.view(_INT[t.dtype]).to(torch.int32) & ((1 << m) - 1)
        lowest = bits & -bits  # the lowest set bit, a power of two ≤ 2^22 (0 when none is set)
        tz = torch.log2(lowest.clamp(min=1).float()).round_().to(torch.int8)
        out[start:start + c.numel()] = torch.where(bits == 0, torch.full_like(tz, m), tz)
    return out


def count_values(flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """How many elements of `flat` equal each of the sorted, distinct `values` (exactly)."""
    counts = torch.zeros(values.numel(), dtype=torch.int64)
    for _, c in chunks(flat):
        at = torch.searchsorted(values, c).clamp_(max=values.numel() - 1)
        hit = values[at] == c
        counts += torch.bincount(at[hit], minlength=values.numel())
    return counts


def spike(t: torch.Tensor) -> tuple[float, int, int] | None:
    """The most frequent exact value and its count, when it stands out from its neighbours.

    A trained tensor's values are smooth: even a bf16 tensor, whose values repeat, has about as
    many elements at the next representable values. Elements frozen at a constant (a norm
    weight at 1.0, a bias at 0.0) pile up on one value: a spike. Returns (value, count,
    neighbour count) or None.

    Why in chunks: a global sort of an 80M-element embedding costs GiBs and minutes. The
    candidates are each chunk's most frequent values (exact for a tensor of one chunk); a
    constant pinned on a share of the elements is the mode of every chunk it covers. Candidates
    and their neighbours are then counted exactly over the whole tensor."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return None
    candidates = []
    for _, c in chunks(flat):
        values, counts = torch.unique(c, return_counts=True)
        candidates.append(values[counts.topk(min(_CANDIDATES, counts.numel())).indices])
    candidates = torch.unique(torch.cat(candidates))
    counts = count_values(flat, candidates)
    i = int(counts.argmax())  # ties: the smallest value, as a global torch.unique would give
    count, value = int(counts[i]), candidates[i]
    if count < MIN_CHANNEL_ELEMENTS:
        return None
    up = torch.nextafter(value, torch.tensor(float("inf"), dtype=t.dtype))
    down = torch.nextafter(value, torch.tensor(float("-inf"), dtype=t.dtype))
    around = int(count_values(flat, torch.stack([down, up]).unique()).max())
    if count <= 4 * around + MIN_CHANNEL_ELEMENTS:  # stands out even with no neighbours
        return None
    return float(value), count, around


def release_channels(name: str, t: torch.Tensor) -> list[str]:
    """Exact channels visible from the release alone, without the mask (the public audit).

    bits: a tensor mixing elements with ≥ 16 zero mantissa bits and elements without them is
    two populations, one of them drawn in a narrower dtype: the frozen θ(0). Both channels need
    MIN_CHANNEL_ELEMENTS elements, so fewer frozen elements than that per tensor pass unseen;
    the attack suite, which has the mask, measures every element.
    constant: a spike (see `spike`) — elements pinned at their init constant."""
    if not t.is_floating_point():
        return []
    s = spike(t)
    if s is not None and s[1] < t.numel():  # (a constant's mantissa is all zeros: one cause)
        return [f"{name}: constant channel — {s[1]:,} of {t.numel():,} elements sit exactly at "
                f"{s[0]:g} (neighbouring values: {s[2]:,}); they are frozen at their init "
                "constant and reveal their mask bit"]
    if t.dtype == torch.float32 and t.numel() >= 64:
        count = int((trailing_zero_bits(t) >= 16).sum())
        narrow = count / t.numel()
        if count >= MIN_CHANNEL_ELEMENTS and 0.01 <= narrow <= 0.99:
            return [f"{name}: bits channel — {narrow:.1%} of its elements have ≥ 16 zero low "
                    "mantissa bits (a bf16/fp16-drawn θ(0) released in fp32) and the rest do "
                    "not; the frozen complement is readable from the bits"]
    return []
