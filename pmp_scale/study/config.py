"""A study = one YAML file: the data, the pre-training runs (dense + PMP variants), the
fine-tuning grid per task, the secrecy attacks and the claims' rules.

Everything that can be checked before the first run is checked by `validate` (unknown preset,
impossible ρ, missing data, a task file without its columns, a run config that would not
train): bad input fails with one `StudyError` line before anything starts.
"""
from __future__ import annotations

import glob
import itertools
import json
from pathlib import Path
from typing import Literal, Union

from pydantic import Field, PositiveInt, ValidationError, model_validator

from ..config import ConfigError, _Strict, apply_overrides, format_validation_error, read_yaml


class StudyError(ConfigError):
    """A study that cannot run as written (or a run of it that failed)."""


class DataSpec(_Strict):
    path: str  # prepared MDS dir; made from `corpus` when absent
    tokenizer: str  # SentencePiece .model (trained from `corpus` when absent) or HF dir
    corpus: str | None = None  # glob of .txt/.jsonl(.gz) documents
    vocab_size: int = Field(4096, ge=64)
    seq_len: int = Field(256, ge=8)
    val_fraction: float = Field(0.05, gt=0, lt=1)


class PretrainSpec(_Strict):
    config: str  # a pmp_scale run YAML, relative to the study file
    overrides: list[str] = Field(default_factory=list)
    nproc: int | None = Field(None, ge=1)  # ranks; null: the GPUs present, else 2 CPU ranks


class VariantBlock(_Strict):
    """A product of PMP settings; a study's variants are the union of its blocks."""
    mask_ratio: list[float] = Field(min_length=1)
    mask_source: list[Literal["earlybird", "random"]] = Field(default_factory=lambda: ["earlybird"])
    complement: list[Literal["frozen", "decay", "project"]] = Field(
        default_factory=lambda: ["frozen"])
    score: list[Literal["step", "ema", "accum"]] = Field(default_factory=lambda: ["step"])
    # Further pmp.* keys for these variants only (over the study's `pmp`), e.g.
    # {exclude: ["model.embed_tokens.weight"]}; `label` names them in the run names.
    pmp: dict = Field(default_factory=dict)
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    pretrain_seeds: list[int] | None = None  # null: the study's `pretrain_seeds`

    @model_validator(mode="after")
    def _check(self) -> "VariantBlock":
        if self.pmp and self.label is None:
            raise ValueError("a variant block with its own `pmp` keys needs a `label` (it "
                             "names its runs apart from the same settings without them)")
        return self


class ControlsSpec(_Strict):
    """Controls built into the study (see stats.py and controls.py). The negative (A/A)
    control is the second dense release: it needs >= 2 `pretrain_seeds`."""
    # Positive control: each dense release reparameterised (Llama: v/up x alpha, o/down /
    # alpha; same function, other effective step sizes). null: off.
    reparam_alpha: float | None = Field(None, gt=1)


TaskSpec = Union[str, dict]


class FinetuneSpec(_Strict):
    config: str  # a fine-tuning YAML (launchers/finetune.py), relative to the study file
    overrides: list[str] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=lambda: ["review_lm"], min_length=1)
    lrs: list[float] = Field(min_length=1)
    steps: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    min_seeds: int = Field(3, ge=1)
    lora: bool = False  # also the cheap attacker (unauthorized-lora) on every PMP release
    # Also fine-tune only lm_head / the new head on every release: body gain = full − head-only.
    head_only: bool = False
    scratch: bool = True  # the from-scratch baseline (release architecture, fresh init)
    # Cells side by side, one process and one thread each, on a CPU; null: as many as the
    # pre-training ranks (a GPU runs one cell at a time).
    workers: int | None = Field(None, ge=1)


# The attack families of pmp_scale.secrecy (a name may also be one member, e.g. grad_abs@K4).
DATA_FREE_ATTACKS = ("bits", "constant", "magnitude", "magnitude_tensor", "magnitude_row",
                     "magnitude_col", "init_likelihood", "seed_guess")
PUBLIC_TEXT_ATTACKS = ("grad_abs", "fisher", "grad_sign", "grad_snr", "displacement",
                       "structural")
ATTACKS = (*DATA_FREE_ATTACKS, *PUBLIC_TEXT_ATTACKS, "shadow")


