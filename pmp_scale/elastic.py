"""Elastic resume: continue a checkpoint written at world size W on W' != W.

Model, fp32 master and Adam moments go through DeepSpeed's universal checkpoint
(`ds_to_universal`: per-parameter files that any world size can slice). Our per-rank client
state cannot be sliced by DeepSpeed (it hands every rank rank 0's), so each component gets all
old ranks' states and re-cuts what is per-rank itself (the PMP mask slices and θ(0)).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import ds_internals

UNIVERSAL = "universal"


def ensure_universal(tag_dir: Path) -> None:
    """Rank 0 converts the tag once (into a temp dir, renamed when complete)."""
    target = tag_dir / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        tmp = tag_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_internals.convert_to_universal(tag_dir, tmp)
        tmp.rename(target)
    dist.barrier()


def load_universal(engine, tag_dir: Path) -> None:
    """DeepSpeed loads model, optimizer and scheduler state sliced for this world size.

    Two defects of DeepSpeed 0.19's ZeRO-3 universal loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) are undone here:
    - it copies param group 0's hyperparameters onto every group, which would give norms and
      biases (our no-decay group) weight decay; the groups' own values are put back (lr
      excepted: the restored scheduler owns it);
    - it puts one and the same `step` tensor into every ZeRO-3 sub-group's Adam state. The
      inner optimizer steps once per sub-group and increments `step` in place, so with S
      sub-groups the shared count advanced by S per optimizer step: Adam's bias correction
      used the wrong step from the first resumed step on (losses off by ~1e-2 nats within
      three steps). Each sub-group gets its own copy."""
    ensure_universal(tag_dir)
    groups = ds_internals.inner_param_groups(engine)
    own = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    with ds_internals.loading_universal(engine):
        path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {tag_dir}")
    for group, values in zip(groups, own):
        group.update(values)
    ds_internals.unshare_step_counts(engine)


def old_rank_states(tag_dir: Path, world_size: int) -> list[dict]:
    """Every old rank's component states (memory-mapped: θ(0) is model-sized)."""
    states = []
    for rank in range(world_size):
        path = tag_dir / ds_internals.model_states_file(rank)
        states.append(torch.load(path, map_location="cpu", mmap=True,
                                 weights_only=False)[ds_internals.CLIENT_STATE_KEY])
    return states
