"""Everything a ZeRO-3 run is built from: the process group, the precision, the DeepSpeed
config, the optimizer with its decay groups and the warm-up + decay schedule, the engine.

Pre-training and fine-tuning call the same functions, so the two cannot drift apart.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from ..launch import free_port
from ..config import ConfigError
from ..ds_internals import full_shape, unlink_shm_allreduce_segment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


def resolve_precision(precision: str) -> str:
    """auto: bf16 on accelerators, fp32 on CPU ranks (which have no fp16 kernels)."""
    if precision == "auto":
        return "fp32" if on_cpu() else "bf16"
    if precision == "fp16" and on_cpu():
        raise ConfigError("train.precision fp16 is not supported on CPU ranks; use fp32 or bf16")
    return precision


# --- the process group ------------------------------------------------------------------------------
def init_distributed() -> None:
    """Join the process group a launcher describes in the environment (RANK, MASTER_ADDR...)."""
    import deepspeed
    if not dist.is_initialized():
        if not on_cpu():  # NCCL collectives before the engine exists (the run_dir probe, the
            from deepspeed.accelerator import get_accelerator  # seed broadcast) use this device
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl")
        if on_cpu():
            unlink_shm_allreduce_segment()


def ensure_process_group() -> None:
    """Join the launcher's process group, or start a single-process (W=1) one in-process: an
    explicit TCP rendezvous on a free local port, so no launcher variable is invented."""
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        init_distributed()
        return
    dist.init_process_group("gloo" if on_cpu() else "nccl", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")


def require_local_rank() -> None:
    """DeepSpeed 0.19 reads LOCAL_RANK from the environment only (`zero.Init`,
    `deepspeed.initialize`, its first steps) and asserts without it. A launcher sets it; for one
    in-process rank the entry point does (launchers/finetune.py, the tools): the package itself
    never writes the process's environment."""
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError("LOCAL_RANK is not set, and DeepSpeed reads it from the environment: "
                          "start under a launcher (deepspeed, torchrun), or set LOCAL_RANK=0 "
                          "for one in-process rank")


# --- the DeepSpeed config -----------------------------------------------------------------------------
def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(cfg, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config derived from a run or fine-tuning config (`train`: config.StepsConfig,
    `optim.grad_clip`: config.OptimConfig, `grad_accum_steps`); its `deepspeed:` section
    overrides it."""
    derived = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": 3,
            # One fp32 sub-group is snapshotted by the PMP restore hook: keep them moderate.
            "sub_group_size": 100_000_000,
            "contiguous_gradients": True,
            "overlap_comm": not on_cpu(),
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(derived, cfg.deepspeed)


def offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


# --- optimizer, schedule, engine ----------------------------------------------------------------------
def warmup_decay(warmup: int, total: int, floor: float, decay: str = "cosine"):
    """LR factor: linear warm-up over `warmup` steps (the first step already at 1/warmup), then
    constant, cosine or linear decay to `floor` at `total`. (transformers' schedules start the
    warm-up at 0 and do not clamp past `total`: not the same values.)"""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D tensors (norms, biases); ZeRO-3 shapes, not the empty local ones."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = full_shape(p)
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, optim, ds_config: dict, schedule):
    """`deepspeed.initialize` with AdamW over the decay groups (DeepSpeed's CPU Adam when the
    optimizer step is offloaded to the host) and `schedule` as a LambdaLR."""
    import deepspeed
    groups = param_groups(model, optim.weight_decay)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      fused=not on_cpu())
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def restart_schedule(engine, schedule) -> None:
    """Back to step 0 of `schedule` (PMP rewinds to θ(0) after Stage I: Stage II starts afresh)."""
    sched = engine.lr_scheduler
    sched.last_epoch = 0
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        group["lr"] = base * schedule(0)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
