"""The paper's claims, each checked by a rule stated in the report, from the study's measurements.

Fine-tuning comparisons follow `stats.RULE`: pre-training releases are the unit (fine-tuning
seeds are averaged within each release), a t test with the matching degrees of freedom, Holm's
correction over every tested claim row, "inconclusive" unless it clears p < 0.05. Base quality
is compared with a tolerance, secrecy with an AUC threshold. Two controls are read the same
way and shown beside the claims: the A/A gap between two dense releases (the noise floor) and
the reparameterised dense release (a hampered fine-tune the grid must detect). Nothing here
chooses settings: it only reads what ran.
"""
from __future__ import annotations

import math
import statistics

from .stats import compare, fmt, holm, release_means, verdict


# --- per release, from one grid's summary ----------------------------------------------------------
def release_results(doc: dict) -> dict:
    """{(release, mode): selected LR, its edge flag, per-seed gain and oriented test metric
    (higher = better), instability} at the grid's longest duration, plus over all LRs the
    count of (LR, seed) runs that diverged or ended worse than they started."""
    summary = doc["summary"]
    sign = 1.0 if summary["higher_is_better"] else -1.0
    longest = max(r["steps"] for r in summary["best"])
    out = {}
    for r in summary["best"]:
        if r["steps"] != longest:
            continue
        table = [t for t in summary["table"] if (t["release"], t["mode"], t["steps"]) ==
                 (r["release"], r["mode"], longest)]
        stable = [t["lr"] for t in table if not t.get("ended_worse")]
        out[(r["release"], r["mode"])] = {
            "lr": r["lr"], "lr_edge": r.get("lr_edge"), "steps": longest,
            "gain": {s: float(g) for s, g in r["per_seed_gain"].items()},
            "test": {s: sign * float(t) for s, t in r["per_seed"].items()},
            "max_spike": r.get("max_spike"), "diverged_runs": sum(t["diverged"] for t in table),
            "worse_runs": sum(t.get("ended_worse", 0) for t in table),
            "largest_stable_lr": max(stable) if stable else None}
    return out


def _by_release(res: dict, names: list[str], mode: str, key: str = "gain") -> dict:
    return release_means({n: list(res[(n, mode)][key].values()) for n in names
                          if (n, mode) in res})


def _within(res: dict, names: list[str], mode_a: str, mode_b: str, key: str) -> dict:
    """Per release: mean over seeds of (mode_a − mode_b), paired by fine-tuning seed."""
    out = {}
    for n in names:
        a, b = res.get((n, mode_a)), res.get((n, mode_b))
        if a and b:
            out[n] = [a[key][s] - b[key][s] for s in a[key] if s in b[key]]
    return release_means(out)


def _pair(a: list[str], b: list[str], seeds: dict) -> dict:
    """a's releases -> b's releases with the same pre-training seed (all, or none)."""
    by_seed = {seeds.get(n): n for n in b}
    pair = {n: by_seed.get(seeds.get(n)) for n in a}
    return pair if all(pair.values()) and None not in by_seed and len(a) == len(b) else {}


def variant_rows(grids: dict, runs: dict, secrecy: dict, cfg) -> list[dict]:
    """One row per (preset, task, variant): its releases, base cost, gain cut, body-gain cut,
    authorized recovery, instability, AUC; and `controls` rows (dense A/A, reparameterised)."""
    from ..secrecy.evaluate import folded  # an AUC of 0.3 is a 0.7 attack, inverted
    rows = []
    for (preset, task), doc in grids.items():
        res = release_results(doc)
        mine = {n: i for n, i in runs.items() if i["preset"] == preset}
        seeds = {i["short"]: i.get("seed") for i in mine.values()}
        groups: dict[str, list[str]] = {}
        for i in mine.values():
            groups.setdefault(i.get("group", i["short"]), []).append(i["short"])
        dense = groups.get("dense", [])
        dense_gain = _by_release(res, dense, "unauthorized")
        dense_body = _within(res, dense, "unauthorized", "head-only", "gain")
        base = {n: (doc["base"].get(n) or {}).get("loss") for n in doc["base"]}
        dense_loss = _mean([base.get(n) for n in dense])
        for group, names in groups.items():
            if group == "dense":
                continue
            info = next(i for i in mine.values() if i["short"] == names[0])
            loss = _mean([base.get(n) for n in names])
            gains = _by_release(res, names, "unauthorized")
            pair = _pair(dense, names, seeds)
            body = _within(res, names, "unauthorized", "head-only", "gain")
            aucs = [(folded(a["auc"]), k) for n, i in mine.items() if i["short"] in names
                    for k, a in (secrecy.get(n) or {}).get("attacks", {}).items()
                    if a.get("auc") is not None and not math.isnan(a["auc"])]
            rows.append({
                "preset": preset, "task": task, "variant": group, "releases": names,
                "seeds": [seeds.get(n) for n in names], **info["pmp"],
                "steps": next((res[k]["steps"] for k in res), None),
                "base_loss": loss, "dense_loss": dense_loss,
                "base_cost": None if loss is None or not dense_loss else loss / dense_loss - 1,
                "gains": gains, "dense_gains": dense_gain, "pair": pair,
                "gain_cut": compare(dense_gain, gains, pair),
                "body_gains": body, "body_cut": compare(dense_body, body, pair) if body else None,
                "recovery": compare(_within(res, names, "authorized", "unauthorized", "test")),
                "instability": {n: {m: _instab(res.get((n, m))) for m in
                                    ("unauthorized", "authorized", "head-only")
                                    if (n, m) in res} for n in names},
                "max_auc": max(aucs)[0] if aucs else None,
                "max_auc_attack": max(aucs)[1] if aucs else None,
                "tokens_per_s": _mean([i.get("tokens_per_s") for i in mine.values()
                                       if i["short"] in names]),
                "discovery": info.get("discovery")})
    return rows


