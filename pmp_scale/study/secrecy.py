"""The study's secrecy measurements: the attack suite (`pmp_scale.secrecy.run_attacks`: data-free,
public-text and shadow attacks, as `secrecy:` names them) on every PMP release, scored against
its private mask, and the secrecy table: per variant its defence knobs, its best attack by
folded AUC, the worst layer group, the base cost and the early-bird benefit beside it.

Without `pmp_scale.secrecy`'s dependencies one baseline attack stands in: score = |w| globally
(trained elements drift away from the small init), its AUC computed on a fixed random sample.
"""
from __future__ import annotations

import math
from pathlib import Path

SAMPLE = 2_000_000  # elements per release for the fallback's AUC
# The defences (docs/secrecy.md) as `pmp.*` keys, in the order the table names them.
DEFENCES = (("secret_order", "D1"), ("placement", "D2"), ("core_fraction", "D3"),
            ("noise_epsilon", "D4"), ("rewind", "D6"))


def mask_secrecy(release_dir, out_dir, private_dir, attacks, public=None, ks=(1, 4, 16, 64),
                 shadow: dict | None = None) -> dict:
    """Per attack: AUC, q-AUC, P@10 %, per-group AUCs (raw: fold them to read them). The full
    report (attack.md, ROC plot) is written to `out_dir`; predicted masks are not (the study
    reads scores; tools/attack_mask.py writes masks to use)."""
    try:
        from ..secrecy import run_attacks
        doc = run_attacks(str(release_dir), str(out_dir), private_dir=str(private_dir),
                          public=public, attacks=tuple(attacks), ks=tuple(ks), shadow=shadow,
                          write_masks=False)
    except ImportError:  # not installed (or not importable here): the stand-in
        return global_magnitude_auc(release_dir, private_dir)
    keep = ("auc", "auc_quantile", "precision_at_top10", "mask_share", "channel", "time_s")
    return {"source": "pmp_scale.secrecy.run_attacks",
            "attacks": {k: {**{f: v.get(f) for f in keep},
                            "groups": {g: {"auc": x["auc"], "share": x["share"]}
                                       for g, x in v.get("groups", {}).items()}}
                        for k, v in doc["attacks"].items()}}


def global_magnitude_auc(release_dir, private_dir) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from ..mask import read_artifact, unpack_bits
    from ..release import release_tensors
    masks, _ = read_artifact(Path(private_dir))
    scores, labels = [], []
    for name, t in release_tensors(Path(release_dir)):
        if name in masks:
            scores.append(t.float().abs().reshape(-1))
            labels.append(unpack_bits(masks[name], t.numel()))
    s, y = torch.cat(scores), torch.cat(labels)
    if s.numel() > SAMPLE:
        pick = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]
        s, y = s[pick], y[pick]
    auc = float(roc_auc_score(y.numpy().astype(np.int8), s.numpy())) \
        if 0 < int(y.sum()) < y.numel() else math.nan
    return {"source": "fallback: global |w| ROC AUC (pmp_scale.secrecy not installed)",
            "attacks": {"magnitude_global": {"auc": auc}}}


# --- the secrecy table ----------------------------------------------------------------------------
def defence_knobs(pmp: dict, study_pmp: dict) -> dict:
    """The variant's effective defence settings (its block's `pmp` over the study's, over the
    defaults), D4's clip included when D4 is on."""
    from ..config import PMPConfig
    eff = {**study_pmp, **(pmp.get("extra") or {})}
    out = {k: eff.get(k, PMPConfig.model_fields[k].default) for k, _ in DEFENCES}
    if out["noise_epsilon"] is not None:
        out["noise_clip"] = eff.get("noise_clip", PMPConfig.model_fields["noise_clip"].default)
    return out


