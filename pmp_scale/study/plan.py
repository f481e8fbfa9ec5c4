"""The study's plan: which pre-training runs, which fine-tuning grids, and how long they take.

Names are stable functions of the settings, so a rerun finds its own finished work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig, PMPConfig, apply_overrides, read_yaml
from .config import StudyConfig, public_text, resolve, task_label


@dataclass
class Run:
    name: str
    preset: str
    pmp: dict | None  # None: the dense baseline
    sets: list[str] = field(default_factory=list)
    group: str = ""  # the variant (name without the seed): its releases are replicates
    seed: int | None = None  # the pre-training seed (recorded here, privately; null: config's)

    def __post_init__(self):
        self.group = self.group or self.name

    @property
    def run_dir(self) -> Path:
        return Path(self.sets[0].partition("=")[2])


@dataclass
class Plan:
    out: Path
    nproc: int
    runs: list[Run]
    tasks: list
    presets: list[str]
    base: dict  # the pre-training config as every run starts from it
    shadows: dict[str, Run] = field(default_factory=dict)  # variant group -> attacker's run

    def dense(self, preset: str) -> Run:
        return next(r for r in self.runs if r.pmp is None and r.preset == preset)

    def denses(self, preset: str) -> list[Run]:
        return [r for r in self.runs if r.pmp is None and r.preset == preset]

    def variants(self, preset: str) -> list[Run]:
        return [r for r in self.runs if r.pmp is not None and r.preset == preset]

    def grid_dir(self, preset: str, task) -> Path:
        return self.out / "nft" / f"{preset}__{task_label(task)}"

    def shadow_release(self, shadow: Run) -> Path:
        return self.out / "secrecy" / "shadows" / f"{shadow.name}-release"


def default_nproc() -> int:
    if _has_cuda():
        import torch
        return torch.cuda.device_count()
    return 2


def variant_name(preset: str, v: dict) -> str:
    score = "" if v["score"] == "step" else f"_{v['score']}"
    label = f"_{v['label']}" if v.get("label") else ""
    return f"{preset}__r{v['mask_ratio']:g}_{v['mask_source']}_{v['complement']}{score}{label}"


def seeded(name: str, seeds: list[int] | None) -> list[tuple[str, int | None]]:
    """(run name, pre-training seed) per release of a variant; unreplicated: the bare name."""
    return [(name, None)] if not seeds else [(f"{name}__s{s}", s) for s in seeds]


def replicate(seed: int | None) -> list[str]:
    """A replicate release: its own init seed and its own data order."""
    return [] if seed is None else [f"seed={seed}", f"data.shuffle_seed={seed}"]


def make_plan(cfg: StudyConfig, base_dir: Path) -> Plan:
    out = Path(cfg.out_dir)
    base = apply_overrides(read_yaml(resolve(base_dir, cfg.pretrain.config)),
                           cfg.pretrain.overrides)
    presets = cfg.presets or [base.get("model", {}).get("preset", "?")]
    data = [f"data.path={cfg.data.path}", f"data.tokenizer={cfg.data.tokenizer}"]
    runs = []
    for preset in presets:
        common = [*cfg.pretrain.overrides, *data, f"model.preset={preset}"]
        for name, seed in seeded(f"{preset}__dense", cfg.pretrain_seeds):
            runs.append(Run(name, preset, None,
                            [f"run_dir={out / 'runs' / name}", *common, "pmp.enabled=false",
                             *replicate(seed)], group=f"{preset}__dense", seed=seed))
        for v in cfg.variant_settings():
            group = variant_name(preset, v)
            core = {k: v[k] for k in ("mask_ratio", "mask_source", "complement", "score")}
            pmp = {**cfg.pmp, **core, **v["extra"], "enabled": True}
            info = {**core, "label": v["label"], "extra": v["extra"]}
            for name, seed in seeded(group, v["seeds"]):
                runs.append(Run(name, preset, info,
                                [f"run_dir={out / 'runs' / name}", *common,
                                 *(f"pmp.{k}={json.dumps(x)}" for k, x in pmp.items()),
                                 *replicate(seed)], group=group, seed=seed))
    plan = Plan(out, cfg.pretrain.nproc or default_nproc(), runs, list(cfg.finetune.tasks),
                presets, base)
    if cfg.secrecy.wants_shadow():
        for run in runs:
            if run.pmp is not None and run.group not in plan.shadows:
                plan.shadows[run.group] = shadow_run(cfg, plan, run)
    return plan


# Settings that hold a run's secrets (or its place): a shadow run never copies them.
SECRET_SETS = ("run_dir", "seed", "data.shuffle_seed", "data.path", "pmp.mask_seed")


def shadow_run(cfg: StudyConfig, plan: Plan, target: Run) -> Run:
    """The attacker's run for `target`'s variant (one per variant: replicates differ only in
    their secrets). Kerckhoffs: every public setting of the target (preset, recipe, each
    `pmp.*` knob) but its own seeds: init `secrecy.shadow.seed`; data order and mask drawn as
    the public code draws them (with `secret_order: false` the order is the public default,
    which hands the shadow the target's batches: what D1 closes); trained on the public text."""
    spec = cfg.secrecy.shadow
    secret_order = apply_overrides(plan.base, target.sets).get("pmp", {}).get(
        "secret_order", PMPConfig.model_fields["secret_order"].default)
    order = None if secret_order else DataConfig.model_fields["shuffle_seed"].default
    name = f"{target.group}__shadow"
    sets = [f"run_dir={plan.out / 'secrecy' / 'shadows' / name}",
            *(x for x in target.sets if x.partition("=")[0] not in SECRET_SETS),
            f"data.path={public_text(cfg)}", f"seed={json.dumps(spec.seed)}",
            f"data.shuffle_seed={json.dumps(order)}", "pmp.mask_seed=null",
            *([f"train.max_steps={spec.stage2_steps}"] if spec.stage2_steps else []),
            *spec.overrides]
    return Run(name, target.preset, target.pmp, sets, seed=spec.seed)


# --- time estimate ------------------------------------------------------------------------------
def run_steps(plan: Plan, run: Run) -> int:
    raw = apply_overrides(plan.base, run.sets)
    steps = raw["train"]["max_steps"]
    pmp = raw.get("pmp", {})
    if run.pmp is not None and run.pmp["mask_source"] == "earlybird":
        steps += int(pmp.get("warmup_max_steps", 500))  # at most: discovery may stop earlier
    return steps


def measured_tokens_per_s(plan: Plan) -> float | None:
    """Median throughput of finished runs of this study (metrics.jsonl), if any."""
    from ..telemetry import read_metrics
    values = []
    for run in plan.runs:
        if (run.run_dir / "metrics.jsonl").is_file():
            values += [m["perf/tokens_per_s"] for m in read_metrics(run.run_dir)
                       if "perf/tokens_per_s" in m]
    return sorted(values)[len(values) // 2] if values else None


def grid_workers(cfg: StudyConfig, plan: Plan) -> int:
    """Fine-tuning cells side by side (nft/report.py `workers`): a GPU runs one at a time."""
    return 1 if _has_cuda() else (cfg.finetune.workers or plan.nproc)


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def estimate(cfg: StudyConfig, plan: Plan) -> dict:
    """Seconds per stage: pre-training from tokens / throughput (measured when this study has
    run before, else `estimate.pretrain_tokens_per_s`), fine-tuning from cells × steps."""
    e = cfg.estimate
    tps = measured_tokens_per_s(plan) or e.pretrain_tokens_per_s
    seq = cfg.data.seq_len

    def pretrain_s(run: Run) -> float:
        raw = apply_overrides(plan.base, run.sets)
        return e.launch_overhead_s + run_steps(plan, run) * raw["train"]["global_batch_size"] \
            * seq / tps
    per_run = {run.name: pretrain_s(run) for run in plan.runs}
    shadows = {run.name: pretrain_s(run) for run in plan.shadows.values()}
    attacked = sum(run.pmp is not None for run in plan.runs) if cfg.secrecy.enabled else 0
    f = cfg.finetune
    extra = int(f.head_only)
    dense = len(plan.denses(plan.presets[0]))
    per_lr_seed = ((1 + extra) * dense + dense * int(cfg.controls.reparam_alpha is not None)
                   + int(f.scratch) + (2 + int(f.lora) + extra) * len(plan.variants(plan.presets[0])))
    cells = per_lr_seed * len(f.lrs) * len(f.seeds)
    grid = cells * (e.finetune_cell_overhead_s + max(f.steps) * e.finetune_step_s) \
        / grid_workers(cfg, plan)
    return {"pretrain_s": per_run, "tokens_per_s": tps, "cells_per_grid": cells,
            "grid_s": grid, "grids": len(plan.presets) * len(plan.tasks),
            "shadow_s": shadows, "attack_s": e.attack_s, "attacked_releases": attacked,
            "total_s": sum(per_run.values()) + grid * len(plan.presets) * len(plan.tasks)
            + sum(shadows.values()) + e.attack_s * attacked}


def describe(cfg: StudyConfig, plan: Plan, est: dict) -> str:
    lines = [f"study {cfg.title!r} -> {plan.out} ({plan.nproc} ranks per pre-training run)",
             f"pre-training runs ({len(plan.runs)}):"]
    for run in plan.runs:
        kind = "dense" if run.pmp is None else ", ".join(f"{k} {v}" for k, v in run.pmp.items()
                                                         if v not in (None, {}))
        lines.append(f"  {run.name:<48} {kind} | ≤ {run_steps(plan, run)} steps | "
                     f"~{est['pretrain_s'][run.name] / 60:.1f} min")
    f = cfg.finetune
    lines.append(f"fine-tuning grids: {est['grids']} (presets × tasks {[task_label(t) for t in plan.tasks]}), "
                 f"{est['cells_per_grid']} cells each (LRs {f.lrs} × seeds {f.seeds}, up to "
                 f"{max(f.steps)} steps, {grid_workers(cfg, plan)} side by side), "
                 f"~{est['grid_s'] / 60:.1f} min each")
    sec = cfg.secrecy
    if sec.enabled:
        lines.append(f"secrecy attacks on {est['attacked_releases']} PMP releases: "
                     f"{', '.join(sec.attacks)}"
                     + (f" | public text {public_text(cfg)}, K {sec.ks}" if sec.needs_public()
                        else "")
                     + f" | ~{est['attack_s'] / 60:.1f} min per release")
        for run in plan.shadows.values():
            lines.append(f"  shadow run {run.name:<40} ≤ {run_steps(plan, run)} steps | "
                         f"~{est['shadow_s'][run.name] / 60:.1f} min")
    else:
        lines.append("secrecy attacks: off")
    lines.append(f"estimated time: {est['total_s'] / 60:.0f} min (throughput "
                 f"{est['tokens_per_s']:,.0f} tok/s; finished work is reused)")
    return "\n".join(lines)
