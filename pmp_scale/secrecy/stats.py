"""Per-element scores that need nothing but the released weights (data-free channels).

Every score is oriented the same way: higher = more likely *trained* (in the mask M), lower =
more likely frozen at θ(0). Each function sees one tensor at a time, so the suite streams a
release of any size with one tensor in memory. The exact channels (bits, constants) the release
path itself refuses are release/channels.py.
"""
from __future__ import annotations

import torch

from ..chunking import chunks
from ..release.channels import spike, trailing_zero_bits


def bits_score(t: torch.Tensor) -> torch.Tensor:
    return trailing_zero_bits(t).float().neg_()


def spike_value(t: torch.Tensor) -> float | None:
    s = spike(t)
    return None if s is None else s[0]


def constant_score(t: torch.Tensor) -> torch.Tensor:
    """-1 on elements sitting at a spiking value (see `spike`), 0 elsewhere."""
    return at_value_score(t, spike_value(t))


def at_value_score(t: torch.Tensor, value: float | None) -> torch.Tensor:
    """-1 on elements equal to `value` (none when None), 0 elsewhere. Apart from
    `constant_score` so that a caller holding the spike's value skips its exact counts, most of
    the cost: an attack streams its scores twice (scoring, then the predicted mask)."""
    out = torch.zeros(t.numel())
    if value is not None:
        for start, c in chunks(t.reshape(-1)):
            out[start:start + c.numel()][c == value] = -1.0
    return out


def _z(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        mean, std = x.mean(), x.std() if x.numel() > 1 else torch.tensor(0.0)
    else:
        mean, std = x.mean(dim, keepdim=True), x.std(dim, keepdim=True)
    return (x - mean).div_(std.clamp(min=1e-12))  # one tensor-sized temporary, not three


def magnitude(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).abs().float()


def magnitude_tensor(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its tensor: removes scale differences between tensors."""
    return _z(t.reshape(-1).float(), None).abs_()


def magnitude_row(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its row (an output unit; a token for embeddings)."""
    x = t.float()
    return (_z(x, 1) if x.dim() == 2 and x.shape[1] > 1 else _z(x.reshape(-1), None)).abs_().reshape(-1)


def magnitude_col(t: torch.Tensor) -> torch.Tensor:
    """|w| standardised over its column (an input feature)."""
    x = t.float()
    return (_z(x, 0) if x.dim() == 2 and x.shape[0] > 1 else _z(x.reshape(-1), None)).abs_().reshape(-1)


def init_likelihood(t: torch.Tensor, init_mean: float, init_std: float) -> torch.Tensor:
    """Negative log-likelihood under the init distribution of this tensor (its mean and std from
    replaying the public init with any seed): unlikely values were moved by training."""
    x = t.reshape(-1).float()
    if init_std == 0:  # a constant init: the distance from that constant
        return (x - init_mean).abs_()
    return (x - init_mean).div_(init_std).square_().mul_(0.5)


DATA_FREE = {"bits": bits_score, "constant": constant_score, "magnitude": magnitude,
             "magnitude_tensor": magnitude_tensor, "magnitude_row": magnitude_row,
             "magnitude_col": magnitude_col}
