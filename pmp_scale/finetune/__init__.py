"""Non-fine-tunability evaluation: fine-tune a release (unauthorized, LoRA, authorized), sweep
grids into a report, and the paper's analyses."""
from .config import FinetuneConfig, load_finetune_config, parse_finetune_config
from .tasks import TaskData, TaskError, build_task
from .train import MaskMismatchError, Release, ReleaseLoadError, check_mask, finetune

__all__ = ["FinetuneConfig", "MaskMismatchError", "Release", "ReleaseLoadError", "TaskData",
           "TaskError", "build_task", "check_mask", "finetune", "load_finetune_config",
           "parse_finetune_config"]
