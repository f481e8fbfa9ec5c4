"""A report grid's results → numbers (LR selected by validation, test over seeds, paired gaps),
report.md and plots. Means and standard deviations use `statistics` (exactly rounded), so a
report's numbers do not depend on the order its cells finished in."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .baselines import classification_baselines, render_baselines


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values or any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def loss_spike(train_loss: list, upto: int) -> float:
    """Largest rise of the training loss above its lowest value so far (nats; 0 = never rose)."""
    low, spike = math.inf, 0.0
    for step, loss in train_loss:
        if step > upto:
            break
        if loss is None or not math.isfinite(loss):
            return math.inf
        spike = max(spike, loss - low) if math.isfinite(low) else spike
        low = min(low, loss)
    return spike


def ended_worse(r: dict, d: int, metric: str, higher: bool) -> bool:
    """Instability flag: non-finite (diverged) or the validation metric at `d` worse than at 0."""
    if r["diverged"]:
        return True
    after, before = r["at"][str(d)]["validation"][metric], r["at"]["0"]["validation"][metric]
    return not math.isfinite(after) or (after < before if higher else after > before)


def summarise(cfg, results: list[dict]) -> dict:
    """Per (release, mode, duration, lr): mean ± std over seeds of the test metric after
    fine-tuning, before it (step 0) and the gain (improvement, > 0 = better); best LR by
    validation."""
    import pandas as pd
    metric, higher = results[0]["metric"], results[0]["higher_is_better"]
    sign = 1.0 if higher else -1.0
    seeds = pd.DataFrame([dict(release=r["release_name"], mode=r["mode"], steps=d, lr=r["lr"],
                               seed=r["seed"], val=r["at"][str(d)]["validation"][metric],
                               test=r["at"][str(d)]["test"][metric],
                               before=r["at"]["0"]["test"][metric], diverged=r["diverged"],
                               spike=loss_spike(r["train_loss"], d),
                               worse=ended_worse(r, d, metric, higher))
                          for r in results for d in r["durations"]])
    seeds["gain"] = sign * (seeds["test"] - seeds["before"])
    table = []
    for (name, mode, d, lr), g in seeds.groupby(["release", "mode", "steps", "lr"]):
        stats = {f"{col}_{what}": value for col in ("val", "test", "before", "gain")
                 for what, value in zip(("mean", "std"), _mean_std(g[col].tolist()))}
        test, by_seed = g["test"].tolist(), g.sort_values("seed")
        table.append(dict(release=name, mode=mode, steps=int(d), lr=lr, n_seeds=len(g),
                          val_mean=stats["val_mean"], val_std=stats["val_std"],
                          test_mean=stats["test_mean"], test_std=stats["test_std"],
                          test_min=min(test), test_max=max(test),
                          before_mean=stats["before_mean"], before_std=stats["before_std"],
                          gain_mean=stats["gain_mean"], gain_std=stats["gain_std"],
                          diverged=int(g["diverged"].sum()),
                          max_spike=float(g["spike"].max()), ended_worse=int(g["worse"].sum()),
                          per_seed=dict(zip(by_seed["seed"].astype(str), by_seed["test"])),
                          per_seed_gain=dict(zip(by_seed["seed"].astype(str), by_seed["gain"]))))

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
    lrs = sorted({row["lr"] for row in table})
    for row in best.values():  # a selection at the grid's edge may be short of the best LR
        row["lr_edge"] = (None if len(lrs) < 2 else "lowest" if row["lr"] == lrs[0]
                          else "highest" if row["lr"] == lrs[-1] else None)
    return {"metric": metric, "higher_is_better": higher, "table": table,
            "best": [best[k] for k in sorted(best)]}


def gaps(cfg, summary: dict) -> list[dict]:
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
CELL_KEYS = ("cell", "release_name", "mode", "lr", "seed", "max_steps", "at", "curve",
             "train_loss", "params", "diverged", "time_s", "backbone")


def write_report(cfg, results: list[dict], base: dict, timing: dict,
                 majority: dict | None = None) -> dict:
    out = Path(cfg.out_dir)
    summary = summarise(cfg, results)
    doc = {"title": cfg.title, "config": cfg.model_dump(mode="json"), "metric": summary["metric"],
           "higher_is_better": summary["higher_is_better"], "task": results[0]["task"],
           "base": base, "summary": summary, "gaps": gaps(cfg, summary),
           "plots": make_plots(cfg, results, summary, out), "timing": timing,
           "baselines": classification_baselines(cfg, summary, majority),
           "failed": getattr(results, "failures", []),
           "cells": [{k: r[k] for k in CELL_KEYS if k in r} for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=float))
    (out / "report.md").write_text(render_markdown(cfg, doc, results))
    return doc


def _pm(m: float, s: float, digits: int = 3) -> str:
    if m is None or math.isnan(m):
        return "n/a (diverged)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table (pandas' `to_markdown` needs the optional `tabulate`)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _summary_rows(doc: dict) -> list[list]:
    by = {}
    for r in doc["summary"]["best"]:
        by.setdefault((r["release"], r["mode"]), {})[r["steps"]] = r
    rows = []
    for (name, mode), runs in by.items():
        b, first = doc["base"].get(name), runs[min(runs)]
        rows.append([name, mode, f"{b['loss']:.3f} ({b['ppl']:.1f})" if b else "—",
                     _pm(first["before_mean"], first["before_std"]),
                     *(f"{_pm(runs[d]['test_mean'], runs[d]['test_std'])} "
                       f"({runs[d]['gain_mean']:+.3f})" for d in sorted(runs)),
                     " / ".join(f"{runs[d]['lr']:g}" for d in sorted(runs))])
    return rows


def _integrity_rows(results: list[dict]) -> list[list]:
    """Per release and mode: runs, and elements changed of the backbone and of the complement."""
    import pandas as pd
    counts = pd.DataFrame([{"key": f"{r['release_name']} {r['mode']}", "runs": 1,
                            "changed": r["backbone"]["changed"],
                            "elements": r["backbone"]["elements"],
                            "complement_changed": r["backbone"].get("complement_changed", 0),
                            "complement": r["backbone"].get("complement", 0)}
                           for r in results if "backbone" in r])
    if counts.empty:
        return []
    return [[key, a.runs, f"{a.changed:,} of {a.elements:,}",
             f"{a.complement_changed:,} of {a.complement:,}"]
            for key, a in counts.groupby("key", sort=False).sum().iterrows()]


def render_markdown(cfg, doc: dict, results: list[dict]) -> str:
    metric, higher = doc["metric"], doc["higher_is_better"]
    ft = results[0]["config"]
    lines = [f"# {cfg.title}", "",
             f"Task `{doc['task']}` (metric: test {metric}, "
             f"{'higher is better' if higher else 'lower is better'}; "
             f"{'perplexity = exp(loss)' if metric == 'loss' else 'F1/Matthews in results.json'}). "
             f"Every cell: {len(cfg.seeds)} seeds (mean ± std over seeds), micro-batch "
             f"{ft['train']['micro_batch_size']}, global batch {ft['train']['global_batch_size']}, "
             f"{ft['optim']['schedule']} schedule with {ft['optim']['warmup_steps']} warm-up steps, "
             f"AdamW wd {ft['optim']['weight_decay']}, clip {ft['optim']['grad_clip']}; "
             f"LRs {cfg.lrs}; durations {sorted(set(cfg.steps))} steps. The LR is selected per "
             "(release, mode, duration) by mean validation metric; test is reported.", "",
             "## Summary", ""]
    steps_all = sorted({r["steps"] for r in doc["summary"]["best"]})
    lines += md_table(["release", "mode", "base: pre-training val loss (ppl)",
                       f"before FT: test {metric}",
                       *[f"after {d} steps: test {metric} (gain)" for d in steps_all],
                       "selected LRs"], _summary_rows(doc))
    lines += ["", *render_baselines(doc.get("baselines"), cfg)]
    if doc.get("failed"):
        lines += [f"**{len(doc['failed'])} cell(s) failed** (left out of every table):", ""]
        lines += [f"- `{f['cell']}`: {f['error']}" for f in doc["failed"]] + [""]
    lines += ["Gain = improvement of the test metric over the release before fine-tuning "
              "(positive = better).", "",
              "### Gaps (paired by seed; positive = the first is worse)", ""]
    lines += md_table(["comparison", "steps", "LRs", "Δ before FT", "Δ after FT", "Δ gain"],
                      [[g["label"], g["steps"], f"{g['lr_a']:g} / {g['lr_b']:g}",
                        f"{g['before']:.3f}", _pm(g["mean"], g["std"]),
                        _pm(g["gain_mean"], g["gain_std"])] for g in doc["gaps"]])
    lines += ["", f"Δ in test {metric}, mean ± std over n = "
              f"{doc['gaps'][0]['n'] if doc['gaps'] else 0} seeds; Δ gain = the second's gain "
              "minus the first's (> 0: the first gains less from fine-tuning).",
              "", _verdict(doc), ""]
    integrity = _integrity_rows(results)
    if integrity:
        lines += ["### Backbone integrity", ""]
        lines += md_table(["mode", "runs", "backbone elements changed",
                           "complement elements changed"], integrity) + [""]
    lines += [f"## Full grid (test {metric}, mean ± std over seeds; min–max)", ""]
    lines += md_table(["release", "mode", "steps", "LR", "val", "test", "min–max", "diverged",
                       "largest train-loss spike", "val worse than at step 0"],
                      [[r["release"], r["mode"], r["steps"], f"{r['lr']:g}",
                        _pm(r["val_mean"], r["val_std"]), _pm(r["test_mean"], r["test_std"]),
                        f"{r['test_min']:.3f}–{r['test_max']:.3f}", r["diverged"],
                        f"{r.get('max_spike', math.nan):.3f}", r.get("ended_worse", "—")]
                       for r in doc["summary"]["table"]])
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


def _verdict(doc: dict) -> str:
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


# --- plots ----------------------------------------------------------------------------------------
def subplots(*args, **kwargs):
    """`plt.subplots` on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def style(ax, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True,
          grid: str = "both") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid)
    if legend:
        ax.legend(fontsize=8)