def vs_random(a: dict, b: dict) -> dict:
    """The early-bird benefit: random variant b's unauthorized gain − variant a's (> 0: a cuts
    more than a random mask), over release means, paired by seed when both ran the same seeds."""
    pair = {n: m for n, m in zip(sorted(b["releases"]), sorted(a["releases"]))
            } if b["seeds"] == a["seeds"] else {}
    return compare(b["gains"], a["gains"], pair)


def control_rows(grids: dict, runs: dict) -> list[dict]:
    """Negative control (A/A: the first two dense releases) and positive control (the
    reparameterised dense releases vs their sources), per (preset, task)."""
    from scipy import stats
    out = []
    for (preset, task), doc in grids.items():
        res = release_results(doc)
        mine = [i for i in runs.values() if i["preset"] == preset]
        dense = [i["short"] for i in mine if i.get("group", i["short"]) == "dense"]
        names = {r["name"] for r in doc["config"]["releases"]}
        where = f"{preset} / {task}"
        if len(dense) >= 2 and all((n, "unauthorized") in res for n in dense[:2]):
            a, b = (res[(n, "unauthorized")]["gain"] for n in dense[:2])
            gap = statistics.fmean(a.values()) - statistics.fmean(b.values())
            seeds_p = float(stats.ttest_ind(list(a.values()), list(b.values()),
                                            equal_var=False).pvalue) \
                if min(len(a), len(b)) >= 2 else math.nan
            out.append({"control": "negative (A/A)", "where": where,
                        "releases": dense[:2], "gap": gap, "seeds_as_unit_p": seeds_p,
                        "value": f"gain gap {gap:+.4f} between two dense releases; a test with "
                                 f"fine-tuning seeds as the unit would give p {seeds_p:.3f}",
                        "verdict": "noise floor |gap| = " f"{abs(gap):.4f}"})
        reparam = [n.replace("dense", "reparam", 1) for n in dense]
        if any(n in names for n in reparam):
            test = compare(_by_release(res, dense, "unauthorized"),
                           _by_release(res, [n for n in reparam if n in names], "unauthorized"),
                           {d: d.replace("dense", "reparam", 1) for d in dense})
            detected = verdict(test, "detected", "reversed") == "detected"
            out.append({"control": "positive (reparameterised dense)", "where": where,
                        "releases": reparam, "test": test,
                        "value": f"gain cut (dense − reparameterised) {fmt(test)}",
                        "verdict": "detected" if detected else
                        "NOT detected: this fine-tuning grid is too weak to judge the claims"})
    return out


def instability(grids: dict) -> dict:
    """{"preset / task": {release: {mode: selected LR, edge flag, spike, failures}}}: every
    release of every grid, controls included."""
    out = {}
    for (preset, task), doc in grids.items():
        table = out.setdefault(f"{preset} / {task}", {})
        for (name, mode), r in release_results(doc).items():
            table.setdefault(name, {})[mode] = _instab(r)
    return out


