"""The non-fine-tunability report: a grid of fine-tuning runs, cached per cell, summarised.

Grid = releases (dense baseline, PMP, optionally a from-scratch reference) × their modes ×
learning rates × durations × seeds, all with one fine-tuning config (same task, data order per
seed, schedule and budget). With the `constant` schedule (warm-up then flat) the state after k
steps of the longest run is exactly the k-step run (same data prefix, same LR), so one run per
(release, mode, LR, seed) serves every duration; decaying schedules run each duration apart.

Selection is by validation, reporting is on test: for each (release, mode, duration) the LR
with the best mean validation metric over seeds is chosen and its test metric reported as
mean ± std over seeds. Gaps between releases are paired by seed (same data order).
Every cell runs on a W=1 ZeRO-3 engine, in this process or, with `workers: N` on a CPU, in N
spawned processes of one thread each (a small model's matmuls do not use a second core, a
second cell does; a cell's result does not depend on where it ran). Finished cells are cached
as `<out_dir>/cells/<cell>.json`, so a rerun resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import apply_overrides
from ..finetune.config import FinetuneConfig, _Strict, parse_finetune_config, read_yaml, validated
from .baselines import cell_failure, drop_failed, majority_baseline
from .summary import write_report
from ..finetune.tasks import build_task, load_hf_tokenizer, task_fingerprint
from ..data.prepare import read_prepared_tokens

log = logging.getLogger("pmp_scale.finetune")
Mode = Literal["unauthorized", "unauthorized-lora", "authorized", "head-only"]


class ReleaseEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    release: str
    mask: str | None = None
    reinit: bool = False  # a from-scratch reference: the release's architecture, fresh init
    modes: list[Mode] = Field(default_factory=lambda: ["unauthorized"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ReleaseEntry":
        if "authorized" in self.modes and self.mask is None:
            raise ValueError(f"release {self.name!r}: mode authorized needs a mask")
        return self


class ReportConfig(_Strict):
    out_dir: str
    finetune: str  # the fine-tuning config every cell starts from (relative to this file)
    overrides: list[str] = Field(default_factory=list)  # KEY=VALUE on that config
    releases: list[ReleaseEntry] = Field(min_length=1)
    lrs: list[float] = Field(min_length=1)
    steps: list[int] = Field(min_length=1)  # fine-tuning durations (optimizer steps)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    min_seeds: int = Field(3, ge=1)
    # Summary roles (names of `releases`): the non-fine-tunability gap is pmp − dense.
    dense: str = "dense"
    pmp: str = "pmp"
    scratch: str | None = None
    # Base quality: validation loss on the pre-training data (a prepared MDS dir), per release.
    pretrain_data: str | None = None
    pretrain_eval_samples: int = Field(64, ge=1)
    title: str = "Non-fine-tunability report"
    # Cells run side by side in this many processes (one thread each; CPU only, a GPU runs
    # one cell at a time). 1: in this process.
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ReportConfig":
        if len(set(self.seeds)) < self.min_seeds:
            raise ValueError(f"seeds: {len(set(self.seeds))} given, every cell needs at least "
                             f"{self.min_seeds} (min_seeds)")
        names = [r.name for r in self.releases]
        if len(set(names)) != len(names):
            raise ValueError(f"releases: duplicate names {names}")
        if self.scratch is not None and self.scratch not in names:
            raise ValueError(f"scratch: {self.scratch!r} is not one of the releases {names}")
        if any(s < 1 for s in self.steps) or any(lr <= 0 for lr in self.lrs):
            raise ValueError("steps and lrs must be positive")
        return self


def parse_report_config(raw: dict) -> ReportConfig:
    return validated(ReportConfig, raw)


def load_report_config(path, overrides: list[str] = ()) -> tuple[ReportConfig, Path]:
    path = Path(path)
    return parse_report_config(apply_overrides(read_yaml(path), list(overrides))), path.parent


# --- cells ----------------------------------------------------------------------------------------
def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() or q.exists() else base / q


def base_finetune_config(cfg: ReportConfig, base_dir: Path) -> dict:
    raw = read_yaml(_resolve(base_dir, cfg.finetune))
    return apply_overrides(raw, cfg.overrides)


def plan_cells(cfg: ReportConfig, base_raw: dict) -> list[dict]:
    """One dict per run: name, entry, mode, lr, seed, run_steps, eval_steps, and its config."""
    schedule = base_raw.get("optim", {}).get("schedule", "constant")
    durations = sorted(set(cfg.steps))
    runs = [(max(durations), durations)] if schedule == "constant" else [(d, [d]) for d in durations]
    # lm: the step-0 validation loss depends on the release only (no new head): evaluate it
    # in the first run of each release and share it (see `_share_step0`). Not for `reinit`
    # entries: their initial weights come from each run's seed.
    share_step0 = parse_finetune_config({**base_raw, "release": "-", "mask": None,
                                         "mode": "unauthorized"}).task.kind == "lm"
    cells = []
    for entry in cfg.releases:
        first = True
        for mode, lr, (run_steps, evals), seed in itertools.product(entry.modes, cfg.lrs, runs,
                                                                    cfg.seeds):
            raw = apply_overrides(base_raw, [])
            raw.update(release=entry.release, mode=mode, seed=seed, mask=entry.mask,
                       reinit=entry.reinit, out_dir=None)
            raw.pop("export", None)  # grid cells are measured, not exported
            raw.setdefault("optim", {})["lr"] = lr
            raw.setdefault("train", {}).update(max_steps=run_steps, eval_steps=evals)
            if share_step0 and not entry.reinit:
                raw["train"]["eval_at_start"] = first
                first = False
            cells.append(dict(name=f"{entry.name}__{mode}__lr{lr:g}__steps{run_steps}__seed{seed}",
                              entry=entry, mode=mode, lr=lr, seed=seed, run_steps=run_steps,
                              durations=evals, config=parse_finetune_config(raw)))
    return cells


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RESULT_FORMAT = 2  # bump when a cell's result.json changes shape: older cells are rerun


def cell_fingerprint(ft: FinetuneConfig, release_sha: str, mask_sha: str | None,
                     task_fp: str) -> str:
    """What a cell's result depends on: its config, the release, the mask, the task's data and
    tokenizer (`tasks.task_fingerprint`)."""
    h = hashlib.sha256(f"format {RESULT_FORMAT}".encode())
    h.update(ft.model_dump_json(exclude={"out_dir"}).encode())
    h.update(release_sha.encode())
    h.update((mask_sha or "").encode())
    h.update(task_fp.encode())
    return h.hexdigest()


def _read_cell(path: Path) -> dict | None:
    """A cached cell, or None when it is absent or unreadable (an interrupted write: rerun it)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s is unreadable (%s): running the cell again", path, err)
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Temp file + rename: a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a worker left by a killed run
    tmp.write_text(text)
    os.replace(tmp, path)


