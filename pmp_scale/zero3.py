"""Writing the ZeRO-3 fp32 master and propagating it to the training partitions.

θ(0) is defined once, in fp32, and written straight into the optimizer's fp32 master partitions
(`fp32_partitioned_groups_flat`); the bf16/fp16/fp32 training partitions are derived from it.
Writing it into the low-precision model first (as DeepSpeed would, building the master from
the model) rounds θ(0) to bf16 in a bf16 run: its frozen complement would then carry 16 zero
mantissa bits in an fp32 release while every trained element does not — the whole mask.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .mask.sharded import PartitionLayout
from .models import is_constant, seeded_init


@torch.no_grad()
def master_to_params(engine) -> None:
    """Copy every fp32 master sub-group into the training partitions (and gathered copies)."""
    zero = engine.optimizer
    for g in range(len(zero.fp32_partitioned_groups_flat)):
        zero._reassign_or_swap_out_partitioned_parameters(g)  # fp32 master -> lp partition
    # Persistent (small) parameters stay gathered between steps and all_gather skips
    # gathered ones: release everything first, or they would keep their old values.
    zero._partition_all_parameters()
    if zero.persistent_parameters:
        zero.persistent_parameters[0].all_gather(zero.persistent_parameters)


@torch.no_grad()
def write_master(engine, layout: PartitionLayout, values: Iterable[tuple[str, torch.Tensor]]) -> None:
    """(name, full tensor) pairs -> this rank's slice of each in the fp32 master."""
    where = {e.name: e for e in layout.entries}
    master = engine.optimizer.fp32_partitioned_groups_flat
    for name, full in values:
        e = where[name]
        piece = full.reshape(-1)[e.slice.start:e.slice.start + e.slice.length]
        master[e.sub_group][e.offset:e.offset + e.slice.length].copy_(piece)


def init_master(engine, seed: int) -> list[str]:
    """θ(0) from `seed`, in fp32, into the master and the training partitions; returns the
    names of constant-initialised parameters (norm weights, biases)."""
    layout = PartitionLayout.from_engine(engine)
    device = engine.optimizer.fp32_partitioned_groups_flat[0].device
    constant: list[str] = []

    def values():
        for name, value in seeded_init(engine.module, seed, device=device):
            if is_constant(value):
                constant.append(name)
            yield name, value
    write_master(engine, layout, values())
    master_to_params(engine)
    return constant
