"""One fine-tuning run = one YAML file (validated like the pre-training config: extra=forbid).

The same task, data order, schedule and step budget apply to every mode; only `mode` (and the
mask it needs) differs between the runs a report compares.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..config import (ConfigError, OptimConfig, StepsConfig, _Strict, apply_overrides,
                      check_batch_and_schedule, check_pmp_deepspeed, format_validation_error,
                      grad_accum_steps, read_yaml)

MODES = ("unauthorized", "unauthorized-lora", "authorized", "head-only")
# Built-in offline tasks (data/classification/), then GLUE through `datasets`, then local files.
BUILTIN_TASKS = ("movie_reviews", "amazon_reviews", "review_lm")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli")


class TaskConfig(_Strict):
    # movie_reviews | amazon_reviews | review_lm | glue:<task> | file
    name: str = "review_lm"
    type: Literal["classification", "lm"] | None = None  # required for `file`; implied otherwise
    # `file`: CSV / TSV / JSONL; one file is split by hash, or give each split its own file.
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl"] = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    id_column: str | None = None  # hash key of the split; default: the text itself
    max_length: int = Field(128, ge=8)  # classification: truncation; lm: block length
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)  # examples (lm: blocks)
    max_eval_examples: int | None = Field(None, ge=1)   # per validation / test split
    min_abs_score: float = Field(0.5, ge=0)  # built-in review classification: drop |score| < this
    # Primary metric (selection and report); auto: GLUE's (CoLA Matthews, MRPC/QQP F1, else
    # accuracy), accuracy for other classification, validation loss for lm. All are recorded.
    metric: Literal["auto", "accuracy", "f1", "matthews", "loss"] = "auto"
    data_dir: str | None = None  # built-in tasks' files; default <repo>/data/classification

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        name = self.name
        if name.startswith("glue:"):
            if name[5:] not in GLUE_TASKS:
                raise ValueError(f"task.name {name!r}: unknown GLUE task; choose one of "
                                 f"{', '.join('glue:' + t for t in GLUE_TASKS)} (stsb is regression)")
        elif name == "file":
            if self.train_file is None or self.type is None:
                raise ValueError("task.name 'file' needs task.train_file and task.type "
                                 "(classification or lm)")
        elif name not in BUILTIN_TASKS:
            raise ValueError(f"task.name {name!r} is unknown; choose one of "
                             f"{', '.join(BUILTIN_TASKS)}, glue:<task>, file")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("task.val_fraction + task.test_fraction must be below 1")
        return self

    @property
    def kind(self) -> str:
        if self.name == "review_lm":
            return "lm"
        if self.name == "file":
            return self.type
        return "classification"


class FinetuneTrainConfig(StepsConfig):
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(8, ge=1)
    # Validation at step 0, every `eval_every` steps, at each of `eval_steps` and at the end.
    eval_every: int | None = Field(None, ge=1)
    eval_steps: list[int] = Field(default_factory=list)
    eval_batch_size: int = Field(16, ge=1)
    # Validation before the first step. Sweeps over an lm task switch it off for all but one
    # run per release: the released weights, hence the step-0 loss, are the same in every run.
    eval_at_start: bool = True
    log_every: int = Field(10, ge=1)
    # Non-finite loss or gradient: the step is skipped and counted; the run stops (diverged)
    # after this many in a row.
    nonfinite_max_in_a_row: int = Field(5, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


class FinetuneOptimConfig(OptimConfig):
    """Fine-tuning's defaults: no decay floor, no weight decay, Adam's own betas."""
    # constant: linear warm-up then flat, so the state after k steps of a long run IS the k-step
    # run (same data prefix): one run serves every duration of a sweep. cosine / linear decay to
    # min_lr_ratio·lr at max_steps.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # auto: every attention and MLP projection (Llama q/k/v/o/gate/up/down; GPT-2 c_attn/c_proj/c_fc)
    target_modules: Literal["auto"] | list[str] = "auto"


class ExportConfig(_Strict):
    """The fine-tuned model as a standard HF directory, written by the release path
    (pmp_scale/release/), like a pre-trained release. Causal-LM fine-tunes only."""
    dir: str | None = None
    overwrite: bool = False  # replace a non-empty `dir` (otherwise refused before training)


class FinetuneConfig(_Strict):
    release: str          # a released HF model directory
    # head-only: a baseline, only the output head (lm_head, or a new classification head)
    # trains; a mode's gain minus head-only's is what its body (the backbone) contributed.
    mode: Literal["unauthorized", "unauthorized-lora", "authorized", "head-only"] = "unauthorized"
    mask: str | None = None   # private mask artifact dir; required by `authorized`
    # A mask without a recorded release sha256 fits any same-architecture release: refused
    # unless this is set (then only names and shapes are checked).
    allow_unbound_mask: bool = False
    out_dir: str | None = None  # result.json + metrics.jsonl; none = results returned only
    seed: int = 0             # data order, new heads, LoRA init, dropout
    # Ablation: fine-tune a fresh init of the release's architecture (no pre-training) instead.
    reinit: bool = False
    verify_load: bool = True  # check that the loaded partitions equal the release bit for bit
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: FinetuneTrainConfig
    optim: FinetuneOptimConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.mode == "authorized" and self.mask is None:
            raise ValueError("mode 'authorized' needs `mask`: the private mask artifact directory")
        if self.export.dir is not None and self.mode == "unauthorized-lora":
            raise ValueError("export.dir: LoRA runs cannot be exported (the adapters are not "
                             "merged into the ZeRO-3 weights)")
        check_batch_and_schedule(self.train, self.optim, self.deepspeed)
        if self.mode == "authorized":  # the pre-training masked-update hooks
            check_pmp_deepspeed(self.deepspeed)
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        return grad_accum_steps(self.train, world_size)


def validated(model: type[BaseModel], raw: dict):
    """`model` from `raw`; bad input is one ConfigError line, not a pydantic traceback."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def parse_finetune_config(raw: dict) -> FinetuneConfig:
    return validated(FinetuneConfig, raw)


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    return parse_finetune_config(apply_overrides(read_yaml(path), list(overrides)))
