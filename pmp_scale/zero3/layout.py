"""Where this rank's slice of every parameter lives in its ZeRO-3 partitions.

ZeRO-3 flattens each parameter, pads it to W·P with P = ceil(numel/W) and gives rank r the flat
elements [r·P, (r+1)·P) (LocalSlice); a rank's partitions are laid out as consecutive optimizer
*sub-groups*, each the concatenation of its parameters' padded partitions (PartitionLayout).
The fp32 master, the gradient buffer and everything aligned with them (θ(0), the PMP mask) use
this layout. Part of the ZeRO-3 core: the mask code builds on it, never the other way round.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ds_internals


@dataclass(frozen=True)
class LocalSlice:
    """This rank's piece of one parameter (canonical parameter order is identical on all ranks)."""
    index: int    # parameter's position in the canonical order
    numel: int    # full parameter numel
    start: int    # first flat element of the parameter this rank holds (r*P)
    length: int   # real (non-padding) elements held by this rank: max(0, min(P, numel - r*P))

    @staticmethod
    def for_rank(index: int, numel: int, rank: int, world_size: int) -> "LocalSlice":
        """ZeRO-3 rule: flatten, pad to W*P with P = ceil(numel/W), rank r owns [r*P, (r+1)*P)."""
        per_rank = -(-numel // world_size)
        start = rank * per_rank
        return LocalSlice(index, numel, start, max(0, min(per_rank, numel - start)))



@dataclass(frozen=True)
class ParamEntry:
    name: str          # HF parameter name (canonical order = model.named_parameters())
    shape: tuple[int, ...]
    slice: LocalSlice  # this rank's real elements of the parameter
    sub_group: int     # ZeRO-3 sub-group holding its partition
    offset: int        # first element of its partition inside the sub-group's flat tensor
    partition: int     # P: padded partition length


class SliceLocation(NamedTuple):
    """One row of a rank's layout signature: where its slice of one parameter lives. Checkpoints
    store plain tuples (ShardedMask.state_dict), so they load without this class."""
    name: str
    numel: int      # elements of the whole parameter
    start: int      # first element of this rank's slice in the flattened parameter
    length: int     # real (non-padding) elements of the slice
    sub_group: int  # ZeRO-3 sub-group holding it
    offset: int     # first element of the slice inside the sub-group's flat tensor


def read_signature(rows) -> dict[str, SliceLocation]:
    """A saved signature (plain tuples) by parameter name, in the canonical order."""
    return {row.name: row for row in map(SliceLocation._make, rows)}


class PartitionLayout:
    """Where every parameter's local slice lives in this rank's flat sub-groups."""

    def __init__(self, entries: list[ParamEntry], sub_group_sizes: list[int],
                 rank: int, world_size: int):
        self.entries = entries
        self.sub_group_sizes = sub_group_sizes
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_engine(cls, engine) -> "PartitionLayout":
        import torch.distributed as dist
        names = {id(p): n for n, p in engine.module.named_parameters()}
        order = {n: i for i, n in enumerate(names.values())}
        rank, world = dist.get_rank(), dist.get_world_size()
        entries, sizes = [], []
        for group_id, params in enumerate(ds_internals.sub_group_params(engine)):
            offset = 0
            for p in params:
                P = ds_internals.partition_numel(p)
                name = names[id(p)]
                entries.append(ParamEntry(
                    name=name, shape=ds_internals.full_shape(p),
                    slice=LocalSlice.for_rank(order[name], ds_internals.full_numel(p), rank, world),
                    sub_group=group_id, offset=offset, partition=P))
                offset += P
            sizes.append(offset)
        entries.sort(key=lambda e: e.slice.index)
        return cls(entries, sizes, rank, world)

    def real_elements(self, group: int) -> torch.Tensor:
        """Bool per element of sub-group `group`: True except ZeRO-3 padding."""
        real = torch.zeros(self.sub_group_sizes[group], dtype=torch.bool)
        for e in self.entries:
            if e.sub_group == group:
                real[e.offset:e.offset + e.slice.length] = True
        return real

    def signature(self) -> list[SliceLocation]:
        """What a saved mask shard must match to be loaded here."""
        return [SliceLocation(e.name, e.slice.numel, e.slice.start, e.slice.length, e.sub_group,
                              e.offset) for e in self.entries]

    def select(self, patterns: list[str]) -> list[bool]:
        """Per entry: does its name match one of the fnmatch `patterns`?"""
        return [any(fnmatch.fnmatchcase(e.name, pat) for pat in patterns) for e in self.entries]
