"""Running a study: data → pre-training runs → releases → fine-tuning grids → secrecy → claims.

Every step leaves a completion record only after its output is complete (`<run>/study_done.json`,
`releases/<run>.done.json`, the report's per-cell cache, `secrecy/<run>.json`), so a study
killed at any point (SIGKILL included) and run again reuses what finished and redoes nothing
else; an interrupted pre-training run continues from its newest checkpoint (`--resume auto`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from .config import (StudyConfig, StudyError, public_text, reparam_name, report_config, resolve,
                     short, task_label)
from ..launch import child_env, pretrain_command
from .plan import Plan, Run

log = logging.getLogger("pmp_scale.study")
REPO = Path(__file__).resolve().parents[2]


def write_json(path: Path, doc: dict) -> None:
    """Temp file + rename: a kill never leaves half a record under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Ledger:
    """What this invocation did and reused (study.json's `work`; tests read it)."""

    def __init__(self):
        self.done: list[str] = []
        self.reused: list[str] = []

    def record(self, what: str, reused: bool) -> None:
        (self.reused if reused else self.done).append(what)
        log.info("%s %s", "reused" if reused else "done", what)


# --- data ---------------------------------------------------------------------------------------
def prepare_data(cfg: StudyConfig, ledger: Ledger) -> None:
    import glob
    from ..data import prepare_dataset, train_sentencepiece
    d = cfg.data
    tok = Path(d.tokenizer)
    if not tok.exists():
        tok.parent.mkdir(parents=True, exist_ok=True)
        tmp = tok.parent / f".{tok.stem}.tmp"
        made = Path(train_sentencepiece(sorted(glob.glob(d.corpus)), str(tmp), d.vocab_size))
        for suffix in (".vocab", ".model"):  # the .model last: its presence means complete
            if made.with_suffix(suffix).exists():
                os.replace(made.with_suffix(suffix), tok.with_suffix(suffix))
        ledger.record(f"tokenizer {tok}", False)
    if not (Path(d.path) / "meta.json").is_file():
        prepare_dataset(sorted(glob.glob(d.corpus)), str(tok), Path(d.path), seq_len=d.seq_len,
                        val_fraction=d.val_fraction, overwrite=True, progress=False)
        ledger.record(f"data {d.path}", False)


