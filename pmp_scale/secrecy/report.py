"""The attack suite, end to end: run the attacks, score them (owner's view), write the report.

    <out>/attack.md, attack.json, roc.png, masks/<attack>/  (predicted masks, private format)

Everything is written into a sibling temporary directory and renamed into place: an
interrupted run leaves no half-written report.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..mask.artifact import MaskArtifactError, move_into_place, read_artifact, write_artifact
from . import attacks as A
from .evaluate import (ATTACKER_RATIOS, GROUP_AUC, GROUP_SHARE, TENSOR_AUC, Sample, folded,
                       inverted, predicted_mask)
from .shadow import release_shadow, shadow_attack, train_shadow_run

DATA_FREE = ("bits", "constant", "magnitude", "magnitude_tensor", "magnitude_row",
             "magnitude_col", "init_likelihood", "seed_guess")
FIXES = {
    "bits": "draw θ(0) in fp32 (pmp_scale does, at any training precision) or release in the "
            "dtype θ(0) was drawn in",
    "constant": "keep pmp.exclude_constant_init: true (the default) so constant-initialised "
                "tensors are always trained",
    "seed_guess": "use a secret init seed (seed: null, the default for PMP runs)",
    "init_likelihood": "no setting closes it: the trained weights left the init distribution",
}
MAGNITUDE_FIX = ("no pmp_scale setting closes it: the mask is readable from weight sizes "
                 "(complement: project/decay make it worse); see README 'Mask secrecy'")
GRADIENT_FIX = ("no pmp_scale setting closes it for early-bird masks, which follow gradient size "
                "on public text; a random mask (mask_source: random) is not chosen from "
                "gradients — measure it; see README 'Mask secrecy'")


def fix_for(attack: str) -> str:
    family = attack.split("@")[0]
    if family in FIXES:
        return FIXES[family]
    if family in ("grad_abs", "fisher", "grad_sign", "grad_snr", "displacement", "structural",
                  "shadow"):
        return GRADIENT_FIX
    return MAGNITUDE_FIX


def check_private(target: A.Target, private_dir) -> dict:
    try:
        masks, meta = read_artifact(private_dir)
    except MaskArtifactError as e:
        raise A.AttackError(str(e)) from e
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    if shapes != target.shapes:
        diff = sorted(n for n in set(shapes) | set(target.shapes)
                      if shapes.get(n) != target.shapes.get(n))
        raise A.AttackError(f"{private_dir}: the mask does not describe this release "
                            f"({len(diff)} tensors differ in name or shape, e.g. {diff[0]!r}): "
                            "another architecture or another run's mask")
    return {"masks": masks, "meta": meta}


def build_attacks(target: A.Target, names=None, public=None, seeds=None, ks=(1, 4, 16, 64),
                  n_batches: int = 64, shadow: dict | None = None) -> list[A.Attack]:
    """The attacks asked for (default: every one the inputs allow)."""
    want = (lambda n: names is None or n in names or n.split("@")[0] in names)
    out = [a for a in A.data_free(target) if want(a.name)]
    if want("seed_guess"):
        out.append(A.seed_guess(target, tuple(seeds) if seeds else A.COMMON_SEEDS))
    batches = counts = None
    if public is not None:
        batches = A.public_batches(public, target, n_batches=max(max(ks), n_batches))
        counts = A.token_counts(batches, target.hf_config().vocab_size)
        out += [a for a in A.gradients(target, batches, ks) if want(a.name)]
        if want("displacement"):
            out.append(A.displacement(target, batches))
        if want("structural"):
            out.append(A.structural(target, counts))
    # Always trained by default (pmp.exclude_constant_init): every attack knows it, except the
    # exact channels, whose evidence (a frozen constant, zero low bits) overrides that default.
    known = A.constant_init_names(target)
    out = [a if a.name in ("constant", "bits") else A.with_known_trained(a, known) for a in out]
    if shadow is not None and want("shadow"):
        if shadow.get("release") is None:
            run = train_shadow_run(Path(shadow["config"]), Path(shadow["workdir"]),
                                   shadow.get("overrides", []), shadow.get("ranks", 2))
            shadow["release"], shadow["mask"] = release_shadow(run, Path(shadow["workdir"]))
        out.append(shadow_attack(target, Path(shadow["release"]), Path(shadow["mask"]), counts,
                                 batches[:16] if batches is not None else None))
    return out


def leaks(result: dict) -> list[str]:
    """The audit's failures: one line per attack that crosses the rule, naming channel and fix."""
    lines = []
    for name, r in result["attacks"].items():
        if r.get("auc") is None:
            continue
        groups = [(g, v["auc"]) for g, v in r["groups"].items()
                  if v["auc"] is not None and v["share"] >= GROUP_SHARE
                  and folded(v["auc"]) >= GROUP_AUC]
        tensors = [(t, a) for t, a in r["tensors"].items()
                   if a is not None and folded(a) >= TENSOR_AUC]
        if groups or tensors:
            where = [f"group {g} AUC {a:.3f}" for g, a in groups]
            if tensors:
                t, a = max(tensors, key=lambda ta: folded(ta[1]))
                where.append(f"{len(tensors)} tensor(s), e.g. {t} AUC {a:.3f}")
            fix = fix_for(name)
            lines.append(f"mask leak through {r['channel']} ({name}): {'; '.join(where)} — fix: {fix}")
    return lines