def _instab(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {k: r[k] for k in ("lr", "lr_edge", "max_spike", "diverged_runs", "worse_runs",
                              "largest_stable_lr")}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# --- the claims table ---------------------------------------------------------------------------------
def claims(rows: list[dict], cfg, controls: list[dict] = ()) -> list[dict]:
    """The claims table: one row per claim and (preset, task[, variant or pair]); every tested
    row's p is Holm-adjusted over all of them before its verdict."""
    out = []
    tol, auc_max = cfg.claims.base_tolerance, cfg.claims.secrecy_auc
    noise = {c["where"]: abs(c["gap"]) for c in controls if c["control"].startswith("negative")}
    seen_base = set()
    for r in rows:
        where = f"{r['preset']} / {r['task']} / {r['variant']}"
        if (r["preset"], r["variant"]) not in seen_base and r["base_cost"] is not None:
            seen_base.add((r["preset"], r["variant"]))
            out.append({"claim": "base preserved", "where": f"{r['preset']} / {r['variant']}",
                        "value": f"val loss {r['base_loss']:.3f} vs dense {r['dense_loss']:.3f} "
                                 f"({r['base_cost']:+.1%}), mean of {len(r['releases'])} "
                                 "release(s)",
                        "verdict": "supported" if r["base_cost"] <= tol else "contradicted",
                        "rule": f"PMP val loss ≤ (1 + {tol:g}) × dense (release means)"})
        aa = noise.get(f"{r['preset']} / {r['task']}")
        out.append({"claim": "unauthorized gain cut (vs dense)", "where": where,
                    "test": r["gain_cut"], "noise": aa,
                    "rule": "dense gain − PMP unauthorized gain > 0"})
        if r.get("body_cut"):
            out.append({"claim": "unauthorized body-gain cut (vs dense)", "where": where,
                        "test": r["body_cut"], "noise": None,
                        "rule": "body gain (full − head-only) of dense − of PMP > 0"})
        out.append({"claim": "authorized ≥ unauthorized", "where": where,
                    "test": r["recovery"], "noise": None,
                    "rule": "PMP authorized − unauthorized test metric (oriented: > 0 = "
                            "authorized better), per release"})
    for a in rows:  # early-bird vs random, same everything else
        if a["mask_source"] != "earlybird":
            continue
        for b in rows:
            if (b["mask_source"] == "random" and b["preset"] == a["preset"]
                    and b["task"] == a["task"] and b.get("label") == a.get("label")
                    and all(b[k] == a[k] for k in ("mask_ratio", "complement", "score"))):
                test = vs_random(a, b)
                out.append({"claim": "early-bird better than random",
                            "where": f"{a['preset']} / {a['task']} / ρ {a['mask_ratio']:g} "
                                     f"{a['complement']}", "test": test, "noise": None,
                            "extra": f"base cost {_pct(a['base_cost'])} vs {_pct(b['base_cost'])}",
                            "rule": "gain cut (early-bird) − gain cut (random) > 0"})
    groups = {}
    for r in rows:
        groups.setdefault((r["preset"], r["task"], r["mask_source"], r["complement"], r["score"],
                           r.get("label")), []).append(r)
    for (preset, task, src, comp, _, _), rs in groups.items():
        if len({r["mask_ratio"] for r in rs}) < 2:
            continue
        lo, hi = min(rs, key=lambda r: r["mask_ratio"]), max(rs, key=lambda r: r["mask_ratio"])
        test = compare(hi["gains"], lo["gains"])
        out.append({"claim": "ρ trade-off (smaller ρ: larger gain cut, larger base cost)",
                    "where": f"{preset} / {task} / {src} {comp}: ρ {lo['mask_ratio']:g} vs "
                             f"{hi['mask_ratio']:g}", "test": test, "noise": None,
                    "extra": f"base cost {_pct(lo['base_cost'])} vs {_pct(hi['base_cost'])}",
                    "cost_ordered": (lo["base_cost"] or 0) >= (hi["base_cost"] or 0),
                    "rule": "gain cut (small ρ) − gain cut (large ρ) > 0 and "
                            "base cost (small ρ) ≥ base cost (large ρ)"})
    tested = [c for c in out if "test" in c]
    for c, p in zip(tested, holm([c["test"]["p"] for c in tested])):
        c["test"]["p_adj"] = p
        c["value"] = fmt(c["test"]) + (f"; {c['extra']}" if c.get("extra") else "")
        c["verdict"] = verdict(c["test"])
        if c["verdict"] == "supported" and c.get("cost_ordered") is False:
            c["verdict"] = "contradicted"
    for r in rows:
        if r["task"] != rows[0]["task"] or r["max_auc"] is None:
            continue
        out.append({"claim": "mask secrecy", "where": f"{r['preset']} / {r['variant']}",
                    "value": f"best attack folded AUC {r['max_auc']:.3f}"
                             + (f" ({r['max_auc_attack']})" if r.get("max_auc_attack") else "")
                             + f" over {len(r['releases'])} release(s)",
                    "verdict": "supported" if r["max_auc"] <= auc_max else "contradicted",
                    "rule": f"every attack's folded ROC AUC max(AUC, 1 − AUC) ≤ {auc_max:g} "
                            "(0.5 = chance)"})
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
