"""ShardedMask: this rank's mask bits, aligned with its ZeRO-3 partitions, 1 bit per element.

ZeRO-3 lays each rank's partitions out as consecutive *sub-groups*; each sub-group is the
concatenation of its parameters' padded partitions (P = ceil(numel/W) elements, rank r owning
flat elements [r·P, (r+1)·P) of the parameter). The fp32 master (one flat tensor per
sub-group, `ds_internals.fp32_master`) and the gradient buffer use this layout, so one packed
bit-vector per sub-group is the whole mask shard: it can be applied to a sub-group with one
unpack and one elementwise op. Padding bits are always 0 (never selected, never counted).
The layout itself (PartitionLayout) is the ZeRO-3 core's: pmp_scale/zero3/layout.py.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..zero3.layout import PartitionLayout, read_signature
from .artifact import merge_rank_slices
from .bits import pack_bits, unpack_bits, popcount


class MaskLayoutError(UserError, ValueError):
    """A mask that does not fit this model / world size / partition layout."""


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