def run_attacks(release_dir, out_dir=None, private_dir=None, public=None, attacks=None,
                seeds=None, ratio: float | None = None, ks=(1, 4, 16, 64), shadow: dict | None = None,
                payoff_config=None, sample_cap: int = 1_000_000, write_masks: bool = True) -> dict:
    """Run the suite; with `private_dir` score every attack; with `out_dir` write the report."""
    target = A.Target(release_dir)
    private = check_private(target, private_dir) if private_dir is not None else None
    if ratio is None:
        ratio = (private["meta"]["total_selected"] / private["meta"]["total_numel"]
                 if private else 0.7)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        result = {"release": str(release_dir), "private": str(private_dir) if private else None,
                  "ratio": ratio, "sample_cap": sample_cap, "attacks": {}}
        kept = {}  # attack name -> (attack, invert, thresholds at the attacker ratios): payoff
        for attack in build_attacks(target, attacks, public, seeds, ks, shadow=shadow):
            t0 = time.perf_counter()
            sample = Sample(attack, target.shapes, private["masks"] if private else None,
                            sample_cap=sample_cap)
            entry = {"needs": attack.needs, "channel": attack.channel, **attack.info}
            if private:
                entry.update(sample.evaluate())
            # the owner's view orients an inverted score: its mask is never the anti-mask
            invert = bool(private) and inverted(entry.get("auc"))
            if out_dir is not None and write_masks:
                write_artifact(tmp / "masks" / attack.name.replace("@", "_"),
                               predicted_mask(attack, sample, ratio, target.shapes,
                                              invert=invert),
                               {"predicted_by": attack.name, "mask_ratio": ratio,
                                "inverted": invert, "release": str(release_dir)})
            if payoff_config is not None:
                kept[attack.name] = (attack, invert, {r: sample.threshold(r, invert)
                                                      for r in ATTACKER_RATIOS})
            entry["time_s"] = round(time.perf_counter() - t0, 2)
            result["attacks"][attack.name] = entry
        result["leaks"] = leaks(result) if private else []
        if payoff_config is not None and private and out_dir is not None:
            from .payoff import best_attack, payoff
            best = best_attack(result)
            attack, invert, thresholds = kept[best]
            stem = best.replace("@", "_")
            masks = {ratio: tmp / "masks" / stem}
            for r, thr in thresholds.items():
                masks[r] = tmp / "masks" / f"{stem}_top{round(100 * r)}"
                write_artifact(masks[r], predicted_mask(attack, None, r, target.shapes,
                                                        invert=invert, threshold=thr),
                               {"predicted_by": best, "mask_ratio": r, "inverted": invert,
                                "release": str(release_dir)})
            result["payoff"] = payoff(payoff_config, release_dir, private_dir, best, masks)
        if out_dir is not None:
            from .render import write_outputs
            write_outputs(result, tmp)
            move_into_place(tmp, out_dir)
        return result
    except BaseException:
        if out_dir is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

