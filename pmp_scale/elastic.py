"""Elastic resume: continue a checkpoint written at world size W on W' != W.

Model, fp32 master and Adam moments go through DeepSpeed's universal checkpoint
(`ds_to_universal`: per-parameter files that any world size can slice). Our per-rank client
state cannot be sliced by DeepSpeed (it hands every rank rank 0's), so each component gets all
old ranks' states and re-cuts what is per-rank itself (the PMP mask slices and θ(0)).
"""
from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

UNIVERSAL = "universal"


def ensure_universal(tag_dir: Path) -> None:
    """Rank 0 converts the tag once (into a temp dir, renamed when complete)."""
    target = tag_dir / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        tmp = tag_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(tmp),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True,
                                  inject_missing_state=False))
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
    groups = engine.optimizer.optimizer.param_groups
    own = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {tag_dir}")
    for group, values in zip(groups, own):
        group.update(values)
    _unshare_step_counts(engine.optimizer)


def _unshare_step_counts(zero) -> None:
    state = zero.optimizer.state
    for flat in zero.fp32_partitioned_groups_flat:
        step = state.get(flat, {}).get("step")
        if torch.is_tensor(step):
            state[flat]["step"] = step.clone()


def old_rank_states(tag_dir: Path, world_size: int) -> list[dict]:
    """Every old rank's component states (memory-mapped: θ(0) is model-sized)."""
    states = []
    for rank in range(world_size):
        path = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        states.append(torch.load(path, map_location="cpu", mmap=True,
                                 weights_only=False)["pmp_components"])
    return states
