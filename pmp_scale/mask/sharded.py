"""ShardedMask: this rank's mask bits, aligned with its ZeRO-3 partitions, 1 bit per element.

ZeRO-3 lays each rank's partitions out as consecutive *sub-groups*; each sub-group is the
concatenation of its parameters' padded partitions (P = ceil(numel/W) elements, rank r owning
flat elements [r·P, (r+1)·P) of the parameter). The fp32 master (one flat tensor per
sub-group, `ds_internals.fp32_master`) and the gradient buffer use this layout, so one packed
bit-vector per sub-group is the whole mask shard: it can be applied to a sub-group with one
unpack and one elementwise op. Padding bits are always 0 (never selected, never counted).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ds_internals
from ..errors import UserError
from .artifact import merge_rank_slices
from .bits import pack_bits, unpack_bits, popcount
from .select import LocalSlice


class MaskLayoutError(UserError, ValueError):
    """A mask that does not fit this model / world size / partition layout."""


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


class ShardedMask:
    """Packed mask bits of this rank, one uint8 vector per ZeRO-3 sub-group."""

    def __init__(self, layout: PartitionLayout, bits: list[torch.Tensor]):
        self.layout = layout
        self.bits = bits

    @classmethod
    def from_param_masks(cls, layout: PartitionLayout, masks: list[torch.Tensor],
                         device: torch.device | str = "cpu") -> "ShardedMask":
        """`masks[i]`: bool tensor of entry i's real local elements (length slice.length)."""
        flats = [torch.zeros(n, dtype=torch.bool, device=device) for n in layout.sub_group_sizes]
        for entry, m in zip(layout.entries, masks):
            if m.numel() != entry.slice.length:
                raise MaskLayoutError(f"mask for {entry.name} has {m.numel()} local elements, "
                                      f"expected {entry.slice.length}")
            flats[entry.sub_group][entry.offset:entry.offset + entry.slice.length] = m
        return cls(layout, [pack_bits(f) for f in flats])  # one sub-group unpacked at a time

    @classmethod
    def full(cls, layout: PartitionLayout, device="cpu") -> "ShardedMask":
        return cls.from_param_masks(
            layout, [torch.ones(e.slice.length, dtype=torch.bool) for e in layout.entries], device)

    def sub_group(self, i: int) -> torch.Tensor:
        """Unpacked bool mask of sub-group i (transient: the resident form stays packed)."""
        return unpack_bits(self.bits[i], self.layout.sub_group_sizes[i])

    def sub_group_slice(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Unpacked bool mask of elements [start, stop) of sub-group i (start a multiple of 8):
        the hooks work chunk by chunk, so the transient stays small whatever the sub-group size."""
        return unpack_bits(self.bits[i][start // 8:(stop + 7) // 8], stop - start)

    def param_masks(self) -> list[torch.Tensor]:
        """Bool masks of every entry's real local elements (for saving / export)."""
        out: list[torch.Tensor | None] = [None] * len(self.layout.entries)
        for g in range(len(self.bits)):
            flat = self.sub_group(g).cpu()
            for i, e in enumerate(self.layout.entries):
                if e.sub_group == g:
                    out[i] = flat[e.offset:e.offset + e.slice.length].clone()
        return out

    def to(self, device) -> "ShardedMask":
        return ShardedMask(self.layout, [b.to(device) for b in self.bits])

    def local_selected(self) -> int:
        return sum(popcount(b) for b in self.bits)

    def resident_bytes(self) -> int:
        return sum(b.numel() for b in self.bits)

    # --- checkpointing: per-parameter packed bits, independent of the sub-group split ----------
    def state_dict(self) -> dict:
        return {"signature": [tuple(row) for row in self.layout.signature()],
                "world_size": self.layout.world_size, "rank": self.layout.rank,
                "bits": {e.name: pack_bits(m) for e, m in zip(self.layout.entries,
                                                               self.param_masks())}}

    @classmethod
    def from_state_dict(cls, layout: PartitionLayout, state: dict, device="cpu") -> "ShardedMask":
        if state["world_size"] != layout.world_size:
            raise MaskLayoutError(
                f"mask shard was written at world size {state['world_size']}, this run has "
                f"{layout.world_size} (elastic resume is not supported for masks yet)")
        if state["rank"] != layout.rank or [tuple(s) for s in state["signature"]] != \
                layout.signature():
            raise MaskLayoutError("mask shard does not match this model's ZeRO-3 partition "
                                  "layout (different model, parameter order or sub-group size)")
        masks = [unpack_bits(state["bits"][e.name], e.slice.length) for e in layout.entries]
        return cls.from_param_masks(layout, masks, device)


class SavedShards:
    """Every rank's saved PMP state of a run, joined back per parameter through the ranks' layout
    signatures: the one place a mask (and θ(0)) saved at one world size is re-assembled, for
    elastic resume (re-cut to the new layout) and for export (kept whole)."""

    def __init__(self, states: list[dict]):
        """states[r]: rank r's {"mask": ShardedMask.state_dict(), "theta0": sub-groups or None}."""
        self.states = states
        self.where = [read_signature(s["mask"]["signature"]) for s in states]

    @property
    def names(self) -> list[str]:
        """Parameter names in the canonical order."""
        return list(self.where[0])

    @property
    def has_theta0(self) -> bool:
        return all(s.get("theta0") is not None for s in self.states)

    def packed_mask(self, name: str) -> torch.Tensor:
        """The whole parameter's packed mask."""
        return merge_rank_slices([s["mask"]["bits"][name] for s in self.states],
                                 [w[name].length for w in self.where])

    def theta0(self, name: str) -> torch.Tensor:
        """The whole parameter's θ(0), flat, from each rank's sub-group snapshot."""
        pieces = []
        for state, where in zip(self.states, self.where):
            row = where[name]
            pieces.append(state["theta0"][row.sub_group][row.offset:row.offset + row.length])
        return torch.cat(pieces)