# --- base quality on the pre-training data --------------------------------------------------------
def base_quality(release_path, tokens, batch_size: int = 8) -> dict:
    """Validation loss / perplexity of a release (or a fresh init) on pre-training tokens."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(release_path), local_files_only=True,
                                                 dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            ids = tokens[i:i + batch_size]
            loss = model(input_ids=ids, labels=ids).loss.item()
            n = ids.shape[0] * (ids.shape[1] - 1)
            total, count = total + loss * n, count + n
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50))}


# --- running --------------------------------------------------------------------------------------
def run_grid(cfg: ReportConfig, base_dir: Path, fresh: bool = False, progress: bool = True,
             cells: list[dict] | None = None) -> list[dict]:
    """Run (or load from the cache) every cell; returns the cell results in plan order."""
    from tqdm import tqdm
    from ..finetune.release_check import Release, check_mask
    from ..zero3 import on_cpu
    out = Path(cfg.out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    base_raw = base_finetune_config(cfg, base_dir)
    cells = cells if cells is not None else plan_cells(cfg, base_raw)
    releases, masks, tasks = {}, {}, {}
    allow_unbound = any(c["config"].allow_unbound_mask for c in cells)  # one base config
    for entry in cfg.releases:  # bad inputs fail here, before any run
        rel = Release.open(entry.release)
        releases[entry.name] = rel
        if entry.mask is not None:
            check_mask(entry.mask, rel, allow_unbound)
            masks[entry.name] = _file_digest(Path(entry.mask) / "mask.safetensors")
    todo, results, task_fps, failures = [], {}, {}, []
    for cell in cells:
        rel = releases[cell["entry"].name]
        key = (rel.path, cell["config"].task.model_dump_json())
        if key not in task_fps:
            task_fps[key] = task_fingerprint(cell["config"].task, rel.path)
        fp = cell_fingerprint(cell["config"], rel.sha256, masks.get(cell["entry"].name),
                              task_fps[key])
        cell["fingerprint"] = fp
        path = out / "cells" / f"{cell['name']}.json"
        if not fresh:
            cached = _read_cell(path)
            if cached is not None and cached.get("fingerprint") == fp:
                results[cell["name"]] = cached
                cell["cached"] = True
                continue
        todo.append(cell)
    log.info("grid: %d runs, %d cached, %d to run", len(cells), len(cells) - len(todo), len(todo))
    import sys
    bar = tqdm(total=sum(c["run_steps"] for c in todo), unit="step", desc="nft grid",
               disable=not progress or not todo, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    try:
        if cfg.workers > 1 and len(todo) > 1 and on_cpu():
            _run_in_workers(todo, cfg.workers, out, bar, results, failures)
        else:
            for cell in todo:
                entry = cell["entry"]
                bar.set_postfix_str(f"{entry.name} {cell['mode']} lr {cell['lr']:g} seed {cell['seed']}")
                name, result, failure = _run_cell(cell, releases[entry.name], tasks, out,
                                                  progress=lambda s: bar.update(1))
                if failure is not None:
                    failures.append(failure)
                else:
                    results[name] = result
    finally:
        bar.close()
    return drop_failed(_share_step0, [results[c["name"]] for c in cells if c["name"] in results],
                       failures)


def _run_cell(cell: dict, rel, tasks: dict, out: Path, progress=None):
    """One cell: fine-tune, then write its result atomically. Returns (name, result, failure):
    one cell's failure is reported, not fatal."""
    from ..finetune.train import finetune
    if rel.path not in tasks:
        tasks[rel.path] = build_task(cell["config"].task, load_hf_tokenizer(rel.path))
    t0 = time.perf_counter()
    try:
        result = finetune(cell["config"], task=tasks[rel.path], release=rel, progress=progress)
    except Exception as err:  # noqa: BLE001
        return cell["name"], None, cell_failure(cell["name"], err)
    result.update(cell=cell["name"], release_name=cell["entry"].name,
                  fingerprint=cell["fingerprint"], durations=cell["durations"],
                  wall_s=time.perf_counter() - t0)
    _write_atomic(out / "cells" / f"{cell['name']}.json", json.dumps(result, indent=1))
    return cell["name"], result, None


