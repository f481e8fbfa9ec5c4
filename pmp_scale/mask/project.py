"""`complement: project`: the authors' Stage II, on ZeRO-3 partitions.

Weight decay applies to every element (no snapshot/restore hook, as in `decay`), complement
gradients are zeroed (H1), and every `project_every` Stage II steps the complement of the fp32
master is scaled so that its global L2 norm is at most the radius (`project_radius`, absolute,
or relative to the complement's norm at the first projection: `radius_from`). The norm is global
over all ranks: each rank all-reduces the square-sum of its own complement elements (ZeRO-3
padding excluded); the complement itself is never gathered. The low-precision partitions (and
the persistent, always-gathered small parameters) are then re-derived from the master.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ds_internals
from .sharded import ShardedMask


@torch.no_grad()
def complement_norm(engine, mask: ShardedMask, device) -> float:
    """Global L2 norm of the complement of the fp32 master (float64 sums, over all ranks)."""
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for g, flat in enumerate(ds_internals.fp32_master(engine)):
        comp = _complement(mask, g, flat.device)
        sq += flat[comp].double().square().sum().to(device)
    dist.all_reduce(sq)
    return float(sq.sqrt().item())


def _complement(mask: ShardedMask, g: int, device) -> torch.Tensor:
    return ~mask.sub_group(g).to(device) & mask.layout.real_elements(g).to(device)


@torch.no_grad()
def project_complement(engine, mask: ShardedMask, radius: float, device) -> dict:
    """Scale the complement so that its global norm is ≤ `radius`; returns the norm before and
    the factor applied (1.0: nothing to do, the weights are untouched)."""
    norm = complement_norm(engine, mask, device)
    scale = radius / norm if norm > radius else 1.0
    if scale < 1.0:
        for g, flat in enumerate(ds_internals.fp32_master(engine)):
            comp = _complement(mask, g, flat.device)
            flat[comp] = flat[comp] * scale
        ds_internals.master_to_params(engine)
    return {"norm": norm, "scale": scale}


def radius_from(cfg, first_norm: float) -> float:
    """The absolute radius of a run: `project_radius` itself (mode absolute), or that fraction
    of the complement's global norm at the first projection (mode relative: the same shrink at
    every model size)."""
    if cfg.project_radius_mode == "absolute":
        return cfg.project_radius
    return cfg.project_radius * first_norm
