"""study.md, study.json and the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .claims import _pct
from .stats import RULE, fmt


def write_outputs(out: Path, doc: dict) -> None:
    from .run import write_json
    doc["plots"] = make_plots(out, doc)
    write_json(out / "study.json", doc)
    tmp = out / ".study.md.tmp"
    tmp.write_text(render(doc))
    tmp.replace(out / "study.md")


def claims_table(doc: dict) -> str:
    lines = ["| claim | where | measured (effect, 95% CI, test) | A/A noise floor | verdict |",
             "|---|---|---|---|---|"]
    for c in doc["claims"]:
        noise = "—" if c.get("noise") is None else f"{c['noise']:.4f}"
        lines.append(f"| {c['claim']} | {c['where']} | {c['value']} | {noise} | "
                     f"**{c['verdict']}** |")
    return "\n".join(lines)


def controls_table(doc: dict) -> list[str]:
    rows = doc.get("controls") or []
    if not rows:
        return ["No controls ran (set `pretrain_seeds` with >= 2 seeds for the A/A control and "
                "`controls.reparam_alpha` for the positive one).", ""]
    lines = ["| control | where | releases | measured | reading |", "|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['control']} | {c['where']} | {', '.join(c['releases'])} | "
                     f"{c['value']} | **{c['verdict']}** |")
    weak = [c for c in rows if c["control"].startswith("positive")
            and not c["verdict"].startswith("detected")]
    if weak:
        lines += ["", "**The positive control was not detected: this fine-tuning grid is too weak "
                      "to judge anything; every 'inconclusive' above says nothing about PMP.**"]
    return lines + [""]


def instability_table(doc: dict) -> list[str]:
    lines = ["| grid / release | mode | selected LR | at grid edge | largest train-loss spike "
             "(nats) | runs diverged / ended worse (all LRs × seeds) | largest LR not ending "
             "worse |", "|---|---|---|---|---|---|---|"]
    for grid, releases in (doc.get("instability") or {}).items():
        for name, modes in releases.items():
            for mode, x in modes.items():
                edge = f"**{x['lr_edge']}**" if x["lr_edge"] else "no"
                spike = "—" if x["max_spike"] is None else f"{x['max_spike']:.3f}"
                lines.append(f"| {grid} / {name} | {mode} | {x['lr']:g} | {edge} | {spike} | "
                             f"{x['diverged_runs']} / {x['worse_runs']} | "
                             f"{x['largest_stable_lr']} |")
    return lines + [""]


def secrecy_table(doc: dict) -> list[str]:
    """Per PMP variant: its defences, the best attack and the worst layer group by folded AUC,
    beside what the defence costs (base) and what the mask buys (early-bird benefit)."""
    rows = doc.get("secrecy_table") or []
    if not rows or not any(r["best_auc"] is not None for r in rows):
        return []
    attacks = list(dict.fromkeys(a for s in (doc.get("secrecy") or {}).values()
                                 for a in (s.get("attacks") or {})))  # in the suite's order
    lines = ["## Secrecy", "",
             f"Attacks on every PMP release: {', '.join(attacks)}. Every AUC is *folded*, "
             "max(AUC, 1 − AUC) (an attack ranking the mask backwards is as useful: 0.3 counts "
             "as 0.7), and averaged over the variant's releases per attack; the best attack is "
             "the one with the highest mean. q-AUC: the best attack's folded AUC on "
             "within-tensor quantiles; P@10 %: the share of trained elements in its most "
             "confident tenth (chance: the mask's share); worst group: the layer group (≥ 1 % "
             "of the elements) where some attack does best. Base cost: val loss vs the dense "
             "releases. Early-bird benefit: the random-mask variant's unauthorized gain minus "
             "this variant's (> 0: this mask cuts more than a random one), blank where the grid "
             "did not measure it.", "",
             "| preset / variant | defences | releases | best folded AUC (attack) | worst group "
             "(attack) | q-AUC | P@10 % (chance) | base cost vs dense | early-bird benefit |",
             "|---|---|---|---|---|---|---|---|---|"]

    def num(x, f="{:.3f}"):
        return "—" if x is None else f.format(x)
    for r in rows:
        best = "—" if r["best_auc"] is None else f"{r['best_auc']:.3f} ({r['best_attack']})"
        w = r.get("worst_group")
        worst = "—" if w is None else f"{w['group']} {w['auc']:.3f} ({w['attack']})"
        p10 = ("—" if r["best_precision_at_top10"] is None else
               f"{r['best_precision_at_top10']:.2f} ({num(r['mask_share'], '{:.2f}')})")
        benefit = "; ".join((f"{b['task']}: " if len(r["earlybird_benefit"]) > 1 else "")
                            + b["text"] for b in r["earlybird_benefit"] if b["text"])
        lines.append(f"| {r['preset']} / {r['variant']} | {r['knobs_text']} | "
                     f"{r['measured']} of {r['releases']} | {best} | {worst} | "
                     f"{num(r['best_auc_quantile'])} | {p10} | {_pct(r['base_cost'])} | "
                     f"{benefit} |")
    return lines + [""]


def render(doc: dict) -> str:
    lines = [f"# {doc['title']}", "",
             f"{len(doc['runs'])} pre-training runs, {len(doc['grids'])} fine-tuning grids; "
             f"wall time of this invocation {doc['wall_s'] / 60:.1f} min "
             f"({len(doc['work']['done'])} steps done, {len(doc['work']['reused'])} reused).", "",
             "## Claims", "", claims_table(doc), "",
             f"Rule. Fine-tuning comparisons: {RULE}. Multiplicity: the p values of all tested "
             "rows above are Holm–Bonferroni adjusted together (family-wise error ≤ 0.05); the "
             "controls are not part of that family. Gain = improvement of the test metric "
             "from fine-tuning at the longest duration, LR selected on validation per release; "
             "the gain cut is the dense releases' gain minus the PMP releases' (unauthorized); "
             "body gain = full fine-tuning gain − head-only gain (only lm_head trains). "
             "The A/A noise floor is the gain gap between two dense releases that differ only "
             "in their pre-training seed. Each row states its criterion in study.json (`rule`).",
             "", "## Controls", "", *controls_table(doc), *secrecy_table(doc),
             *curvature_section(doc),
             "## Variants", "",
             "| preset / variant | releases (seeds) | task | base val loss (cost vs dense) | "
             "tokens/s | discovery | gain cut | body-gain cut | authorized − unauthorized | "
             "best attack folded AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        d = r.get("discovery") or {}
        disc = (f"{d['steps']} steps, {d['stop_reason']}" if d.get("steps") is not None else "—")
        base = "n/a" if r["base_loss"] is None else f"{r['base_loss']:.3f} ({_pct(r['base_cost'])})"
        auc = "—" if r["max_auc"] is None else f"{r['max_auc']:.3f}"
        tps = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        body = "—" if not r.get("body_cut") else fmt(r["body_cut"], 3)
        lines.append(f"| {r['preset']} / {r['variant']} | {len(r['releases'])} "
                     f"({', '.join(str(s) for s in r['seeds'])}) | {r['task']} | {base} | {tps} | "
                     f"{disc} | {fmt(r['gain_cut'], 3)} | {body} | {fmt(r['recovery'], 3)} | "
                     f"{auc} |")
    lines += ["", "## Fine-tuning instability", "",
              "Per release and mode at the longest duration: the LR selected on validation "
              "(flagged when it is the grid's lowest or highest: the best LR may lie outside), "
              "the largest rise of the training loss above its running minimum at that LR, and "
              "over the whole LR grid how many runs hit non-finite values (diverged) or ended "
              "with a validation loss above their start.", "", *instability_table(doc)]
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


def curvature_section(doc: dict) -> list[str]:
    """The mechanism next to the claims: Hessian top eigenvalue and gradient size per element
    on the mask, on its complement and on all weights, per release (curvature.py)."""
    rows = doc.get("curvature") or {}
    if not rows:
        return []
    lines = ["## Mechanism: curvature on the mask and on its complement", "",
             "Top Hessian eigenvalue (power iteration on Hessian-vector products) of the "
             "pre-training validation loss restricted to the masked weights, to the complement "
             "and to all weights, and the gradient's RMS per element on each, at the release. "
             "Dense releases are measured on the index sets of the PMP mask named in the last "
             "column. The paper's Proposition 1 reads, for a PMP release: the masked weights at a "
             "conditional optimum (a small gradient on the mask) and sharp curvature along the "
             "frozen complement, both against the dense release on the same index sets. One "
             "batch, n = 1 per release: a description, not a test.",
             "", "| release | λ mask | λ complement | λ all | grad RMS mask | grad RMS "
             "complement | mask from |", "|---|---|---|---|---|---|---|"]
    for name, c in rows.items():
        if "error" in c:
            lines.append(f"| {name} | {c['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {c['mask']['eig']:.4g} | {c['complement']['eig']:.4g} | "
                     f"{c['all']['eig']:.4g} | {c['mask']['grad_rms']:.3g} | "
                     f"{c['complement']['grad_rms']:.3g} | {c['mask_from']} |")
    return lines + [""]


def make_plots(out: Path, doc: dict) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots = {}
    rows = [r for r in doc["variants"] if math.isfinite(r["gain_cut"]["effect"])]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
        xs = range(len(rows))
        eff = [r["gain_cut"]["effect"] for r in rows]
        lo = [e - r["gain_cut"]["ci"][0] if math.isfinite(r["gain_cut"]["ci"][0]) else 0
              for e, r in zip(eff, rows)]
        hi = [r["gain_cut"]["ci"][1] - e if math.isfinite(r["gain_cut"]["ci"][1]) else 0
              for e, r in zip(eff, rows)]
        ax.bar(xs, eff, yerr=[lo, hi], capsize=3)
        for c in doc.get("controls") or []:
            if c["control"].startswith("negative"):
                ax.axhspan(-abs(c["gap"]), abs(c["gap"]), color="0.85", zorder=0)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [f"{r['variant']}\n{r['task']}" for r in rows], fontsize=7,
                      rotation=30, ha="right")
        ax.set_ylabel("gain cut (dense gain − PMP gain)")
        ax.set_title("unauthorized gain cut, release means, 95% CI (grey: A/A noise floor)")
        save(plt, fig, out / "gain_cut.png")
        plots["gain cut per variant"] = "gain_cut.png"
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in rows:
            if r["base_cost"] is not None:
                ax.scatter(r["base_cost"] * 100, r["gain_cut"]["effect"])
                ax.annotate(f"ρ{r['mask_ratio']:g} {r['mask_source'][:2]} {r['complement'][:4]}",
                            (r["base_cost"] * 100, r["gain_cut"]["effect"]), fontsize=7)
        ax.set_xlabel("base cost: val loss vs dense (%)")
        ax.set_ylabel("gain cut")
        ax.set_title("trade-off")
        ax.grid(alpha=0.3)
        save(plt, fig, out / "tradeoff.png")
        plots["base cost vs gain cut"] = "tradeoff.png"
    if pareto_plot(plt, out, doc.get("secrecy_table") or []):
        plots["secrecy vs base cost"] = "secrecy_pareto.png"
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
        save(plt, fig, out / "discovery.png")
        plots["early-bird discovery"] = "discovery.png"
    return plots


def pareto_plot(plt, out: Path, rows: list[dict]) -> bool:
    """Best folded AUC vs base cost, one labelled point per variant; the line joins the
    variants no other beats on both (lower cost and lower AUC are better)."""
    pts = [(r["base_cost"] * 100, r["best_auc"], r["variant"]) for r in rows
           if r["base_cost"] is not None and r["best_auc"] is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for x, y, label in pts:
        ax.scatter(x, y, color="C0")
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((x, y) for x, y, _ in pts
                   if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2, _ in pts))
    ax.plot(*zip(*front), color="C1", lw=1, label="not beaten on both")
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
    ax.set_xlabel("base cost: val loss vs dense (%)")
    ax.set_ylabel("best attack, folded AUC")
    ax.set_title("mask secrecy vs base cost, per PMP variant")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(plt, fig, out / "secrecy_pareto.png")
    return True


def save(plt, fig, path: Path) -> None:
    """Every study plot: laid out, written at one resolution, closed (a study makes many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dump(doc: dict) -> str:
    return json.dumps(doc, indent=1, default=float)
