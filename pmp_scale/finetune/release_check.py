"""The release being fine-tuned and its private mask: what is checked before training (the
mask belongs to this release; the loaded partitions are the release, bit for bit) and counted
after it (which backbone elements moved, inside and outside the mask)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.loader import DataError
from ..mask.artifact import MaskArtifactError, read_artifact, slice_for_rank
from ..zero3 import local_elements, rank_slice

log = logging.getLogger("pmp_scale.finetune")


class MaskMismatchError(MaskArtifactError):
    """A private mask that does not belong to the model being fine-tuned."""


class ReleaseLoadError(DataError):
    """A release directory that cannot be fine-tuned (not an HF model, or loaded wrongly)."""


# --- the release and its private mask -------------------------------------------------------------
@dataclass
class Release:
    """A released HF model directory: tensor names/shapes/dtypes from the safetensors headers."""
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def open(cls, path) -> "Release":
        from safetensors import safe_open
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ReleaseLoadError(f"{path} is not a released model directory: no config.json + "
                                   "model.safetensors (tools/release.py writes one)")
        if not (path / "config.json").is_file():
            raise ReleaseLoadError(f"{path} has no config.json")
        shapes, dtypes = {}, {}
        for f in files:
            with safe_open(str(path / f), framework="pt") as h:
                for name in h.keys():
                    part = h.get_slice(name)
                    shapes[name], dtypes[name] = tuple(part.get_shape()), part.get_dtype()
        return cls(path, shapes, dtypes)

    @cached_property
    def sha256(self) -> str:
        from ..release import release_sha256
        return release_sha256(self.path)

    def tensors(self):
        """(name, tensor) in sorted order, one in memory at a time."""
        from ..release import release_tensors
        return release_tensors(self.path)


def check_mask(mask_dir, release: Release, allow_unbound: bool = False) -> tuple[dict, dict]:
    """The private mask artifact, after checking that it belongs to this release. A mask with no
    recorded release sha256 would fit any release of the same architecture, so it is refused
    unless `allow_unbound` (config `allow_unbound_mask: true`) says so."""
    mask_dir = Path(mask_dir)
    tensors, meta = read_artifact(mask_dir)  # malformed artifacts: MaskArtifactError
    recorded = meta.get("release_sha256")
    if recorded is not None and recorded != release.sha256:
        raise MaskMismatchError(
            f"mask belongs to another release: {mask_dir / 'mask.json'} records release sha256 "
            f"{recorded[:16]}…, {release.path} has {release.sha256[:16]}…")
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    if shapes != release.shapes:
        diff = sorted(n for n in set(shapes) | set(release.shapes)
                      if shapes.get(n) != release.shapes.get(n))
        n = diff[0]
        raise MaskMismatchError(
            f"mask does not match the model: {len(diff)} parameter(s) differ in name or shape, "
            f"e.g. {n!r}: mask {list(shapes[n]) if n in shapes else 'absent'}, release "
            f"{list(release.shapes[n]) if n in release.shapes else 'absent'} ({mask_dir})")
    if recorded is None:
        if not allow_unbound:
            raise MaskMismatchError(
                f"{mask_dir / 'mask.json'} records no release_sha256, so it cannot be checked "
                f"against {release.path}: bind it with tools/release.py --private {mask_dir}, "
                "or set allow_unbound_mask=true to accept a names-and-shapes check")
        log.warning("%s records no release_sha256 (allow_unbound_mask): only names and shapes "
                    "were checked against %s", mask_dir, release.path)
    return tensors, meta


# --- names and comparisons -------------------------------------------------------------------------
def backbone_name(name: str) -> str:
    """The release's tensor name of a (possibly PEFT-wrapped) model parameter."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@torch.no_grad()
def compare_with_release(model, release: Release, masks: dict | None = None) -> dict:
    """Counts over all ranks of backbone elements that differ (bitwise, in the training dtype)
    from the release: overall, and inside / outside the private mask when `masks` is given."""
    params = {backbone_name(n): p for n, p in model.named_parameters() if not is_adapter(n)}
    counts = torch.zeros(5, dtype=torch.float64)  # elements, changed, complement, changed in it, max|Δ| (compl.)
    for name, t in release.tensors():
        p = params.get(name)
        if p is None:  # e.g. lm_head of a classification model
            continue
        local = local_elements(p)  # compared with the release's CPU tensors
        ref = rank_slice(t).to(local.dtype)
        changed = _bits(local) != _bits(ref)
        counts[0] += changed.numel()
        counts[1] += changed.sum().item()
        if masks is not None and name in masks:
            frozen = ~slice_for_rank(masks[name], t.numel(), dist.get_rank(), dist.get_world_size())
            counts[2] += frozen.sum().item()
            counts[3] += changed[frozen].sum().item()
            if frozen.any():
                counts[4] = max(counts[4].item(),
                                (local[frozen].double() - ref[frozen].double()).abs().max().item())
    from deepspeed.accelerator import get_accelerator
    counts = counts.to(get_accelerator().current_device_name())  # NCCL reduces device tensors
    maximum = counts[4:].clone()
    dist.all_reduce(counts[:4])
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX)
    counts = counts.cpu()
    out = {"elements": int(counts[0]), "changed": int(counts[1])}
    if masks is not None:
        out.update(complement=int(counts[2]), complement_changed=int(counts[3]),
                   complement_max_abs_diff=float(maximum[0]))
    return out


def verify_loaded(model, release: Release) -> None:
    """Every backbone partition equals the release exactly (in the training dtype)."""
    diff = compare_with_release(model, release)
    if diff["changed"]:
        raise ReleaseLoadError(f"{release.path}: {diff['changed']} of {diff['elements']} loaded "
                               "elements differ from the released weights")


def sharded_mask(engine, masks: dict):
    """ShardedMask for the engine's partitions: the artifact's bits for released parameters,
    all ones (fully trainable) for parameters the release does not have (new heads)."""
    from ..mask.sharded import ShardedMask
    from ..zero3.layout import PartitionLayout
    layout = PartitionLayout.from_engine(engine)
    rank, world = layout.rank, layout.world_size
    local = []
    for e in layout.entries:
        name = backbone_name(e.name)
        if name in masks:
            local.append(slice_for_rank(masks[name], math.prod(e.shape), rank, world))
        else:
            local.append(torch.ones(e.slice.length, dtype=torch.bool))
    return ShardedMask.from_param_masks(layout, local)