class ShadowSpec(_Strict):
    """The attacker's own PMP run (attack `shadow`). Kerckhoffs: the attacker runs our public
    code with the target variant's public settings (preset, recipe, every `pmp.*` defence knob)
    but its own seeds: init, data order and mask are never the target's."""
    seed: int | None = None  # the attacker's init seed; null: drawn from the OS (a PMP default)
    # Stage II length; null: the target's train.max_steps (a release records none: the
    # strongest attacker matches it, so its masked weights drift as far as the target's)
    stage2_steps: int | None = Field(None, ge=1)
    overrides: list[str] = Field(default_factory=list)  # further settings of the attacker's run


class SecrecySpec(_Strict):
    """The attack suite per PMP release (pmp_scale.secrecy.run_attacks), scored against the
    private mask. The data-free attacks need the release only; the public-text ones and the
    shadow need public text."""
    enabled: bool = True
    attacks: list[str] = Field(default_factory=lambda: [
        "bits", "constant", "magnitude", "magnitude_row", "init_likelihood"])
    # Public text: a prepared MDS dir or a .txt/.jsonl[.gz] glob. null: the study's own
    # data.path, the training text itself: the strongest realistic attacker has public text
    # like the training text (a web crawl, the same books), so this is the upper bound.
    public: str | None = None
    # numbers of public batches K for the gradient attacks (grad_abs@K, grad_sign@K, ...)
    ks: list[PositiveInt] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1)
    shadow: ShadowSpec = Field(default_factory=ShadowSpec)

    def families(self) -> set[str]:
        return {a.split("@")[0] for a in self.attacks}

    def needs_public(self) -> bool:
        return bool(self.families() & {*PUBLIC_TEXT_ATTACKS, "shadow"})

    def wants_shadow(self) -> bool:
        return self.enabled and "shadow" in self.families()


class EstimateSpec(_Strict):
    """Guesses for `--dry-run` before any run has measured the machine."""
    pretrain_tokens_per_s: float = Field(20000, gt=0)
    launch_overhead_s: float = Field(40, ge=0)
    finetune_step_s: float = Field(0.3, gt=0)
    finetune_cell_overhead_s: float = Field(4, ge=0)
    attack_s: float = Field(30, ge=0)  # the attack suite on one release (a shadow run apart)


class CurvatureSpec(_Strict):
    """The mechanism (curvature.py) on every release: Hessian top eigenvalue by power iteration
    on the mask, the complement and all weights, on pre-training validation samples."""
    enabled: bool = True
    samples: int = Field(8, ge=1)  # validation sequences in the one batch
    iters: int = Field(30, ge=1)  # power-iteration steps at most (stops at rel. change 1e-4)


class ClaimsSpec(_Strict):
    base_tolerance: float = Field(0.05, gt=0)  # base preserved: val loss within this of dense
    secrecy_auc: float = Field(0.55, gt=0.5, le=1)  # an attack above this AUC reveals the mask


class StudyConfig(_Strict):
    title: str = "PMP study"
    out_dir: str
    data: DataSpec
    pretrain: PretrainSpec
    presets: list[str] | None = None  # model presets; null: the pre-training config's
    variants: list[VariantBlock] = Field(min_length=1)
    pmp: dict = Field(default_factory=dict)  # further pmp.* keys for every PMP variant
    # Pre-training seeds: one release per seed for dense and every variant (a block may give
    # its own). null: one run each at the pre-training config's seed (not replicated).
    pretrain_seeds: list[int] | None = None
    controls: ControlsSpec = Field(default_factory=ControlsSpec)
    finetune: FinetuneSpec
    secrecy: SecrecySpec = Field(default_factory=SecrecySpec)
    estimate: EstimateSpec = Field(default_factory=EstimateSpec)
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)
    claims: ClaimsSpec = Field(default_factory=ClaimsSpec)

    def variant_settings(self) -> list[dict]:
        """Unique PMP settings in block order."""
        seen, out = set(), []
        for b in self.variants:
            for r, src, comp, score in itertools.product(b.mask_ratio, b.mask_source,
                                                         b.complement, b.score):
                key = (r, src, comp, score, b.label)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(mask_ratio=r, mask_source=src, complement=comp, score=score,
                                    label=b.label, extra=dict(b.pmp),
                                    seeds=b.pretrain_seeds or self.pretrain_seeds))
        return out


def public_text(cfg: StudyConfig) -> str:
    """The attacker's public text: `secrecy.public`, else the study's own prepared data."""
    return cfg.secrecy.public or cfg.data.path


def load_study(path, overrides: list[str] = ()) -> tuple[StudyConfig, Path]:
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    try:
        return StudyConfig.model_validate(raw), path.parent
    except ValidationError as err:
        raise StudyError(format_validation_error(err).replace("invalid config", "invalid study"
                                                              )) from None