_WORKER: dict = {}  # per worker process: opened releases and built tasks


def _worker_start(quiet: bool) -> None:
    import torch
    from ..cli import quiet_third_party
    from ..zero3 import ensure_process_group
    if quiet:  # as the entry point that spawned this worker chose
        quiet_third_party()
    torch.set_num_threads(1)
    ensure_process_group()


def _worker_cell(cell: dict, out: str):
    from ..finetune.release_check import Release
    releases = _WORKER.setdefault("releases", {})
    path = cell["entry"].release
    if path not in releases:
        releases[path] = Release.open(path)
    return _run_cell(cell, releases[path], _WORKER.setdefault("tasks", {}), Path(out))


def _run_in_workers(todo: list[dict], workers: int, out: Path, bar, results: dict,
                    failures: list) -> None:
    """The cells in `workers` spawned processes (spawn: a forked DeepSpeed/gloo state is not
    safe to reuse); results are gathered as they finish, each already written to its file."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from .. import cli
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                             initializer=_worker_start,
                             initargs=(cli.THIRD_PARTY_QUIET,)) as pool:
        futures = {pool.submit(_worker_cell, cell, str(out)): cell for cell in todo}
        for fut in as_completed(futures):
            name, result, failure = fut.result()
            bar.update(futures[fut]["run_steps"])
            if failure is not None:
                failures.append(failure)
            else:
                results[name] = result


def _share_step0(results: list[dict]) -> list[dict]:
    """Give runs that skipped the step-0 evaluation the one of their release's first run
    (never skipped by `reinit` runs, whose step 0 depends on the seed)."""
    step0 = {r["release_name"]: (r["curve"][0], r["at"]["0"]) for r in results if "0" in r["at"]}
    for r in results:
        if "0" not in r["at"]:
            curve, at = step0[r["release_name"]]
            r["curve"].insert(0, {**curve, "shared": True})
            r["at"]["0"] = at
    return results


def run_report(cfg: ReportConfig, base_dir: Path, fresh: bool = False,
               progress: bool = True) -> dict:
    """Base quality, the grid, the report. Returns the results.json document."""
    from ..zero3 import ensure_process_group
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_raw = base_finetune_config(cfg, base_dir)
    cells = plan_cells(cfg, base_raw)  # config errors before any work
    base = {}
    if cfg.pretrain_data:
        tokens = read_prepared_tokens(cfg.pretrain_data, "val", cfg.pretrain_eval_samples)
        for entry in cfg.releases:
            if not entry.reinit:
                base[entry.name] = base_quality(entry.release, tokens)
                log.info("base quality %s: val loss %.4f", entry.name, base[entry.name]["loss"])
    ensure_process_group()
    results = run_grid(cfg, base_dir, fresh=fresh, progress=progress, cells=cells)
    timing = {"runs": len(cells), "cached": sum(1 for c in cells if c.get("cached")),
              "wall_s": time.perf_counter() - t0,
              "run_s": sum(r.get("time_s", 0) for r in results)}
    majority = None
    if cells[0]["config"].task.kind == "classification":
        rel = next((e.release for e in cfg.releases if not e.reinit), cfg.releases[0].release)
        majority = majority_baseline(build_task(cells[0]["config"].task, load_hf_tokenizer(rel)))
    return write_report(cfg, results, base, timing, majority)
