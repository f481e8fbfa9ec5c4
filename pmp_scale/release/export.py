"""The private mask out of a checkpoint, and re-sliced for another world size.

A PMP checkpoint holds the mask as per-rank packed ZeRO-3 slices in each rank's client state
(with θ(0) while it cannot be rebuilt); `export_mask` joins them into the world-size-free
artifact (SavedShards does the joining), `reshard_mask` cuts an artifact for any world size,
and `merge_mask_slices` joins such a cut back.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import DESCRIPTOR
from ..ds_internals import client_components
from ..mask.artifact import (MaskArtifactError, merge_rank_slices, read_artifact,
                             slice_for_rank, staged_directory, write_artifact)
from ..mask.bits import pack_bits
from ..mask.sharded import SavedShards
from ..zero3.layout import LocalSlice
from .locate import ReleaseError, rank_files, refuse_non_empty


def merge_mask_slices(rank_bits: list[Mapping[str, torch.Tensor]],
                      shapes: Mapping[str, tuple]) -> Iterator[tuple[str, torch.Tensor, tuple]]:
    """(name, full packed mask, shape) from per-rank packed ZeRO-3 slices (rank r: {name:
    packed}, each slice packed from its own bit 0, as reshard_mask cuts them); one parameter is
    unpacked at a time."""
    world = len(rank_bits)
    for name, shape in shapes.items():
        numel = math.prod(shape)
        lengths = [LocalSlice.for_rank(0, numel, r, world).length for r in range(world)]
        yield name, merge_rank_slices([bits[name] for bits in rank_bits], lengths), tuple(shape)


def _pmp_states(tag_dir: Path) -> tuple[list[dict], list[dict]]:
    """Each rank's model states (memory-mapped) and its PMP client state, checked for a mask."""
    files = rank_files(tag_dir)
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in files]
    pmp = [client_components(s).get("pmp") for s in states]
    if any(p is None or p.get("mask") is None for p in pmp):
        raise ReleaseError(f"{tag_dir} has no PMP mask: not a PMP run, or saved before Stage I ended")
    for r, p in enumerate(pmp):
        if (p["mask"]["rank"], p["mask"]["world_size"]) != (r, len(files)):
            raise ReleaseError(f"{files[r]}: holds the mask shard of rank {p['mask']['rank']} of "
                               f"{p['mask']['world_size']}, expected rank {r} of {len(files)}")
    return states, pmp


def _pmp_settings(tag_dir: Path) -> dict:
    """The run's PMP settings (mask_ratio, mask_source, exclude, complement, ...) from the tag's
    descriptor; older checkpoints recorded only `"pmp": true`, so nothing to add then."""
    path = tag_dir / DESCRIPTOR
    pmp = json.loads(path.read_text()).get("pmp") if path.is_file() else None
    return dict(pmp) if isinstance(pmp, dict) else {}


def export_mask(tag_dir, private_dir, overwrite: bool = False, with_init: bool = False) -> Path:
    """The private artifact (and with `with_init` θ(0) as init.safetensors) from a checkpoint's
    per-rank client state, for a checkpoint of any world size."""
    tag_dir, private_dir = Path(tag_dir), Path(private_dir)
    refuse_non_empty(private_dir, overwrite)
    states, pmp = _pmp_states(tag_dir)
    saved = SavedShards(pmp)
    if with_init and not saved.has_theta0:
        raise ReleaseError("this checkpoint holds no θ(0): Stage II checkpoints keep it only "
                           "with pmp.save_init (the complement alone is θ(0) there); export "
                           "without --init, or use the run's private/mask/init.safetensors")
    param_shapes = {n: tuple(s) for group in states[0]["param_shapes"] for n, s in group.items()}
    shapes = {name: param_shapes[name] for name in saved.names}  # canonical order
    write_artifact(private_dir, ((n, saved.packed_mask(n), s) for n, s in shapes.items()),
                   {**_recorded_metadata(pmp[0]), **_pmp_settings(tag_dir),
                    "source": f"checkpoint {tag_dir}", "world_size": len(pmp)},
                   overwrite=True, theta0=saved.theta0 if with_init else None)
    return private_dir


def _recorded_metadata(pmp: dict) -> dict:
    """What the trainer's own artifact records (PMPController.metadata, kept in each checkpoint);
    older checkpoints lack it: the seeds, the Stage II start and the discovery trace then."""
    if pmp.get("metadata") is not None:
        return dict(pmp["metadata"])
    discovery = pmp["discovery"]
    return {"init_seed": pmp["init_seed"], "mask_seed": pmp["mask_seed"],
            "stage2_start_step": pmp["stage2_start"],
            "discovery": None if discovery is None else {
                k: discovery[k] for k in ("steps", "stop_reason", "trace")}}


def reshard_mask(private_dir, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Per rank r of `world_size`: {name: packed ZeRO-3 slice}, each packed from its own bit 0
    (the checkpoint layout; merge_mask_slices inverts it). Fine-tuning at any world size uses it."""
    if world_size < 1:
        raise ReleaseError(f"world size must be at least 1, got {world_size}")
    try:
        tensors, meta = read_artifact(private_dir)
    except MaskArtifactError as e:
        raise ReleaseError(str(e)) from e
    out = [{} for _ in range(world_size)]
    for name, shape in meta["shapes"].items():
        full, numel = tensors[name], math.prod(shape)
        for r in range(world_size):
            out[r][name] = pack_bits(slice_for_rank(full, numel, r, world_size))
    return out


def write_resharded_mask(private_dir, world_size: int, out_dir, overwrite: bool = False) -> list[Path]:
    """rank{r}.safetensors (packed slices) per rank + layout.json (shapes, per-rank start/length),
    staged beside `out_dir` and renamed into place: never a partial set of rank files."""
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir, overwrite)
    per_rank = reshard_mask(private_dir, world_size)
    _, meta = read_artifact(private_dir)
    layout = {"world_size": world_size, "release_sha256": meta.get("release_sha256"), "params": {}}
    for name, shape in meta["shapes"].items():
        cuts = [LocalSlice.for_rank(0, math.prod(shape), r, world_size) for r in range(world_size)]
        layout["params"][name] = {"shape": shape, "start": [c.start for c in cuts],
                                  "length": [c.length for c in cuts]}
    with staged_directory(out_dir) as tmp:
        for r, bits in enumerate(per_rank):
            save_file(bits, str(tmp / f"rank{r}.safetensors"),
                      metadata={"rank": str(r), "world_size": str(world_size)})
        (tmp / "layout.json").write_text(json.dumps(layout, indent=1))
    return [out_dir / f"rank{r}.safetensors" for r in range(world_size)]
