"""One run = one YAML file, validated into typed objects before any process-group work.

Unknown keys, wrong types and impossible combinations fail with a `ConfigError` whose message
names the offending key, so a typo in a sweep never silently trains the wrong thing.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A run configuration that cannot be trained as written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    preset: str
    # Any field of the transformers config, e.g. {num_hidden_layers: 2}; applied after the preset.
    overrides: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    # Directory (or object-store URI) written by tools/prepare_data.py: <path>/{train,val,meta.json}.
    path: str
    tokenizer: str
    local_cache: str | None = None  # where remote shards are cached; required for remote URIs
    shuffle: bool = True
    # null = drawn from the OS. A PMP run with pmp.secret_order draws it unless written in its
    # config: a public order would hand a shadow run the target's Stage I batches.
    shuffle_seed: int | None = Field(17, ge=0)
    # Fixed so the sample order does not depend on the world size (elastic resume).
    num_canonical_nodes: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)


class StepsConfig(_Strict):
    """The `train:` fields the shared ZeRO-3 core reads (zero3.build_ds_config, grad_accum_steps,
    check_batch_and_schedule): one definition, which pre-training (TrainConfig) and fine-tuning
    (finetune.config.FinetuneTrainConfig) extend with their own evaluation and logging fields."""
    micro_batch_size: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)


class TrainConfig(StepsConfig):
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(10, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Non-finite loss or gradient: skip the step (DeepSpeed's overflow path: weights and moments
    # untouched) and count it; stop, with a checkpoint, after this many in a row.
    nonfinite_max_in_a_row: int = Field(5, ge=1)


class OptimConfig(_Strict):
    """AdamW and its LR schedule, one definition for pre-training and fine-tuning; the defaults
    are pre-training's (fine-tuning's own: finetune.config.FinetuneOptimConfig)."""
    lr: float = Field(gt=0)
    # Linear warm-up, then constant, cosine or linear decay to min_lr_ratio·lr at max_steps.
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)
    # After SIGTERM/SIGINT: seconds to finish the step and write the checkpoint before exiting.
    preempt_grace_s: float = Field(300, gt=0)


class LoggingConfig(_Strict):
    tensorboard: bool = True
    # Peak dense TFLOP/s of one device for MFU; null = look it up from the GPU name (none on CPU).
    peak_tflops: float | None = None


class PMPConfig(_Strict):
    """Private Mask Pre-Training; `enabled: false` trains dense without any mask machinery."""
    enabled: bool = False
    mask_ratio: float = Field(0.7, gt=0, le=1)  # ρ; 1.0 = dense baseline through the PMP path
    mask_source: Literal["earlybird", "random"] = "earlybird"
    mask_seed: int | None = None  # random masks; null = drawn from the OS, kept private
    # |g| of the check step (paper), its running mean, or its sum over the last score_window steps
    score: Literal["step", "ema", "accum"] = "step"
    ema_beta: float = Field(0.9, ge=0, lt=1)
    score_window: int = Field(1, ge=1)  # `accum`: steps summed before each check (≤ check_every)
    check_every: int = Field(10, ge=1)
    iou_threshold: float = Field(0.99, gt=0, le=1)
    patience: int = Field(5, ge=1)
    warmup_max_steps: int = Field(500, ge=1)
    topk_scope: Literal["global", "per_tensor"] = "global"
    exclude: list[str] = Field(default_factory=list)  # fnmatch patterns: always trainable
    # Parameters whose θ(0) is one constant (norm weights = 1, biases = 0), found from the init
    # itself: always trainable, because a frozen element there sits exactly at a public value
    # and so reveals its mask bit without any seed. false = mask them like any other (leaks).
    exclude_constant_init: bool = True
    rewind: Literal["init", "none"] = "init"
    # frozen: bit-exact θ(0); decay: the reference code (weight decay moves the complement);
    # project: the authors' Stage II (decay, then every `project_every` Stage II steps the
    # complement is scaled to global L2 norm ≤ the radius).
    complement: Literal["frozen", "decay", "project"] = "frozen"
    project_every: int = Field(200, ge=1)
    # relative: radius = project_radius × the complement's norm at the first projection, so the
    # shrink is the same at any size; absolute: the radius itself (the authors' 2.0). Default
    # 0.0055 = the authors' 2.0 at TinyLlama-1.1B, ρ 0.7: 2.0 / (0.02·√(0.3·1.1e9)) (init std
    # 0.02, 3.3e8 complement elements); ×0.076 at 5M parameters with an absolute 2.0.
    project_radius: float = Field(0.0055, gt=0)
    project_radius_mode: Literal["relative", "absolute"] = "relative"
    save_init: bool = False  # also write θ(0) as HF-named fp32 safetensors (small models)
    drift_every: int = Field(50, ge=1)  # steps between complement-drift measurements
    # Mask-secrecy defences (README "Mask secrecy"; all random choices come from mask_seed,
    # drawn from the OS and kept private unless given). secret_order: draw data.shuffle_seed
    # (unless written) and break top-k ties at random, not by the lowest index.
    secret_order: bool = True
    # per_tensor_random: each tensor keeps its early-bird count, placed at random in the tensor
    placement: Literal["topk", "per_tensor_random"] = "topk"
    # share of each group's k chosen by score, the rest at random; null = 1 for topk, 0 for
    # per_tensor_random
    core_fraction: float | None = Field(None, ge=0, le=1)
    # noisy top-k: Laplace noise on log|score| clipped to a window of noise_clip (nats) around
    # its mean; bounds any attack knowing |g| to AUC ≤ e^ε/(1+e^ε) (docs/secrecy.md)
    noise_epsilon: float | None = Field(None, gt=0)
    noise_clip: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _check_window(self) -> "PMPConfig":
        if self.score == "accum" and self.score_window > self.check_every:
            raise ValueError(f"pmp.score_window ({self.score_window}) exceeds pmp.check_every "
                             f"({self.check_every}): the window ends at each check")
        return self


class RunConfig(_Strict):
    run_dir: str
    # Init seed: same seed => same θ(0) at any world size. null = drawn from the OS; a PMP run
    # keeps it only in its private artifacts (a public seed would reveal the frozen complement),
    # and draws it unless `seed` is written in its config.
    seed: int | None = 1234
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    pmp: PMPConfig = Field(default_factory=PMPConfig)
    # Passed through to DeepSpeed, merged over the config pmp_scale derives (see engine.py).
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        check_batch_and_schedule(self.train, self.optim, self.deepspeed)
        if self.pmp.enabled:
            check_pmp_deepspeed(self.deepspeed)
        if self.pmp.enabled and "seed" not in self.model_fields_set:
            # θ(0) must be secret in a PMP run: no default seed, unless one is given on purpose.
            object.__setattr__(self, "seed", None)
        if (self.pmp.enabled and self.pmp.secret_order
                and "shuffle_seed" not in self.data.model_fields_set):
            object.__setattr__(self.data, "shuffle_seed", None)  # a secret order (engine.py)
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        return grad_accum_steps(self.train, world_size)


def check_batch_and_schedule(train, optim, deepspeed: dict) -> None:
    """Combinations a run (pre-training or fine-tuning) cannot train; raised as ValueError
    inside pydantic validation, so the message names the key."""
    if train.global_batch_size % train.micro_batch_size:
        raise ValueError(f"train.global_batch_size ({train.global_batch_size}) must be a "
                         f"multiple of train.micro_batch_size ({train.micro_batch_size})")
    if optim.warmup_steps > train.max_steps:
        raise ValueError(f"optim.warmup_steps ({optim.warmup_steps}) exceeds "
                         f"train.max_steps ({train.max_steps})")
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "optimizer", "scheduler"}
    if clash := reserved & set(deepspeed):
        raise ValueError(f"deepspeed.{sorted(clash)[0]} is derived from train:/optim: "
                         "— set it there instead")


def check_pmp_deepspeed(deepspeed: dict) -> None:
    """DeepSpeed paths the masked-update hooks do not cover (mask/update.py): refused here, not
    discovered as a moved complement. NVMe offload swaps the fp32 master out between the
    sub-group steps the hooks edit; ZenFlow steps its own selected columns without the inner
    optimizer; the hooks need ZeRO-3's partitioned fp32 sub-groups."""
    zero = deepspeed.get("zero_optimization") or {}
    if zero.get("stage", 3) != 3:
        raise ValueError(f"deepspeed.zero_optimization.stage {zero.get('stage')}: PMP's masked "
                         "update works on ZeRO-3 partitions only; remove the override")
    why = {"offload_optimizer": "it swaps the fp32 master partitions the masked update edits "
                                "out to disk between sub-group steps",
           "offload_param": "parameter swapping is untested with the masked update and the "
                            "Stage I rewind"}
    for key, reason in why.items():
        if ((zero.get(key) or {}).get("device") or "none") == "nvme":
            raise ValueError(f"deepspeed.zero_optimization.{key}.device nvme is not supported "
                             f"with PMP: {reason}; use device cpu (ZeRO-Offload) or none")
    if zero.get("zenflow"):
        raise ValueError("deepspeed.zero_optimization.zenflow is not supported with PMP: "
                         "ZenFlow updates parameters outside the optimizer step the masked "
                         "update guards, so the complement would move")


def grad_accum_steps(train, world_size: int) -> int:
    """Micro-steps per optimizer step; the global batch must split evenly over ranks."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) is not divisible by "
            f"world size ({world_size}) x train.micro_batch_size "
            f"({train.micro_batch_size}) = {per_step}")
    return train.global_batch_size // per_step


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set optim.lr=3e-4 model.overrides.num_hidden_layers=2`: dotted keys, YAML values."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[leaf] = _parse_value(value)
    return raw


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(lines)


def parse_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return parse_config(apply_overrides(read_yaml(path), list(overrides)))
