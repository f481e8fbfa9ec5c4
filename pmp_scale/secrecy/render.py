"""attack.md, attack.json and roc.png from a suite result."""
from __future__ import annotations

import json
from pathlib import Path

from .evaluate import GROUP_AUC, GROUP_SHARE, TENSOR_AUC, folded


def _f(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _worst(items: dict, min_share: float | None = None) -> str:
    scored = [(k, v["auc"] if isinstance(v, dict) else v) for k, v in items.items()
              if (not isinstance(v, dict) or v["share"] >= (min_share or 0))]
    scored = [(k, a) for k, a in scored if a is not None]
    if not scored:
        return "—"
    k, a = max(scored, key=lambda kv: folded(kv[1]))
    return f"{k} {a:.3f}"


def markdown(result: dict) -> str:
    owner = result["private"] is not None
    lines = [f"# Mask-recovery attacks on `{result['release']}`", ""]
    if owner:
        lines += [f"Scored against the true mask `{result['private']}` (the owner's view). AUC: "
                  "ROC AUC of the score against the true mask bit (in M = positive; 0.5 = chance; "
                  "below 0.5 means the score works inverted, which an attacker with a shadow model "
                  "learns). folded: max(AUC, 1 − AUC), what every verdict compares. q-AUC: AUC "
                  "of each score's rank within its own tensor (tensors of different scales "
                  "pooled fairly), folded. P@10%: share of trained elements among the "
                  "attacker's most confident tenth (the mask's share is chance). P@|M̄|: "
                  "precision of the predicted complement of the true size.", "",
                  "| attack | needs | channel | AUC | folded | q-AUC | worst group (≥1%) | "
                  "worst tensor | P@10% | P@\\|M̄\\| | s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in result["attacks"].items():
            lines.append(f"| {name} | {r['needs']} | {r['channel']} | {_f(r.get('auc'))} | "
                         f"{_f(r.get('auc_sym'))} | {_f(r.get('auc_quantile_sym'))} | "
                         f"{_worst(r['groups'], GROUP_SHARE)} | {_worst(r['tensors'])} | "
                         f"{_f(r.get('precision_at_top10'))} | "
                         f"{_f(r.get('precision_at_true_size'))} | {r['time_s']} |")
        lines += ["", f"Audit rule: an attack fails the release at AUC ≥ {GROUP_AUC} (either "
                  f"orientation) on a layer group of ≥ {GROUP_SHARE:.0%} of the elements, or ≥ "
                  f"{TENSOR_AUC} on any tensor with ≥ 100 elements of each class.", ""]
        lines += (["## Leaks", ""] + [f"- {x}" for x in result["leaks"]] if result["leaks"]
                  else ["No attack crosses the audit rule."])
    else:
        lines += ["No private mask given: the attacks ran and wrote their predicted masks "
                  f"(ratio {result['ratio']:.3f}) to `masks/`, but cannot be scored.", "",
                  "| attack | needs | channel |", "|---|---|---|"]
        lines += [f"| {n} | {r['needs']} | {r['channel']} |" for n, r in result["attacks"].items()]
    extra = {n: {k: v for k, v in r.items() if k in ("best_seed", "exact_match_fraction", "K",
                                                      "train_elements", "steps", "seeds_tried")}
             for n, r in result["attacks"].items()}
    extra = {n: v for n, v in extra.items() if v}
    if extra:
        lines += ["", "## Attack details", ""] + [f"- {n}: {json.dumps(v)}" for n, v in extra.items()]
    if "payoff" in result:
        p = result["payoff"]
        lines += ["", "## Payoff: fine-tuning with the recovered mask", "",
                  f"Task {p['task']}, {p['steps']} steps, lr {p['lr']}; test loss before → after "
                  "(gain).", "", "| fine-tuning | mask | before | after | gain |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['mask'] or '—'} | {_f(r['before'])} | {_f(r['after'])} | "
                  f"{_f(r['gain'])} |" for r in p["runs"]]
    return "\n".join(lines) + "\n"


def roc_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, r in result["attacks"].items():
        roc = r.get("roc") or {}
        if roc.get("fpr"):
            ax.plot(roc["fpr"], roc["tpr"], label=f"{name} ({r['auc']:.2f})", lw=1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (complement called trained)",
           ylabel="true positive rate (mask called trained)", title="mask-recovery ROC")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    (out / "attack.json").write_text(json.dumps(result, indent=1))
    (out / "attack.md").write_text(markdown(result))
    if result["private"] is not None:
        roc_plot(result, out / "roc.png")
