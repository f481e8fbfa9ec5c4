"""study.md, study.json and the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .claims import RULE, _fmt, _pct


def write_outputs(out: Path, doc: dict) -> None:
    from .run import write_json
    doc["plots"] = make_plots(out, doc)
    write_json(out / "study.json", doc)
    tmp = out / ".study.md.tmp"
    tmp.write_text(render(doc))
    tmp.replace(out / "study.md")


def claims_table(doc: dict) -> str:
    lines = ["| claim | where | measured | verdict |", "|---|---|---|---|"]
    for c in doc["claims"]:
        lines.append(f"| {c['claim']} | {c['where']} | {c['value']} | **{c['verdict']}** |")
    return "\n".join(lines)


def render(doc: dict) -> str:
    lines = [f"# {doc['title']}", "",
             f"{len(doc['runs'])} pre-training runs, {len(doc['grids'])} fine-tuning grids; "
             f"wall time of this invocation {doc['wall_s'] / 60:.1f} min "
             f"({len(doc['work']['done'])} steps done, {len(doc['work']['reused'])} reused).", "",
             "## Claims", "", claims_table(doc), "",
             f"Rules. Fine-tuning comparisons: {RULE}. Gain = improvement of the test metric "
             "from fine-tuning; the gain cut is the dense release's gain minus the PMP release's "
             "(unauthorized), at the longest fine-tuning duration, LR selected on validation. "
             "Each claim's row states its own criterion in study.json (`rule`).", "",
             "## Variants", "",
             "| preset / variant | task | base val loss (cost vs dense) | tokens/s | discovery "
             "| gain cut | authorized − unauthorized | best attack AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        d = r.get("discovery") or {}
        disc = (f"{d['steps']} steps, {d['stop_reason']}" if d.get("steps") is not None else "—")
        base = "n/a" if r["base_loss"] is None else f"{r['base_loss']:.3f} ({_pct(r['base_cost'])})"
        auc = "—" if r["max_auc"] is None else f"{r['max_auc']:.3f}"
        tps = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['preset']} / {r['variant']} | {r['task']} | {base} | {tps} | {disc} | "
                     f"{_fmt(r['gain_cut'])} | {_fmt(r['recovery'])} | {auc} |")
    lines += ["", "Dense runs: " + ", ".join(
        f"{n} {i['tokens_per_s']:,.0f} tok/s" for n, i in doc["runs"].items()
        if i["pmp"] is None and i.get("tokens_per_s")), ""]
    disc = [(n, i["discovery"]) for n, i in doc["runs"].items() if i.get("discovery")]
    if disc:
        lines += ["## Early-bird discovery", "",
                  "| run | score | steps | stopped by | consecutive IoU (min–max) | first "
                  "check reaching the threshold |", "|---|---|---|---|---|---|"]
        for n, d in disc:
            ious = [t["iou_prev"] for t in d["trace"] if t.get("iou_prev") is not None]
            first = next((t["step"] for t in d["trace"] if (t.get("iou_prev") or 0)
                          >= d.get("iou_threshold", 0.99)), None)
            rng = f"{min(ious):.3f}–{max(ious):.3f}" if ious else "n/a"
            lines.append(f"| {n} | {d.get('score', 'step')} | {d['steps']} | {d['stop_reason']} | "
                         f"{rng} | {first if first is not None else 'never'} |")
        lines.append("")
    lines += ["## Fine-tuning reports", ""]
    lines += [f"- {k}: `{v}`" for k, v in doc["grids"].items()]
    if doc.get("secrecy_source"):
        lines += ["", f"Secrecy attacks: {doc['secrecy_source']}."]
    lines += ["", "## Plots", ""] + [f"![{t}]({p})" for t, p in doc.get("plots", {}).items()]
    return "\n".join(lines) + "\n"


def make_plots(out: Path, doc: dict) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots = {}
    rows = [r for r in doc["variants"] if r["gain_cut"]["n"]]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
        xs = range(len(rows))
        ax.bar(xs, [r["gain_cut"]["mean"] for r in rows],
               yerr=[2 * r["gain_cut"]["std"] / math.sqrt(r["gain_cut"]["n"]) for r in rows],
               capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [f"{r['variant']}\n{r['task']}" for r in rows], fontsize=7,
                      rotation=30, ha="right")
        ax.set_ylabel("gain cut (dense gain − PMP gain)")
        ax.set_title("unauthorized gain cut, mean ± 2 SE")
        fig.tight_layout()
        fig.savefig(out / "gain_cut.png", dpi=110)
        plt.close(fig)
        plots["gain cut per variant"] = "gain_cut.png"
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in rows:
            if r["base_cost"] is not None:
                ax.scatter(r["base_cost"] * 100, r["gain_cut"]["mean"])
                ax.annotate(f"ρ{r['mask_ratio']:g} {r['mask_source'][:2]} {r['complement'][:4]}",
                            (r["base_cost"] * 100, r["gain_cut"]["mean"]), fontsize=7)
        ax.set_xlabel("base cost: val loss vs dense (%)")
        ax.set_ylabel("gain cut")
        ax.set_title("trade-off")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "tradeoff.png", dpi=110)
        plt.close(fig)
        plots["base cost vs gain cut"] = "tradeoff.png"
    disc = [(n, i["discovery"]) for n, i in doc["runs"].items() if i.get("discovery")]
    if disc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, d in disc:
            pts = [(t["step"], t["iou_prev"]) for t in d["trace"] if t.get("iou_prev") is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=n.split("__", 1)[-1])
        ax.axhline(0.99, color="k", ls="--", lw=0.8)
        ax.set_xlabel("Stage I step")
        ax.set_ylabel("IoU with previous candidate")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "discovery.png", dpi=110)
        plt.close(fig)
        plots["early-bird discovery"] = "discovery.png"
    return plots


def dump(doc: dict) -> str:
    return json.dumps(doc, indent=1, default=float)