def save(fig, out: Path, name: str) -> str:
    """Every plot's tail: layout, a 110-dpi PNG, the figure closed (sweeps draw many)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def make_plots(cfg, results: list[dict], summary: dict, out: Path) -> dict:
    metric, table = summary["metric"], summary["table"]
    series = sorted({(r["release"], r["mode"]) for r in table})
    durations = sorted({r["steps"] for r in table})
    plots = {}
    # 1. metric vs LR per mode, one panel per duration
    fig, axes = subplots(1, len(durations), figsize=(5 * len(durations), 4), squeeze=False)
    for ax, d in zip(axes[0], durations):
        for name, mode in series:
            rows = sorted((r for r in table if (r["release"], r["mode"], r["steps"]) ==
                           (name, mode, d)), key=lambda r: r["lr"])
            ax.errorbar([r["lr"] for r in rows], [r["test_mean"] for r in rows],
                        yerr=[r["test_std"] for r in rows], marker="o", capsize=3,
                        label=f"{name} {mode}")
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(cfg.lrs)), [f"{lr:g}" for lr in sorted(set(cfg.lrs))])
        ax.minorticks_off()
        style(ax, "learning rate", f"test {metric}", f"after {d} steps", legend=False)
    axes[0][0].legend(fontsize=8)
    plots["test metric vs learning rate"] = save(fig, out, "metric_vs_lr.png")
    # 2. training curves at the selected LR of the longest duration
    best = {(r["release"], r["mode"]): r["lr"] for r in summary["best"]
            if r["steps"] == durations[-1]}
    longest = max(x["max_steps"] for x in results)
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    for name, mode in series:
        runs = [r for r in results if (r["release_name"], r["mode"]) == (name, mode)
                and r["lr"] == best.get((name, mode)) and r["max_steps"] == longest]
        if not runs:
            continue
        steps = [p["step"] for p in runs[0]["curve"]]
        vals = [[p[metric] for p in r["curve"]] for r in runs if len(r["curve"]) == len(steps)]
        line, = ax1.plot(steps, [statistics.fmean(v) for v in zip(*vals)], marker=".",
                         label=f"{name} {mode} (lr {best[(name, mode)]:g})")
        ax1.fill_between(steps, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)],
                         alpha=0.2, color=line.get_color())
        tl = [[x[1] for x in r["train_loss"]] for r in runs]
        n = min(len(t) for t in tl)
        ax2.plot(range(1, n + 1), [statistics.fmean(v[:n]) for v in zip(*[t[:n] for t in tl])],
                 color=line.get_color(), label=f"{name} {mode}")
    style(ax1, "step", f"validation {metric}", "validation (mean over seeds, band = min–max)")
    style(ax2, "step", "train loss", "training loss (mean over seeds)")
    plots["training curves"] = save(fig, out, "curves.png")
    # 3. summary bars: before FT and after each duration, selected LR
    fig, ax = subplots(figsize=(min(12, max(6, 0.9 * len(series) * (len(durations) + 1))), 4))
    width = 0.8 / (len(durations) + 1)
    for i, (name, mode) in enumerate(series):
        rows = {r["steps"]: r for r in summary["best"] if (r["release"], r["mode"]) == (name, mode)}
        first = rows[min(rows)]
        vals = [(first["before_mean"], first["before_std"], "before FT")]
        vals += [(rows[d]["test_mean"], rows[d]["test_std"], f"after {d} steps")
                 for d in durations if d in rows]
        for j, (m, s, lab) in enumerate(vals):
            ax.bar(i + j * width, m, width, yerr=s, capsize=2, color=f"C{j}",
                   label=lab if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(series))])
    ax.set_xticklabels([f"{n}\n{m}" for n, m in series], fontsize=8)
    if metric == "loss":
        lo = min(r["test_mean"] for r in summary["best"] if not math.isnan(r["test_mean"]))
        ax.set_ylim(bottom=max(0, lo - 0.5))
    style(ax, "", metric, f"test {metric}: before and after fine-tuning (selected LR, mean ± std)",
          grid="y")
    plots["summary"] = save(fig, out, "summary.png")
    return plots
