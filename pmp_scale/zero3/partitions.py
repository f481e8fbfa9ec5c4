"""Seeded θ(0) into ZeRO-3 partitions: the fp32 master (pre-training) or the model's own
partitions before the optimizer exists (fine-tuning's fresh heads and from-scratch models).

θ(0) is defined once, in fp32, and written straight into the optimizer's fp32 master partitions
(`ds_internals.fp32_master`); the bf16/fp16/fp32 training partitions are derived from it.
Writing it into the low-precision model first (as DeepSpeed would, building the master from
the model) rounds θ(0) to bf16 in a bf16 run: its frozen complement would then carry 16 zero
mantissa bits in an fp32 release while every trained element does not — the whole mask.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..ds_internals import fp32_master, full_numel, local_partition, master_to_params
from .layout import LocalSlice, PartitionLayout


@torch.no_grad()
def write_master(engine, layout: PartitionLayout, values: Iterable[tuple[str, torch.Tensor]]) -> None:
    """(name, full tensor) pairs -> this rank's slice of each in the fp32 master."""
    where = {e.name: e for e in layout.entries}
    master = fp32_master(engine)
    for name, full in values:
        e = where[name]
        piece = full.reshape(-1)[e.slice.start:e.slice.start + e.slice.length]
        master[e.sub_group][e.offset:e.offset + e.slice.length].copy_(piece)


def init_master(engine, seed: int) -> list[str]:
    """θ(0) from `seed`, in fp32, into the master and the training partitions; returns the
    names of constant-initialised parameters (norm weights, biases)."""
    from ..models import is_constant, seeded_init  # transformers: only where a model is built
    layout = PartitionLayout.from_engine(engine)
    device = fp32_master(engine)[0].device
    constant: list[str] = []

    def values():
        for name, value in seeded_init(engine.module, seed, device=device):
            if is_constant(value):
                constant.append(name)
            yield name, value
    write_master(engine, layout, values())
    master_to_params(engine)
    return constant


@torch.no_grad()
def init_partitioned(model: torch.nn.Module, seed: int, only: set[str] | None = None) -> None:
    """θ(0) from `seed` into each rank's ZeRO-3 partitions (`ds_tensor`, in the model dtype), for
    every parameter or those named in `only`: for models whose optimizer state is built
    afterwards from these values (fine-tuning)."""
    from ..models import seeded_init
    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank()
    device = local_partition(next(iter(params.values()))).device
    for name, value in seeded_init(model, seed, device=device, only=only):
        local = local_partition(params[name])
        start = local.numel() * rank  # ZeRO-3: rank r owns [r·P, (r+1)·P), P = ds_tensor.numel()
        flat = value.reshape(-1)[start:start + local.numel()]
        local.data[:flat.numel()].copy_(flat.to(local.dtype))


def local_elements(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's real (unpadded) elements of a ZeRO-3 parameter, flat, on the host."""
    s = LocalSlice.for_rank(0, full_numel(p), dist.get_rank(), dist.get_world_size())
    return local_partition(p).detach().reshape(-1)[:s.length].cpu()


def rank_slice(full: torch.Tensor) -> torch.Tensor:
    """The elements of a full tensor that this rank's partition holds, flat."""
    s = LocalSlice.for_rank(0, full.numel(), dist.get_rank(), dist.get_world_size())
    return full.reshape(-1)[s.start:s.start + s.length]
