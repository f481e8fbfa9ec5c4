"""The one DeepSpeed ZeRO-3 training core that pre-training (`engine.py`) and fine-tuning
(`finetune/train.py`) share.

    build  process group, precision, DeepSpeed config, decay groups, LR schedule, engine
    step   one optimizer step: step hooks (the masked update) and non-finite skipping
    partitions  seeded θ(0) into the fp32 master or the model's partitions; this rank's slices
    layout      where this rank's slice of each parameter lives in its partitions (the mask's base)
    hf     Hugging Face models built or loaded straight into partitions
"""
from .build import (DTYPES, build_ds_config, build_engine, deep_merge, ensure_process_group, init_distributed, offloads_optimizer, on_cpu,
                    param_groups, require_local_rank, resolve_precision, restart_schedule,
                    warmup_decay)
from .hf import hf_zero3, no_hf_init
from .partitions import init_master, init_partitioned, local_elements, rank_slice, write_master
from .step import SkippedSteps, StepHook, mean_over_ranks, optimizer_step

__all__ = ["DTYPES", "SkippedSteps", "StepHook", "build_ds_config", "build_engine", "deep_merge",
           "ensure_process_group", "hf_zero3", "init_distributed",
           "init_master", "init_partitioned", "local_elements",
           "mean_over_ranks", "no_hf_init", "offloads_optimizer", "on_cpu", "optimizer_step",
           "param_groups", "rank_slice", "require_local_rank", "resolve_precision", "restart_schedule", "warmup_decay",
           "write_master"]
