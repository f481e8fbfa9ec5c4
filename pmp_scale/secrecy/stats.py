"""Per-element scores that need nothing but the released weights (data-free channels).

Every score is oriented the same way: higher = more likely *trained* (in the mask M), lower =
more likely frozen at θ(0). Each function sees one tensor at a time, so the suite streams a
release of any size with one tensor in memory.
"""
from __future__ import annotations

import torch

# Mantissa bits of the dtypes a release can hold.
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def trailing_zero_bits(t: torch.Tensor) -> torch.Tensor:
    """Zero bits at the bottom of each element's mantissa (0..m). A value drawn in a narrower
    dtype (bf16 θ(0) in an fp32 file) has ≥ 16 of them; a trained fp32 value almost never."""
    m = MANTISSA[t.dtype]
    bits = t.reshape(-1).view(_INT[t.dtype]).to(torch.int32) & ((1 << m) - 1)
    lowest = bits & -bits  # the lowest set bit, as a power of two ≤ 2^22 (0 when none is set)
    tz = torch.log2(lowest.clamp(min=1).float()).round_().to(torch.int8)
    return torch.where(bits == 0, torch.full_like(tz, m), tz)


def bits_score(t: torch.Tensor) -> torch.Tensor:
    return -trailing_zero_bits(t).float()


def spike(t: torch.Tensor) -> tuple[float, int, int] | None:
    """The most frequent exact value and its count, when it stands out from its neighbours.

    A trained tensor's values are smooth: even a bf16 tensor, whose values repeat, has about as
    many elements at the next representable values. Elements frozen at a constant (a norm
    weight at 1.0, a bias at 0.0) pile up on one value: a spike. Returns (value, count,
    neighbour count) or None."""
    flat = t.detach().reshape(-1)
    values, counts = torch.unique(flat, return_counts=True)
    i = int(counts.argmax())
    count, value = int(counts[i]), values[i]
    if count < 8:
        return None
    up = torch.nextafter(value, torch.tensor(float("inf"), dtype=t.dtype))
    down = torch.nextafter(value, torch.tensor(float("-inf"), dtype=t.dtype))
    around = max(int((flat == up).sum()), int((flat == down).sum()))
    if count <= 4 * around + 8:
        return None
    return float(value), count, around


def constant_score(t: torch.Tensor) -> torch.Tensor:
    """-1 on elements sitting at a spiking value (see `spike`), 0 elsewhere."""
    s = spike(t)
    out = torch.zeros(t.numel())
    if s is not None:
        out[t.reshape(-1) == s[0]] = -1.0
    return out


def _z(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        mean, std = x.mean(), x.std() if x.numel() > 1 else torch.tensor(0.0)
    else:
        mean, std = x.mean(dim, keepdim=True), x.std(dim, keepdim=True)
    return (x - mean) / std.clamp(min=1e-12)


def magnitude(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).float().abs()


def magnitude_tensor(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its tensor: removes scale differences between tensors."""
    return _z(t.reshape(-1).float(), None).abs()


def magnitude_row(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its row (an output unit; a token for embeddings)."""
    x = t.float()
    return (_z(x, 1) if x.dim() == 2 and x.shape[1] > 1 else _z(x.reshape(-1), None)).abs().reshape(-1)


def magnitude_col(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its column (an input feature)."""
    x = t.float()
    return (_z(x, 0) if x.dim() == 2 and x.shape[0] > 1 else _z(x.reshape(-1), None)).abs().reshape(-1)


def init_likelihood(t: torch.Tensor, init_mean: float, init_std: float) -> torch.Tensor:
    """Negative log-likelihood under the init distribution of this tensor (its mean and std from
    replaying the public init with any seed): unlikely values were moved by training."""
    x = t.reshape(-1).float()
    if init_std == 0:  # a constant init: the distance from that constant
        return (x - init_mean).abs()
    return 0.5 * ((x - init_mean) / init_std) ** 2


DATA_FREE = {"bits": bits_score, "constant": constant_score, "magnitude": magnitude,
             "magnitude_tensor": magnitude_tensor, "magnitude_row": magnitude_row,
             "magnitude_col": magnitude_col}


def release_channels(name: str, t: torch.Tensor) -> list[str]:
    """Exact channels visible from the release alone, without the mask (the public audit).

    bits: a tensor mixing elements with ≥ 16 zero mantissa bits and elements without them is
    two populations, one of them drawn in a narrower dtype: the frozen θ(0).
    constant: a spike (see `spike`) — elements pinned at their init constant."""
    if not t.is_floating_point():
        return []
    s = spike(t)
    if s is not None and s[1] < t.numel():  # (a constant's mantissa is all zeros: one cause)
        return [f"{name}: constant channel — {s[1]:,} of {t.numel():,} elements sit exactly at "
                f"{s[0]:g} (neighbouring values: {s[2]:,}); they are frozen at their init "
                "constant and reveal their mask bit"]
    if t.dtype == torch.float32 and t.numel() >= 64:
        narrow = float((trailing_zero_bits(t) >= 16).float().mean())
        if 0.01 <= narrow <= 0.99:
            return [f"{name}: bits channel — {narrow:.1%} of its elements have ≥ 16 zero low "
                    "mantissa bits (a bf16/fp16-drawn θ(0) released in fp32) and the rest do "
                    "not; the frozen complement is readable from the bits"]
    return []
