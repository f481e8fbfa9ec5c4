"""Fine-tuning a release (unauthorized, LoRA, authorized) on ZeRO-3: tasks, config, the run.
The report grids and analyses built on it are `pmp_scale.nft`."""
from .config import FinetuneConfig, load_finetune_config, parse_finetune_config
from .tasks import TaskData, TaskError, build_task
from .release_check import MaskMismatchError, Release, ReleaseLoadError, check_mask
from .train import finetune

__all__ = ["FinetuneConfig", "MaskMismatchError", "Release", "ReleaseLoadError", "TaskData",
           "TaskError", "build_task", "check_mask", "finetune", "load_finetune_config",
           "parse_finetune_config"]