def knobs_text(pmp: dict, knobs: dict) -> str:
    """'ρ 0.7 earlybird; D1 on; D4 ε 1, clip 4': the mask and every defence not at its default
    (D1 is named either way: it is on by default)."""
    from ..config import PMPConfig
    parts = [f"ρ {pmp['mask_ratio']:g} {pmp['mask_source']}"
             + ("" if pmp.get("complement", "frozen") == "frozen" else f" {pmp['complement']}")
             + ("" if pmp.get("score", "step") == "step" else f" score {pmp['score']}"),
             "D1 on" if knobs["secret_order"] else "D1 off (secret_order false)"]
    for key, tag in DEFENCES[1:]:
        if knobs[key] != PMPConfig.model_fields[key].default:
            value = (f"ε {knobs[key]:g}, clip {knobs['noise_clip']:g}" if key == "noise_epsilon"
                     else f"{key} {knobs[key]}")
            parts.append(f"{tag} {value}")
    return "; ".join(parts)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def secrecy_rows(variants: list[dict], runs: dict, secrecy: dict, study_pmp: dict) -> list[dict]:
    """One row per (preset, PMP variant). Every AUC is folded (max(AUC, 1 − AUC): an attack at
    0.3 is a 0.7 attack) and averaged over the variant's releases per attack; the best attack is
    the one with the highest mean; its q-AUC (folded) and P@10 % are given beside it; the worst
    layer group (≥ GROUP_SHARE of the elements) is the one where some attack does best. Base
    cost and the early-bird benefit come from the claims' variant rows (blank when the grid
    did not measure them)."""
    from ..secrecy.evaluate import GROUP_SHARE, folded
    from .claims import vs_random
    from .stats import fmt
    groups: dict[tuple, list[str]] = {}
    for name, info in runs.items():
        if info["pmp"] is not None:
            groups.setdefault((info["preset"], info.get("group", info["short"])), []).append(name)
    rows = []
    for (preset, group), names in groups.items():
        pmp = runs[names[0]]["pmp"]
        knobs = defence_knobs(pmp, study_pmp)
        per_attack: dict[str, list[dict]] = {}
        for n in names:
            for attack, e in ((secrecy.get(n) or {}).get("attacks") or {}).items():
                if e.get("auc") is not None and math.isfinite(e["auc"]):
                    per_attack.setdefault(attack, []).append(e)
        mean_auc = {a: _mean(folded(e["auc"]) for e in es) for a, es in per_attack.items()}
        best = max(mean_auc, key=mean_auc.get) if mean_auc else None
        worst = None  # (group, folded AUC, attack)
        for attack, es in per_attack.items():
            for g in {g for e in es for g in (e.get("groups") or {})}:
                vals = [e["groups"][g] for e in es if g in (e.get("groups") or {})]
                auc = _mean(folded(v["auc"]) for v in vals
                            if v["auc"] is not None and v["share"] >= GROUP_SHARE)
                if auc is not None and (worst is None or auc > worst[1]):
                    worst = (g, auc, attack)
        es = per_attack.get(best, [])
        mine = [r for r in variants if r["preset"] == preset and r["variant"] == group]
        benefit = []
        for r in mine:
            ref = _random_reference(r, variants)
            if ref is not None:
                test = vs_random(r, ref)
                benefit.append({"task": r["task"], "vs": ref["variant"], "test": test,
                                "text": fmt(test, 3) if math.isfinite(test["effect"]) else None})
        rows.append({
            "preset": preset, "variant": group, "releases": len(names),
            "measured": sum(1 for n in names if secrecy.get(n)), **{k: pmp.get(k) for k in (
                "mask_ratio", "mask_source", "complement", "score", "label")},
            "knobs": knobs, "knobs_text": knobs_text(pmp, knobs),
            "best_attack": best, "best_auc": mean_auc.get(best),
            "best_auc_quantile": _mean(folded(e.get("auc_quantile")) for e in es),
            "best_precision_at_top10": _mean(e.get("precision_at_top10") for e in es),
            "mask_share": _mean(e.get("mask_share") for e in es),
            "worst_group": None if worst is None else
            {"group": worst[0], "auc": worst[1], "attack": worst[2]},
            "base_cost": next((r["base_cost"] for r in mine if r["base_cost"] is not None), None),
            "earlybird_benefit": benefit})
    return rows


def _random_reference(row: dict, variants: list[dict]) -> dict | None:
    """The random-mask variant `row` is compared with: same preset, task, ρ, complement and
    score; the same label if there is one, else the unlabelled one (the floor of a defence
    study). None for a random variant itself."""
    if row["mask_source"] == "random":
        return None
    same = [b for b in variants if b["mask_source"] == "random"
            and all(b[k] == row[k] for k in ("preset", "task", "mask_ratio", "complement",
                                             "score"))]
    return next((b for b in same if b.get("label") == row.get("label")),
                next((b for b in same if b.get("label") is None), None))