def resolve(base: Path, p: str) -> Path:
    """A config-relative path (as the report resolves `finetune`)."""
    q = Path(p)
    return q if q.is_absolute() or q.exists() else base / q


def validate(cfg: StudyConfig, base_dir: Path, plan) -> None:
    """Every check that needs no run: raises StudyError (one line) on the first problem."""
    from ..models import PRESETS
    for preset in cfg.presets or []:
        if preset not in PRESETS:
            raise StudyError(f"presets: {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    for seeds in [cfg.pretrain_seeds] + [v["seeds"] for v in cfg.variant_settings()]:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise StudyError(f"pretrain_seeds {seeds}: a seed is repeated (each release needs "
                             "its own pre-training seed)")
    if cfg.controls.reparam_alpha is not None:
        from ..models import PRESETS
        for preset in plan.presets:
            if PRESETS.get(preset, {}).get("model_type") != "llama":
                raise StudyError(f"controls.reparam_alpha: the reparameterised control is "
                                 f"defined for Llama presets only, not {preset!r}; set it to null")
    for v in cfg.variant_settings():
        if not 0 < v["mask_ratio"] < 1:
            raise StudyError(f"variants: mask_ratio {v['mask_ratio']} is impossible for a PMP "
                             "variant: it must lie strictly between 0 and 1 (the dense run is "
                             "always part of the study)")
    d = cfg.data
    if not (Path(d.path) / "meta.json").is_file():
        if d.corpus is None:
            raise StudyError(f"data.path {d.path} is not prepared data (no meta.json) and no "
                             "data.corpus is given to prepare it from")
        if not glob.glob(d.corpus):
            raise StudyError(f"data.corpus {d.corpus!r} matches no file")
    if not Path(d.tokenizer).exists() and d.corpus is None:
        raise StudyError(f"data.tokenizer {d.tokenizer} does not exist and no data.corpus is "
                         "given to train it from")
    if not Path(d.tokenizer).exists() and not d.tokenizer.endswith(".model"):
        raise StudyError(f"data.tokenizer {d.tokenizer}: a tokenizer to train must be named "
                         "*.model (SentencePiece)")
    for f in (cfg.pretrain.config, cfg.finetune.config):
        if not resolve(base_dir, f).is_file():
            raise StudyError(f"config file not found: {f} (relative to {base_dir})")
    check_secrecy(cfg, plan)
    from ..config import grad_accum_steps, parse_config
    for run in [*plan.runs, *plan.shadows.values()]:
        try:
            rc = parse_config(apply_overrides(read_yaml(resolve(base_dir, cfg.pretrain.config)),
                                              run.sets))
            grad_accum_steps(rc.train, plan.nproc)
        except ConfigError as err:
            raise StudyError(f"run {run.name}: {err}") from None
    for task in plan.tasks:
        check_task(cfg, base_dir, task)
        check_grid(cfg, base_dir, plan, task)


def check_secrecy(cfg: StudyConfig, plan) -> None:
    """Attack names, the public text (present, and prepared data for a shadow to train on),
    and a shadow seed that is not one of the targets' (it would share their θ(0))."""
    sec = cfg.secrecy
    if not sec.enabled:
        return
    for name in sec.attacks:
        family, _, member = name.partition("@")
        if family not in ATTACKS:
            raise StudyError(f"secrecy.attacks: {name!r} is unknown; choose from "
                             f"{', '.join(ATTACKS)} (or one K of a gradient attack, e.g. "
                             "grad_abs@K4)")
        if member and (family not in PUBLIC_TEXT_ATTACKS or not member.startswith("K")
                       or not member[1:].isdigit() or int(member[1:]) not in sec.ks):
            raise StudyError(f"secrecy.attacks: {name!r} is never run: a member is a "
                             f"gradient attack at one of secrecy.ks {sec.ks} (e.g. "
                             f"grad_abs@K{sec.ks[0]})")
    if sec.public is not None and sec.needs_public():
        if not (Path(sec.public) / "meta.json").is_file() and not glob.glob(sec.public):
            raise StudyError(f"secrecy.public {sec.public}: neither prepared data (no "
                             "meta.json) nor any .txt/.jsonl file matching it")
    if not sec.wants_shadow():
        return
    if sec.public is not None and not (Path(sec.public) / "meta.json").is_file():
        raise StudyError(f"secrecy.public {sec.public}: the shadow attack pre-trains on the "
                         "public text, so it must be prepared data (an MDS dir with meta.json; "
                         "tools/prepare_data.py), or null for the study's data.path")
    target_seeds = {r.seed for r in plan.runs} | {plan.base.get("seed")}
    if sec.shadow.seed is not None and sec.shadow.seed in target_seeds:
        raise StudyError(f"secrecy.shadow.seed {sec.shadow.seed} is a target's init seed: the "
                         "attacker's run must have its own (null: drawn from the OS)")


def check_grid(cfg: StudyConfig, base_dir: Path, plan, task) -> None:
    """Every fine-tuning cell's config parses (the releases need not exist yet)."""
    from ..nft.report import base_finetune_config, parse_report_config, plan_cells
    try:
        rc = parse_report_config(report_config(cfg, base_dir, plan, plan.presets[0], task))
        plan_cells(rc, base_finetune_config(rc, base_dir))
    except ConfigError as err:
        raise StudyError(f"fine-tuning grid for task {task_label(task)}: {err}") from None


def task_config(cfg: StudyConfig, base_dir: Path, task: TaskSpec) -> dict:
    """The fine-tuning task section for one study task (merged over the base config's)."""
    raw = apply_overrides(read_yaml(resolve(base_dir, cfg.finetune.config)),
                          cfg.finetune.overrides)
    spec = {"name": task} if isinstance(task, str) else dict(task)
    keep = {k: v for k, v in raw.get("task", {}).items()
            if k in ("max_length", "max_train_examples", "max_eval_examples")}
    return {**keep, **spec}


def short(name: str) -> str:
    """A run's name in its grid (the preset dropped): dense__s0, r0.7_earlybird_frozen__s1."""
    return name.split("__", 1)[1]


def reparam_name(dense) -> str:
    return dense.name.replace("__dense", "__reparam", 1)


def report_config(cfg: StudyConfig, base_dir: Path, plan, preset: str, task) -> dict:
    """The report grid for one (preset, task): every dense release, its reparameterised
    control, from scratch and every PMP release."""
    f = cfg.finetune
    rel = plan.out / "releases"
    head = ["head-only"] if f.head_only else []
    releases = [{"name": short(d.name), "release": str(rel / d.name),
                 "modes": ["unauthorized", *head]} for d in plan.denses(preset)]
    if cfg.controls.reparam_alpha is not None:
        releases += [{"name": short(reparam_name(d)), "release": str(rel / reparam_name(d)),
                      "modes": ["unauthorized"]} for d in plan.denses(preset)]
    if f.scratch:
        releases.append({"name": "scratch", "release": str(rel / plan.dense(preset).name),
                         "reinit": True, "modes": ["unauthorized"]})
    modes = ["unauthorized", "authorized"] + (["unauthorized-lora"] if f.lora else []) + head
    for run in plan.variants(preset):
        releases.append({"name": short(run.name), "release": str(rel / run.name),
                         "mask": str(run.run_dir / "private" / "mask"), "modes": modes})
    task_cfg = task_config(cfg, base_dir, task)
    return {"title": f"{cfg.title}: {preset}, task {task_label(task)}",
            "out_dir": str(plan.grid_dir(preset, task)),
            "finetune": str(resolve(base_dir, f.config).resolve()),
            "overrides": [*f.overrides, f"task={json.dumps(task_cfg)}"],
            "releases": releases, "lrs": f.lrs, "steps": f.steps, "seeds": f.seeds,
            "min_seeds": f.min_seeds, "dense": releases[0]["name"], "pmp": releases[-1]["name"],
            "scratch": "scratch" if f.scratch else None, "pretrain_data": cfg.data.path,
            "workers": f.workers or plan.nproc}


def task_label(task: TaskSpec) -> str:
    if isinstance(task, str):
        return task.replace(":", "_")
    name = task.get("name", "task")
    return Path(task["train_file"]).stem if name == "file" and task.get("train_file") else name


def check_task(cfg: StudyConfig, base_dir: Path, task: TaskSpec) -> None:
    """The task config is valid and, for a file task, its files have the named columns."""
    from ..finetune.config import TaskConfig
    from ..finetune.tasks import TaskError, _file_rows
    try:
        tc = TaskConfig.model_validate(task_config(cfg, base_dir, task))
    except ValidationError as err:
        raise StudyError(f"task {task_label(task)}: "
                         f"{format_validation_error(err).removeprefix('invalid config: ')}") from None
    if tc.name == "file":
        try:
            _file_rows(tc, tc.kind == "classification")
        except TaskError as err:
            raise StudyError(f"task {task_label(task)}: {err}") from None
