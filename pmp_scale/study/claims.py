"""The paper's claims, each checked by a rule stated in the report, from the study's measurements.

Rule for every comparison over fine-tuning seeds: a difference is called when its mean lies
beyond two standard errors (2·std/√n) of zero, otherwise the verdict is "inconclusive". Base
quality (one pre-training run per variant, n = 1) is compared with a tolerance instead, and
secrecy with an AUC threshold. Nothing here chooses settings: it only reads what ran.
"""
from __future__ import annotations

import math
import statistics

RULE = ("a difference is called when |mean| > 2·SE (SE = std/√n over fine-tuning seeds, paired "
        "by seed); otherwise inconclusive")


def _ms(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    std = statistics.stdev(values) if n > 1 else (0.0 if n else math.nan)
    return {"mean": mean, "std": std, "n": n}


def verdict(stats: dict, positive: str = "supported", negative: str = "contradicted") -> str:
    m, s, n = stats["mean"], stats["std"], stats["n"]
    if n == 0 or math.isnan(m):
        return "no data"
    se = s / math.sqrt(n)
    if m > 2 * se:
        return positive
    if m < -2 * se:
        return negative
    return "inconclusive"


def _gaps_for(doc: dict, variant: str) -> dict:
    """The report's paired gaps with `variant` as the PMP release, at the longest duration."""
    from ..nft.report import parse_report_config
    from ..nft.summary import gaps
    rc = parse_report_config(doc["config"]).model_copy(update={"pmp": variant})
    rows = gaps(rc, doc["summary"])
    longest = max((g["steps"] for g in rows), default=None)
    return {g["label"].split(":")[0]: g for g in rows if g["steps"] == longest}


def variant_rows(grids: dict, runs: dict, secrecy: dict, cfg) -> list[dict]:
    """One row per (preset, variant, task): base cost, gain cut, authorized recovery, AUC."""
    rows = []
    for (preset, task), doc in grids.items():
        base = doc["base"]
        for name, info in runs.items():
            if info["preset"] != preset or info["pmp"] is None:
                continue
            v = info["short"]
            g = _gaps_for(doc, v)
            cut = g.get("non-fine-tunability gap")
            rec = g.get("authorized recovery")
            dense_loss = base.get("dense", {}).get("loss")
            loss = base.get(v, {}).get("loss")
            from ..secrecy.evaluate import folded  # an AUC of 0.3 is a 0.7 attack, inverted
            aucs = [a.get("auc") for a in (secrecy.get(name) or {}).get("attacks", {}).values()]
            aucs = [folded(a) for a in aucs if a is not None and not math.isnan(a)]
            rows.append({
                "preset": preset, "task": task, "variant": v, "run": name, **info["pmp"],
                "steps": None if cut is None else cut["steps"],
                "base_loss": loss, "dense_loss": dense_loss,
                "base_cost": None if loss is None or not dense_loss else loss / dense_loss - 1,
                "gain_cut": _ms(cut["per_seed_gain"]) if cut else _ms([]),
                "gain_cut_per_seed": cut["per_seed_gain"] if cut else [],
                "recovery": _ms(rec["per_seed"]) if rec else _ms([]),
                "max_auc": max(aucs) if aucs else None,
                "tokens_per_s": info.get("tokens_per_s"), "discovery": info.get("discovery")})
    return rows


def _paired(a: list[float], b: list[float]) -> dict:
    return _ms([x - y for x, y in zip(a, b)])


def claims(rows: list[dict], cfg) -> list[dict]:
    """The claims table: one row per claim and (preset, task[, variant or pair])."""
    out = []
    tol, auc_max = cfg.claims.base_tolerance, cfg.claims.secrecy_auc
    seen_base = set()
    for r in rows:
        where = f"{r['preset']} / {r['task']} / {r['variant']}"
        if (r["preset"], r["variant"]) not in seen_base and r["base_cost"] is not None:
            seen_base.add((r["preset"], r["variant"]))
            out.append({"claim": "base preserved", "where": f"{r['preset']} / {r['variant']}",
                        "value": f"val loss {r['base_loss']:.3f} vs dense {r['dense_loss']:.3f} "
                                 f"({r['base_cost']:+.1%}), n=1",
                        "verdict": "supported" if r["base_cost"] <= tol else "contradicted",
                        "rule": f"PMP val loss ≤ (1 + {tol:g}) × dense"})
        out.append({"claim": "unauthorized gain cut (vs dense)", "where": where,
                    "value": _fmt(r["gain_cut"]), "verdict": verdict(r["gain_cut"]),
                    "rule": "dense gain − PMP unauthorized gain > 0"})
        out.append({"claim": "authorized ≥ unauthorized", "where": where,
                    "value": _fmt(r["recovery"]), "verdict": verdict(r["recovery"]),
                    "rule": "PMP unauthorized − authorized test metric (positive = authorized "
                            "better) > 0"})
    for a in rows:  # early-bird vs random, same everything else
        if a["mask_source"] != "earlybird":
            continue
        for b in rows:
            if (b["mask_source"] == "random" and b["preset"] == a["preset"]
                    and b["task"] == a["task"] and all(b[k] == a[k] for k in
                                                       ("mask_ratio", "complement", "score"))):
                d = _paired(a["gain_cut_per_seed"], b["gain_cut_per_seed"])
                out.append({"claim": "early-bird better than random",
                            "where": f"{a['preset']} / {a['task']} / ρ {a['mask_ratio']:g} "
                                     f"{a['complement']}",
                            "value": f"gain cut Δ {_fmt(d)}; base cost "
                                     f"{_pct(a['base_cost'])} vs {_pct(b['base_cost'])}",
                            "verdict": verdict(d),
                            "rule": "gain cut (early-bird) − gain cut (random) > 0"})
    groups = {}
    for r in rows:
        groups.setdefault((r["preset"], r["task"], r["mask_source"], r["complement"], r["score"]),
                          []).append(r)
    for (preset, task, src, comp, _), rs in groups.items():
        if len({r["mask_ratio"] for r in rs}) < 2:
            continue
        lo, hi = min(rs, key=lambda r: r["mask_ratio"]), max(rs, key=lambda r: r["mask_ratio"])
        d = _paired(lo["gain_cut_per_seed"], hi["gain_cut_per_seed"])
        v = verdict(d)
        if v == "supported" and not (lo["base_cost"] or 0) >= (hi["base_cost"] or 0):
            v = "contradicted"
        out.append({"claim": "ρ trade-off (smaller ρ: larger gain cut, larger base cost)",
                    "where": f"{preset} / {task} / {src} {comp}: ρ {lo['mask_ratio']:g} vs "
                             f"{hi['mask_ratio']:g}",
                    "value": f"gain cut Δ {_fmt(d)}; base cost {_pct(lo['base_cost'])} vs "
                             f"{_pct(hi['base_cost'])}",
                    "verdict": v, "rule": "gain cut (small ρ) − gain cut (large ρ) > 0 and "
                                          "base cost (small ρ) ≥ base cost (large ρ)"})
    for r in rows:
        if r["task"] != rows[0]["task"] or r["max_auc"] is None:
            continue
        out.append({"claim": "mask secrecy", "where": f"{r['preset']} / {r['variant']}",
                    "value": f"best data-free attack AUC {r['max_auc']:.3f}, n=1 release",
                    "verdict": "supported" if r["max_auc"] <= auc_max else "contradicted",
                    "rule": f"every attack's ROC AUC ≤ {auc_max:g} (0.5 = chance)"})
    return out


def _fmt(s: dict) -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "n/a"
    return f"{s['mean']:+.4f} ± {s['std']:.4f} (n={s['n']})"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