# --- pre-training -------------------------------------------------------------------------------
def pretrain(cfg: StudyConfig, base_dir: Path, plan: Plan, run: Run, ledger: Ledger) -> None:
    """One run through the project's launcher, resumed from its newest checkpoint if any."""
    marker = run.run_dir / "study_done.json"
    done = read_json(marker)
    if done is not None:
        if done.get("sets", run.sets) != run.sets:
            changed = sorted(set(run.sets) ^ set(done["sets"]))
            raise StudyError(f"run {run.name} finished with other settings ({changed[0]} ...): "
                             f"delete {run.run_dir} to redo it, or use another out_dir")
        ledger.record(f"pre-training {run.name}", True)
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = pretrain_command(resolve(base_dir, cfg.pretrain.config), plan.nproc, run.sets)
    t0 = time.perf_counter()
    with open(run.run_dir / "launch.log", "a") as out:
        out.write(f"\n# study launch {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(os.environ.get("STUDY_OMP_THREADS", "1")),
                               cwd=REPO)
    if code != 0:
        lines = (run.run_dir / "launch.log").read_text(errors="replace").splitlines()
        why = next((ln for ln in reversed(lines) if ln.startswith("error")), lines[-1] if lines else "")
        raise StudyError(f"pre-training run {run.name} failed (exit {code}): {why.strip()} "
                         f"(log: {run.run_dir / 'launch.log'})")
    if run.pmp is not None and not (run.run_dir / "private" / "mask" / "mask.json").is_file():
        raise StudyError(f"pre-training run {run.name} ended without its private mask")
    write_json(marker, {"name": run.name, "sets": run.sets, "wall_s": time.perf_counter() - t0,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    ledger.record(f"pre-training {run.name}", False)


def release(plan: Plan, run: Run, ledger: Ledger, out: Path | None = None) -> Path:
    """The run's release (default <out_dir>/releases/<run>), its record written after it."""
    from ..release import release_checkpoint, resolve_checkpoint
    out = out or plan.out / "releases" / run.name
    marker = out.with_name(f"{out.name}.done.json")
    if read_json(marker) is not None and out.is_dir():
        ledger.record(f"release {run.name}", True)
        return out
    private = run.run_dir / "private" / "mask" if run.pmp is not None else None
    sha = release_checkpoint(resolve_checkpoint(run.run_dir), out, overwrite=True,
                             private_dir=private, progress=False)
    write_json(marker, {"sha256": sha})
    ledger.record(f"release {run.name}", False)
    return out


# --- fine-tuning grids --------------------------------------------------------------------------
def reparam_release(cfg: StudyConfig, plan: Plan, dense: Run, ledger: Ledger) -> Path:
    """The positive control: the dense release reparameterised (controls.py)."""
    from .controls import reparameterise
    name = reparam_name(dense)
    out = plan.out / "releases" / name
    marker = plan.out / "releases" / f"{name}.done.json"
    alpha = cfg.controls.reparam_alpha
    done = read_json(marker)
    if done is not None and done.get("alpha") == alpha and out.is_dir():
        ledger.record(f"release {name}", True)
        return out
    reparameterise(plan.out / "releases" / dense.name, out, alpha)
    write_json(marker, {"alpha": alpha, "source": dense.name})
    ledger.record(f"release {name}", False)
    return out


def run_grid(cfg: StudyConfig, base_dir: Path, plan: Plan, preset: str, task, ledger: Ledger,
             progress: bool) -> dict:
    from ..nft.report import parse_report_config, run_report
    rc = parse_report_config(report_config(cfg, base_dir, plan, preset, task))
    cells_dir = Path(rc.out_dir) / "cells"
    before = {p.name: p.stat().st_mtime_ns for p in cells_dir.glob("*.json")} \
        if cells_dir.is_dir() else {}
    doc = run_report(rc, base_dir, progress=progress)
    ledger.record(f"grid {preset}/{task_label(task)}: {doc['timing']['cached']} of "
                  f"{doc['timing']['runs']} cells reused", doc["timing"]["cached"] == doc["timing"]["runs"])
    doc["cells_before"] = len(before)
    return doc


# --- the mechanism ------------------------------------------------------------------------------
def curvature(cfg: StudyConfig, plan: Plan, preset: str, ledger: Ledger) -> dict:
    """Per release of `preset` (controls included): curvature on the mask, the complement and
    all weights. Dense releases use the index sets of the first PMP run's mask (early-bird
    preferred). Cached per release in <out>/curvature/."""
    from ..data.prepare import read_prepared_tokens
    from .curvature import release_curvature
    pmp = sorted(plan.variants(preset), key=lambda r: r.pmp["mask_source"] != "earlybird")
    if not pmp:
        return {}
    ref = pmp[0]
    names = [(r.name, r, r) for r in pmp] + [(d.name, d, ref) for d in plan.denses(preset)]
    if cfg.controls.reparam_alpha is not None:
        names += [(reparam_name(d), d, ref) for d in plan.denses(preset)]
    tokens = None
    out = {}
    for name, run, mask_run in names:
        path = plan.out / "curvature" / f"{name}.json"
        key = {"samples": cfg.curvature.samples, "iters": cfg.curvature.iters,
               "mask_from": short(mask_run.name)}
        cached = read_json(path)
        if cached is not None and cached.get("key") == key:
            out[short(name)] = cached["result"]
            ledger.record(f"curvature {name}", True)
            continue
        if tokens is None:
            tokens = read_prepared_tokens(cfg.data.path, "val", cfg.curvature.samples)
        res = release_curvature(plan.out / "releases" / name,
                                mask_run.run_dir / "private" / "mask", tokens,
                                iters=cfg.curvature.iters)
        res["mask_from"] = key["mask_from"]
        write_json(path, {"key": key, "result": res})
        out[short(name)] = res
        ledger.record(f"curvature {name}", False)
    return out


# --- secrecy ------------------------------------------------------------------------------------
def shadow(cfg: StudyConfig, base_dir: Path, plan: Plan, group: str, ledger: Ledger) -> dict:
    """The attacker's own PMP run for a variant (plan.shadow_run), pre-trained and released
    like the study's runs: recorded only once complete, reused by a rerun."""
    run = plan.shadows[group]
    pretrain(cfg, base_dir, plan, run, ledger)
    out = release(plan, run, ledger, plan.shadow_release(run))
    marker = read_json(out.with_name(f"{out.name}.done.json")) or {}
    return {"name": run.name, "sets": run.sets, "release": str(out),
            "mask": str(run.run_dir / "private" / "mask"), "release_sha256": marker.get("sha256")}


def secrecy_key(cfg: StudyConfig, plan: Plan, run: Run, shadow_info: dict | None) -> dict:
    """Everything a secrecy result depends on: a cached one is reused only under the same key
    (attacks, K, public text, the release and the shadow run, by their sha256)."""
    sec = cfg.secrecy
    marker = read_json(plan.out / "releases" / f"{run.name}.done.json") or {}
    return {"attacks": list(sec.attacks), "ks": list(sec.ks),
            "public": public_text(cfg) if sec.needs_public() else None,
            "release_sha256": marker.get("sha256"),
            "shadow": None if shadow_info is None else
            {k: shadow_info[k] for k in ("name", "sets", "release_sha256")}}


def secrecy(cfg: StudyConfig, plan: Plan, run: Run, release_dir: Path, ledger: Ledger,
            shadow_info: dict | None = None) -> dict:
    """The attack suite on one PMP release, cached in <out_dir>/secrecy/<run>.json with its key
    (the full report in <out_dir>/secrecy/<run>/attack.md)."""
    from .secrecy import mask_secrecy
    path = plan.out / "secrecy" / f"{run.name}.json"
    key = secrecy_key(cfg, plan, run, shadow_info)
    cached = read_json(path)
    if cached is not None and cached.get("key") == key:
        ledger.record(f"secrecy {run.name}", True)
        return cached["result"]
    work = plan.out / "secrecy" / run.name
    shutil.rmtree(work, ignore_errors=True)
    doc = mask_secrecy(release_dir, work, run.run_dir / "private" / "mask", cfg.secrecy.attacks,
                       public=key["public"], ks=cfg.secrecy.ks,
                       shadow=None if shadow_info is None else
                       {"release": shadow_info["release"], "mask": shadow_info["mask"]})
    write_json(path, {"key": key, "result": doc})
    ledger.record(f"secrecy {run.name}", False)
    return doc
