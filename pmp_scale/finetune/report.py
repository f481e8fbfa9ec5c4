"""The non-fine-tunability report: a grid of fine-tuning runs, cached per cell, summarised.

Grid = releases (dense baseline, PMP, optionally a from-scratch reference) × their modes ×
learning rates × durations × seeds, all with one fine-tuning config (same task, data order per
seed, schedule and budget). With the `constant` schedule (warm-up then flat) the state after k
steps of the longest run is exactly the k-step run (same data prefix, same LR), so one run per
(release, mode, LR, seed) serves every duration; decaying schedules run each duration apart.

Selection is by validation, reporting is on test: for each (release, mode, duration) the LR
with the best mean validation metric over seeds is chosen and its test metric reported as
mean ± std over seeds. Gaps between releases are paired by seed (same data order).
Every cell runs in this process on one W=1 ZeRO-3 engine setup; finished cells are cached as
`<out_dir>/cells/<cell>.json`, so a rerun resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ..config import ConfigError, format_validation_error, apply_overrides
from .config import FinetuneConfig, _Strict, parse_finetune_config, read_yaml
from .baselines import (cell_failure, classification_baselines, drop_failed, majority_baseline,
                        render_baselines)
from .tasks import build_task, load_hf_tokenizer, task_fingerprint

log = logging.getLogger("pmp_scale.finetune")
Mode = Literal["unauthorized", "unauthorized-lora", "authorized"]


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
    """Validated report config; bad input is one ConfigError line, not a pydantic traceback."""
    try:
        return ReportConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


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
        for mode in entry.modes:
            for lr in cfg.lrs:
                for run_steps, evals in runs:
                    for seed in cfg.seeds:
                        raw = apply_overrides(base_raw, [])
                        raw.update(release=entry.release, mode=mode, seed=seed,
                                   mask=entry.mask, reinit=entry.reinit, out_dir=None)
                        raw.pop("export", None)  # grid cells are measured, not exported
                        raw.setdefault("optim", {})["lr"] = lr
                        raw.setdefault("train", {}).update(max_steps=run_steps, eval_steps=evals)
                        if share_step0 and not entry.reinit:
                            raw["train"]["eval_at_start"] = first
                            first = False
                        ft = parse_finetune_config(raw)
                        name = f"{entry.name}__{mode}__lr{lr:g}__steps{run_steps}__seed{seed}"
                        cells.append(dict(name=name, entry=entry, mode=mode, lr=lr, seed=seed,
                                          run_steps=run_steps, durations=evals, config=ft))
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- base quality on the pre-training data --------------------------------------------------------
def read_prepared_tokens(data_dir, split: str = "val", limit: int | None = None):
    """LongTensor[N, seq_len] from prepared MDS shards, read directly (no streaming loader, so no
    shared memory: safe beside running jobs)."""
    import tempfile

    import numpy as np
    import torch
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    from ..data import DataError, read_meta
    read_meta(str(data_dir))
    split_dir = Path(data_dir) / split
    index = json.loads((split_dir / "index.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shard in index["shards"]:
            root = Path(data_dir)
            raw = split_dir / shard["raw_data"]["basename"]
            if not raw.is_file():  # only the compressed shard is present: unpack into tmp
                (Path(tmp) / split).mkdir(exist_ok=True)
                zipped = split_dir / shard["zip_data"]["basename"]
                (Path(tmp) / split / raw.name).write_bytes(
                    decompress(shard["compression"], zipped.read_bytes()))
                root = Path(tmp)
            reader = reader_from_json(str(root), split, shard)
            for i in range(reader.samples):
                rows.append(np.asarray(reader.get_item(i)["tokens"], dtype=np.int64))
                if limit is not None and len(rows) >= limit:
                    break
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{split_dir}: no samples")
    return torch.from_numpy(np.stack(rows))


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
    from .train import Release, check_mask, finetune
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
        for cell in todo:
            entry, rel = cell["entry"], releases[cell["entry"].name]
            bar.set_postfix_str(f"{entry.name} {cell['mode']} lr {cell['lr']:g} seed {cell['seed']}")
            tok_key = rel.path
            if tok_key not in tasks:
                tasks[tok_key] = build_task(cell["config"].task, load_hf_tokenizer(rel.path))
            t0 = time.perf_counter()
            try:
                result = finetune(cell["config"], task=tasks[tok_key], release=rel,
                                  progress=lambda s: bar.update(1))
            except Exception as err:  # noqa: BLE001 - one cell's failure is reported, not fatal
                failures.append(cell_failure(cell["name"], err))
                continue
            result.update(cell=cell["name"], release_name=entry.name,
                          fingerprint=cell["fingerprint"], durations=cell["durations"],
                          wall_s=time.perf_counter() - t0)
            _write_atomic(out / "cells" / f"{cell['name']}.json", json.dumps(result, indent=1))
            results[cell["name"]] = result
    finally:
        bar.close()
    return drop_failed(_share_step0, [results[c["name"]] for c in cells if c["name"] in results],
                       failures)


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


# --- summarising ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    if any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: ReportConfig, results: list[dict]) -> dict:
    """Per (release, mode, duration, lr): mean ± std over seeds of the test metric after
    fine-tuning, before it (step 0) and the gain (improvement, > 0 = better); best LR by
    validation."""
    metric = results[0]["metric"]
    higher = results[0]["higher_is_better"]
    sign = 1.0 if higher else -1.0
    groups: dict[tuple, dict] = {}
    for r in results:
        before = r["at"]["0"]["test"][metric]
        for d in r["durations"]:
            key = (r["release_name"], r["mode"], d, r["lr"])
            g = groups.setdefault(key, {"seeds": {}})
            after = r["at"][str(d)]["test"][metric]
            g["seeds"][r["seed"]] = {
                "validation": r["at"][str(d)]["validation"][metric],
                "test": after, "before": before, "gain": sign * (after - before),
                "test_all": r["at"][str(d)]["test"], "diverged": r["diverged"]}
    table = []
    for (name, mode, d, lr), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                       kv[0][2], kv[0][3])):
        seeds = g["seeds"]
        vm, vs = _mean_std([s["validation"] for s in seeds.values()])
        tm, ts = _mean_std([s["test"] for s in seeds.values()])
        bm, bs = _mean_std([s["before"] for s in seeds.values()])
        gm, gs = _mean_std([s["gain"] for s in seeds.values()])
        table.append(dict(release=name, mode=mode, steps=d, lr=lr, n_seeds=len(seeds),
                          val_mean=vm, val_std=vs, test_mean=tm, test_std=ts,
                          test_min=min(s["test"] for s in seeds.values()),
                          test_max=max(s["test"] for s in seeds.values()),
                          before_mean=bm, before_std=bs, gain_mean=gm, gain_std=gs,
                          diverged=sum(s["diverged"] for s in seeds.values()),
                          per_seed={str(k): v["test"] for k, v in sorted(seeds.items())},
                          per_seed_gain={str(k): v["gain"] for k, v in sorted(seeds.items())}))

    def better(a, b):
        if math.isnan(b):
            return True
        if math.isnan(a):
            return False
        return a > b if higher else a < b

    best = {}
    for row in table:
        key = (row["release"], row["mode"], row["steps"])
        if key not in best or better(row["val_mean"], best[key]["val_mean"]):
            best[key] = row
    return {"metric": metric, "higher_is_better": higher, "table": table,
            "best": [best[k] for k in sorted(best)]}


def gaps(cfg: ReportConfig, summary: dict) -> list[dict]:
    """Paired-by-seed differences at each duration (selected LRs), oriented so that positive =
    the first is worse: of the test metric after fine-tuning (`mean`), before it (`before`),
    and of the gain from fine-tuning (`gain_mean`: the second's gain minus the first's)."""
    sign = -1.0 if summary["higher_is_better"] else 1.0
    best = {(r["release"], r["mode"], r["steps"]): r for r in summary["best"]}
    steps = sorted({r["steps"] for r in summary["best"]})
    pairs = [("non-fine-tunability gap: PMP unauthorized vs dense unauthorized",
              (cfg.pmp, "unauthorized"), (cfg.dense, "unauthorized")),
             ("LoRA gap: PMP LoRA vs dense unauthorized",
              (cfg.pmp, "unauthorized-lora"), (cfg.dense, "unauthorized")),
             ("authorized recovery: PMP unauthorized vs PMP authorized",
              (cfg.pmp, "unauthorized"), (cfg.pmp, "authorized")),
             ("authorized vs dense: PMP authorized vs dense unauthorized",
              (cfg.pmp, "authorized"), (cfg.dense, "unauthorized"))]
    if cfg.scratch:
        pairs.append(("pre-training transfer: scratch vs dense unauthorized",
                      (cfg.scratch, "unauthorized"), (cfg.dense, "unauthorized")))
        pairs.append(("PMP unauthorized vs scratch (≤ 0: no better than no pre-training)",
                      (cfg.pmp, "unauthorized"), (cfg.scratch, "unauthorized")))
    out = []
    for label, a, b in pairs:
        for d in steps:
            ra, rb = best.get((*a, d)), best.get((*b, d))
            if ra is None or rb is None:
                continue
            common = sorted(set(ra["per_seed"]) & set(rb["per_seed"]))
            diffs = [sign * (ra["per_seed"][s] - rb["per_seed"][s]) for s in common]
            gains = [rb["per_seed_gain"][s] - ra["per_seed_gain"][s] for s in common]
            m, s = _mean_std(diffs)
            gm, gs = _mean_std(gains)
            out.append(dict(label=label, a=list(a), b=list(b), steps=d, lr_a=ra["lr"],
                            lr_b=rb["lr"], mean=m, std=s, n=len(diffs), per_seed=diffs,
                            before=sign * (ra["before_mean"] - rb["before_mean"]),
                            gain_mean=gm, gain_std=gs, per_seed_gain=gains))
    return out


# --- writing --------------------------------------------------------------------------------------
def _pm(m: float, s: float, digits: int = 3) -> str:
    if m is None or math.isnan(m):
        return "n/a (diverged)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_report(cfg: ReportConfig, results: list[dict], base: dict, timing: dict,
                 majority: dict | None = None) -> dict:
    out = Path(cfg.out_dir)
    summary = summarise(cfg, results)
    gap_rows = gaps(cfg, summary)
    plots = make_plots(cfg, results, summary, out)
    metric, higher = summary["metric"], summary["higher_is_better"]
    first = results[0]
    doc = {"title": cfg.title, "config": cfg.model_dump(mode="json"), "metric": metric,
           "higher_is_better": higher, "task": first["task"], "base": base,
           "summary": summary, "gaps": gap_rows, "plots": plots, "timing": timing,
           "baselines": classification_baselines(cfg, summary, majority),
           "failed": getattr(results, "failures", []),
           "cells": [{k: r[k] for k in ("cell", "release_name", "mode", "lr", "seed",
                                        "max_steps", "at", "curve", "train_loss", "params",
                                        "diverged", "time_s") if k in r}
                     | ({"backbone": r["backbone"]} if "backbone" in r else {})
                     for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=float))
    (out / "report.md").write_text(render_markdown(cfg, doc, results))
    return doc


def _arrow(higher: bool) -> str:
    return "higher is better" if higher else "lower is better"


def render_markdown(cfg: ReportConfig, doc: dict, results: list[dict]) -> str:
    metric, higher = doc["metric"], doc["higher_is_better"]
    best = doc["summary"]["best"]
    lines = [f"# {cfg.title}", ""]
    ft = results[0]["config"]
    lines += [f"Task `{doc['task']}` (metric: test {metric}, {_arrow(higher)}; "
              f"{'perplexity = exp(loss)' if metric == 'loss' else 'F1/Matthews in results.json'}). "
              f"Every cell: {len(cfg.seeds)} seeds (mean ± std over seeds), micro-batch "
              f"{ft['train']['micro_batch_size']}, global batch {ft['train']['global_batch_size']}, "
              f"{ft['optim']['schedule']} schedule with {ft['optim']['warmup_steps']} warm-up steps, "
              f"AdamW wd {ft['optim']['weight_decay']}, clip {ft['optim']['grad_clip']}; "
              f"LRs {cfg.lrs}; durations {sorted(set(cfg.steps))} steps. The LR is selected per "
              "(release, mode, duration) by mean validation metric; test is reported.", ""]
    # summary table
    lines += ["## Summary", ""]
    base = doc["base"]
    steps_all = sorted({r["steps"] for r in best})
    head = ["release", "mode", "base: pre-training val loss (ppl)", f"before FT: test {metric}",
            *[f"after {d} steps: test {metric} (gain)" for d in steps_all], "selected LRs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {}
    for r in best:
        by.setdefault((r["release"], r["mode"]), {})[r["steps"]] = r
    for (name, mode), rows in by.items():
        b = base.get(name)
        bq = f"{b['loss']:.3f} ({b['ppl']:.1f})" if b else "—"
        first = rows[min(rows)]
        cells = [name, mode, bq, _pm(first["before_mean"], first["before_std"])]
        cells += [f"{_pm(rows[d]['test_mean'], rows[d]['test_std'])} "
                  f"({rows[d]['gain_mean']:+.3f})" for d in sorted(rows)]
        cells.append(" / ".join(f"{rows[d]['lr']:g}" for d in sorted(rows)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *render_baselines(doc.get("baselines"), cfg)]
    if doc.get("failed"):
        lines += [f"**{len(doc['failed'])} cell(s) failed** (left out of every table):", ""]
        lines += [f"- `{f['cell']}`: {f['error']}" for f in doc["failed"]] + [""]
    lines += ["Gain = improvement of the test metric over the release before fine-tuning "
              "(positive = better).", "",
              "### Gaps (paired by seed; positive = the first is worse)", "",
              "| comparison | steps | LRs | Δ before FT | Δ after FT | Δ gain |",
              "|---|---|---|---|---|---|"]
    for g in doc["gaps"]:
        lines.append(f"| {g['label']} | {g['steps']} | {g['lr_a']:g} / {g['lr_b']:g} | "
                     f"{g['before']:.3f} | {_pm(g['mean'], g['std'])} | "
                     f"{_pm(g['gain_mean'], g['gain_std'])} |")
    lines += ["", f"Δ in test {metric}, mean ± std over n = {doc['gaps'][0]['n'] if doc['gaps'] else 0} "
              "seeds; Δ gain = the second's gain minus the first's (> 0: the first gains less from "
              "fine-tuning)."]
    lines += ["", _verdict(cfg, doc), ""]
    # complement integrity
    integ = [r for r in results if "backbone" in r]
    if integ:
        lines += ["### Backbone integrity", "",
                  "| mode | runs | backbone elements changed | complement elements changed |",
                  "|---|---|---|---|"]
        agg = {}
        for r in integ:
            a = agg.setdefault((r["release_name"], r["mode"]), [0, 0, 0, 0, 0])
            b = r["backbone"]
            a[0] += 1
            a[1] += b["changed"]
            a[2] += b["elements"]
            a[3] += b.get("complement_changed", 0)
            a[4] += b.get("complement", 0)
        for (name, mode), a in agg.items():
            lines.append(f"| {name} {mode} | {a[0]} | {a[1]:,} of {a[2]:,} | "
                         f"{a[3]:,} of {a[4]:,} |")
        lines.append("")
    # full grid
    lines += ["## Full grid (test " + metric + ", mean ± std over seeds; min–max)", "",
              "| release | mode | steps | LR | val | test | min–max | diverged |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["summary"]["table"]:
        lines.append(f"| {r['release']} | {r['mode']} | {r['steps']} | {r['lr']:g} | "
                     f"{_pm(r['val_mean'], r['val_std'])} | {_pm(r['test_mean'], r['test_std'])} | "
                     f"{r['test_min']:.3f}–{r['test_max']:.3f} | {r['diverged']} |")
    lines += ["", "## Plots", ""]
    for title, path in doc["plots"].items():
        lines += [f"![{title}]({path})", ""]
    t = doc["timing"]
    lines += ["## Run", "",
              f"{t.get('runs', 0)} runs ({t.get('cached', 0)} from the cache), "
              f"{t.get('wall_s', 0):.0f} s wall; the releases: " +
              ", ".join(f"`{e.name}` = {e.release}" + (" (fresh init)" if e.reinit else "") +
                        (f" + mask {e.mask}" if e.mask else "") for e in cfg.releases), ""]
    return "\n".join(lines)


def _verdict(cfg: ReportConfig, doc: dict) -> str:
    """One factual sentence on the headline gap at the longest duration (no claims beyond it)."""
    rows = [g for g in doc["gaps"] if g["label"].startswith("non-fine-tunability")]
    if not rows:
        return ""
    g = max(rows, key=lambda r: r["steps"])
    if math.isnan(g["mean"]):
        return "The headline gap is undefined (a run diverged)."
    noise = 2 * g["std"] / math.sqrt(max(1, g["n"]))
    if abs(g["mean"]) <= noise:
        what = "not distinguishable from zero at this scale (|mean| ≤ 2 standard errors)"
    elif g["mean"] > 0:
        what = "positive: the PMP release fine-tuned worse than the dense one without the mask"
    else:
        what = "negative: the PMP release fine-tuned better than the dense one without the mask"
    return (f"Measured: after {g['steps']} steps the non-fine-tunability gap is "
            f"{g['mean']:.3f} ± {g['std']:.3f} ({doc['metric']}, n={g['n']} seeds) — {what}. "
            f"Before fine-tuning the two releases already differed by {g['before']:.3f}; the "
            f"dense release's gain from fine-tuning minus the PMP release's: "
            f"{g['gain_mean']:.3f} ± {g['gain_std']:.3f}.")


def make_plots(cfg: ReportConfig, results: list[dict], summary: dict, out: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = summary["metric"]
    plots = {}
    series = sorted({(r["release"], r["mode"]) for r in summary["table"]})
    durations = sorted({r["steps"] for r in summary["table"]})
    # 1. metric vs LR per mode, one panel per duration
    fig, axes = plt.subplots(1, len(durations), figsize=(5 * len(durations), 4), squeeze=False)
    for ax, d in zip(axes[0], durations):
        for name, mode in series:
            rows = sorted((r for r in summary["table"] if r["release"] == name and
                           r["mode"] == mode and r["steps"] == d), key=lambda r: r["lr"])
            ax.errorbar([r["lr"] for r in rows], [r["test_mean"] for r in rows],
                        yerr=[r["test_std"] for r in rows], marker="o", capsize=3,
                        label=f"{name} {mode}")
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(cfg.lrs)), [f"{lr:g}" for lr in sorted(set(cfg.lrs))])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"after {d} steps")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_lr.png", dpi=110)
    plt.close(fig)
    plots["test metric vs learning rate"] = "metric_vs_lr.png"
    # 2. training curves at the selected LR of the longest duration
    dmax = durations[-1]
    best = {(r["release"], r["mode"]): r["lr"] for r in summary["best"] if r["steps"] == dmax}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, mode in series:
        runs = [r for r in results if r["release_name"] == name and r["mode"] == mode
                and r["lr"] == best.get((name, mode)) and r["max_steps"] == max(
                    x["max_steps"] for x in results)]
        if not runs:
            continue
        steps = [p["step"] for p in runs[0]["curve"]]
        vals = [[p[metric] for p in r["curve"]] for r in runs if len(r["curve"]) == len(steps)]
        mean = [statistics.fmean(v) for v in zip(*vals)]
        line, = ax1.plot(steps, mean, marker=".", label=f"{name} {mode} (lr {best[(name, mode)]:g})")
        ax1.fill_between(steps, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)],
                         alpha=0.2, color=line.get_color())
        tl = [[x[1] for x in r["train_loss"]] for r in runs]
        n = min(len(t) for t in tl)
        ax2.plot(range(1, n + 1), [statistics.fmean(v[:n]) for v in zip(*[t[:n] for t in tl])],
                 color=line.get_color(), label=f"{name} {mode}")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"validation {metric}")
    ax1.set_title("validation (mean over seeds, band = min–max)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss")
    ax2.set_title("training loss (mean over seeds)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    plots["training curves"] = "curves.png"
    # 3. summary bars: before FT and after each duration, selected LR
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.9 * len(series) * (len(durations) + 1))), 4))
    width = 0.8 / (len(durations) + 1)
    for i, (name, mode) in enumerate(series):
        rows = {r["steps"]: r for r in summary["best"] if r["release"] == name and r["mode"] == mode}
        first = rows[min(rows)]
        vals = [(first["before_mean"], first["before_std"], "before FT")]
        vals += [(rows[d]["test_mean"], rows[d]["test_std"], f"after {d} steps") for d in durations
                 if d in rows]
        for j, (m, s, lab) in enumerate(vals):
            ax.bar(i + j * width, m, width, yerr=s, capsize=2, color=f"C{j}",
                   label=lab if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(series))])
    ax.set_xticklabels([f"{n}\n{m}" for n, m in series], fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"test {metric}: before and after fine-tuning (selected LR, mean ± std)")
    if metric == "loss":
        lo = min(r["test_mean"] for r in summary["best"] if not math.isnan(r["test_mean"]))
        ax.set_ylim(bottom=max(0, lo - 0.5))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    plots["summary"] = "summary.png"
    return plots


def run_report(cfg: ReportConfig, base_dir: Path, fresh: bool = False,
               progress: bool = True) -> dict:
    """Base quality, the grid, the report. Returns the results.json document."""
    from .train import ensure_process_group
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
