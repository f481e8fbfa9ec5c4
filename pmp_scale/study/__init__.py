"""One command for a whole study: `tools/study.py --config configs/study/<name>.yaml`.

Data → dense + every PMP variant pre-trained through the launcher, one release per
pre-training seed → releases (+ the reparameterised dense releases, the positive control) →
secrecy attacks (with the attacker's own shadow run per variant when asked) → curvature on the
mask and its complement per release → the non-fine-tunability grid per (preset, task) → the
claims table, releases as the unit (stats.py), beside the controls and the secrecy table
(study.md, study.json, plots). Killed at any point and rerun, it reuses everything that
finished (see run.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import StudyConfig, StudyError, load_study, task_label, validate
from .plan import Plan, estimate, make_plan

log = logging.getLogger("pmp_scale.study")

__all__ = ["StudyConfig", "StudyError", "load_study", "prepare", "run_study"]


def prepare(path, overrides=()) -> tuple[StudyConfig, Path, Plan]:
    """Load, plan and validate: every bad input fails here, before any run."""
    cfg, base_dir = load_study(path, overrides)
    plan = make_plan(cfg, base_dir)
    validate(cfg, base_dir, plan)
    return cfg, base_dir, plan


def run_info(plan: Plan) -> dict:
    """Per run: preset, PMP settings, throughput (median tokens/s) and the discovery trace."""
    import json
    from ..telemetry import read_metrics
    out = {}
    for run in plan.runs:
        tps = [m["perf/tokens_per_s"] for m in read_metrics(run.run_dir)
               if "perf/tokens_per_s" in m] if (run.run_dir / "metrics.jsonl").is_file() else []
        meta = run.run_dir / "private" / "mask" / "mask.json"
        disc = json.loads(meta.read_text()).get("discovery") if meta.is_file() else None
        if disc is not None:
            disc["score"] = (run.pmp or {}).get("score", "step")
        out[run.name] = {"preset": run.preset, "pmp": run.pmp,
                         "short": run.name.split("__", 1)[1], "seed": run.seed,
                         "group": run.group.split("__", 1)[1],
                         "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
                         "discovery": disc}
    return out


def run_study(cfg: StudyConfig, base_dir: Path, plan: Plan, progress: bool = True) -> dict:
    from tqdm import tqdm
    from . import run as r
    from .claims import claims, control_rows, instability, variant_rows
    from .secrecy import secrecy_rows
    from .write import write_outputs
    import os
    import torch
    if not torch.cuda.is_available():  # in-process work (grids, curvature): as the ranks get
        torch.set_num_threads(int(os.environ.get("STUDY_OMP_THREADS", "1")))
    t0 = time.perf_counter()
    est = estimate(cfg, plan)
    ledger = r.Ledger()
    bar = tqdm(total=round(est["total_s"]), unit="s", desc="study (estimated s)",
               disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} est. s [{elapsed}<{remaining}]")

    def advance(seconds: float, what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(min(round(seconds), bar.total - bar.n))

    r.prepare_data(cfg, ledger)
    releases, secrecy = {}, {}
    for run in plan.runs:
        bar.set_postfix_str(f"pre-training {run.name}")
        r.pretrain(cfg, base_dir, plan, run, ledger)
        releases[run.name] = r.release(plan, run, ledger)
        advance(est["pretrain_s"][run.name], run.name)
    if cfg.controls.reparam_alpha is not None:
        for run in plan.runs:
            if run.pmp is None:
                r.reparam_release(cfg, plan, run, ledger)
    shadows = {}  # variant group -> the attacker's shadow run, released
    for run in plan.runs:
        if run.pmp is not None and cfg.secrecy.enabled:
            if run.group in plan.shadows and run.group not in shadows:
                bar.set_postfix_str(f"shadow run for {run.group}")
                shadows[run.group] = r.shadow(cfg, base_dir, plan, run.group, ledger)
                advance(est["shadow_s"][plan.shadows[run.group].name], "shadow run")
            bar.set_postfix_str(f"attacks on {run.name}")
            secrecy[run.name] = r.secrecy(cfg, plan, run, releases[run.name], ledger,
                                          shadows.get(run.group))
            advance(est["attack_s"], run.name)
    curv = {}
    if cfg.curvature.enabled:
        for preset in plan.presets:
            bar.set_postfix_str(f"curvature {preset}")
            curv.update({f"{preset} / {k}": v for k, v in
                         r.curvature(cfg, plan, preset, ledger).items()})
    grids, docs = {}, {}
    for preset in plan.presets:
        for task in plan.tasks:
            bar.set_postfix_str(f"fine-tuning grid {preset}/{task_label(task)}")
            doc = r.run_grid(cfg, base_dir, plan, preset, task, ledger, progress=False)
            docs[(preset, task_label(task))] = doc
            grids[f"{preset}/{task_label(task)}"] = str(plan.grid_dir(preset, task) / "report.md")
            advance(est["grid_s"], f"grid {preset}/{task_label(task)}")
    bar.close()
    runs = run_info(plan)
    rows = variant_rows(docs, runs, secrecy, cfg)
    controls = control_rows(docs, runs)
    doc = {"title": cfg.title, "config": cfg.model_dump(mode="json"), "runs": runs,
           "grids": grids, "variants": rows, "controls": controls, "curvature": curv,
           "instability": instability(docs),
           "claims": claims(rows, cfg, controls),
           "secrecy": secrecy,
           "secrecy_table": secrecy_rows(rows, runs, secrecy, cfg.pmp),
           "shadows": shadows,
           "secrecy_source": next((s.get("source") for s in secrecy.values()), None),
           "estimate": est, "wall_s": time.perf_counter() - t0,
           "work": {"done": ledger.done, "reused": ledger.reused}}
    write_outputs(plan.out, doc)
    return doc
