"""What a report's numbers must be read against, and what happens when a cell fails.

Classification: a fine-tuned model is only informative if it beats the classifier that always
answers the training set's majority class; a from-scratch model (`reinit: true`) is the
"no pre-training" floor. A task whose dense fine-tuning does not beat the majority class says
nothing about non-fine-tunability, so the report flags it instead of drawing a gap from it.

A failing grid cell (a bug in one mode, a model that cannot be built) is reported as one line
naming the cell; the other cells and the report go on.
"""
from __future__ import annotations

import gc
import math
import sys

import torch

from ..config import ConfigError


class CellsFailed(ConfigError):
    """Every cell of a grid failed: there is nothing to report."""


class CellResults(list):
    """Cell results in plan order, plus the cells that failed (`failures`)."""
    failures: list[dict]


def cell_failure(name: str, err: BaseException) -> dict:
    """One clear line on stderr for a failed cell; the record the report lists."""
    first = (str(err).strip().splitlines() or [""])[0]
    record = {"cell": name, "error": f"{type(err).__name__}: {first}"}
    print(f"error: cell {name} failed: {record['error']}", file=sys.stderr, flush=True)
    gc.collect()  # the failed run's engine, if it got that far
    return record


def drop_failed(share_step0, results: list[dict], failures: list[dict]) -> CellResults:
    """Results with a step-0 evaluation for their release (the first cell of a release holds
    it: if that cell failed, its siblings cannot be compared with the release either)."""
    with_step0 = {r["release_name"] for r in results if "0" in r["at"]}
    kept = []
    for r in results:
        if r["release_name"] in with_step0:
            kept.append(r)
        else:
            failures.append({"cell": r["cell"], "error": "no step-0 evaluation of its release "
                                                         "(that release's first cell failed)"})
    if not kept:
        first = failures[0] if failures else {"cell": "-", "error": "no cells"}
        raise CellsFailed(f"all {len(failures)} cells of the grid failed; first: cell "
                          f"{first['cell']}: {first['error']}")
    out = CellResults(share_step0(kept))
    out.failures = failures
    return out


def majority_baseline(task) -> dict:
    """Test metrics of the constant classifier answering the training set's majority class."""
    from ..finetune.tasks import classification_metrics
    counts = task.stats["train_label_counts"]
    majority = max(range(task.num_labels), key=lambda c: counts[c])
    confusion = torch.zeros(task.num_labels, task.num_labels)
    confusion[:, majority] = torch.bincount(torch.tensor(task.labels("test")),
                                            minlength=task.num_labels).float()
    label = task.label_names[majority] if task.label_names else str(majority)
    return {"label": label, "train_share": counts[majority] / sum(counts),
            **classification_metrics(confusion)}


def classification_baselines(cfg, summary: dict, majority: dict | None) -> dict | None:
    """Majority class, from scratch and dense fine-tuning side by side at each duration, and
    whether the task is informative. Rule: dense fine-tuning beats the majority class when
    its mean test metric minus two standard errors (over seeds) is above the majority's."""
    if majority is None:
        return None
    metric, higher = summary["metric"], summary["higher_is_better"]
    best = {(r["release"], r["mode"], r["steps"]): r for r in summary["best"]}
    rows, informative = [], None
    for d in sorted({r["steps"] for r in summary["best"]}):
        dense = best.get((cfg.dense, "unauthorized", d))
        scratch = best.get((cfg.scratch, "unauthorized", d)) if cfg.scratch else None
        row = {"steps": d, "majority": majority.get(metric),
               "scratch": None if scratch is None else [scratch["test_mean"], scratch["test_std"],
                                                        scratch["n_seeds"]],
               "dense": None if dense is None else [dense["test_mean"], dense["test_std"],
                                                    dense["n_seeds"]]}
        if dense is not None and row["majority"] is not None and not math.isnan(dense["test_mean"]):
            se = dense["test_std"] / math.sqrt(max(1, dense["n_seeds"]))
            margin = (dense["test_mean"] - 2 * se - row["majority"] if higher
                      else row["majority"] - dense["test_mean"] - 2 * se)
            row["dense_beats_majority"] = margin > 0
            informative = row["dense_beats_majority"]  # the longest duration decides
        rows.append(row)
    return {"metric": metric, "majority": majority, "rows": rows, "informative": informative,
            "rule": "dense fine-tuning beats the majority class when mean − 2·SE (over seeds) "
                    "of its test metric is above the majority class's"}


def render_baselines(b: dict | None, cfg) -> list[str]:
    """Markdown lines for the report's baselines section (classification only)."""
    if b is None:
        return []
    metric = b["metric"]

    def pm(x):
        return "not run (add a `reinit: true` release named in `scratch:`)" if x is None \
            else f"{x[0]:.3f} ± {x[1]:.3f} (n={x[2]})"
    lines = ["### Baselines", "",
             f"Majority class: always `{b['majority']['label']}` (the training set's majority, "
             f"{b['majority']['train_share']:.1%} of it).", "",
             f"| steps | majority class: test {metric} | from scratch (`{cfg.scratch or '—'}`) | "
             f"dense `{cfg.dense}` unauthorized | dense beats majority |",
             "|---|---|---|---|---|"]
    for r in b["rows"]:
        beats = {True: "yes", False: "**no**", None: "—"}[r.get("dense_beats_majority")]
        maj = "—" if r["majority"] is None else f"{r['majority']:.3f}"
        lines.append(f"| {r['steps']} | {maj} | {pm(r['scratch'])} | {pm(r['dense'])} | {beats} |")
    lines += ["", f"Rule: {b['rule']}."]
    if b["informative"] is False:
        lines += ["", "**Uninformative task**: dense fine-tuning does not beat the majority "
                      "class, so its gaps say nothing about non-fine-tunability."]
    return lines + [""]
