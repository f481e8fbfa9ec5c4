"""The study's secrecy part: `secrecy:` (public text, gradient attacks at their K, a shadow run
per variant with the target's public settings and its own seeds) reaches the attack suite;
results are cached under a key that changes with the attack settings; the secrecy table and its
Pareto plot fold every AUC; bad settings are one StudyError line before any run; the defence
study's config fits its hour by its own estimate."""
from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from helpers import CORPUS, REPO, write_study

sys.path.insert(0, str(REPO))

ALL = ["magnitude", "grad_abs", "grad_sign", "shadow"]
VARIANTS = [{"mask_ratio": [0.5], "mask_source": ["earlybird"]},
            {"mask_ratio": [0.5], "mask_source": ["earlybird"], "pmp": {"secret_order": False},
             "label": "D1off"}]


def study(tmp_path, tiny_data, **secrecy):
    return write_study(tmp_path, tiny_data, variants=VARIANTS,
                       secrecy={"attacks": ALL, "ks": [1, 2], **secrecy})


def setting(sets: list[str], key: str):
    return next((s.partition("=")[2] for s in sets if s.partition("=")[0] == key), None)


@pytest.mark.timeout(120)
def test_shadow_run_copies_public_settings_never_secrets(tiny_data, tmp_path):
    """One shadow per variant: the target's preset, recipe and pmp knobs, its own init seed,
    mask seed and data order (the public default order when the variant turns D1 off), on the
    public text, for the target's Stage II length unless told; the estimate counts it."""
    from pmp_scale.config import apply_overrides, parse_config, read_yaml
    from pmp_scale.study import prepare
    from pmp_scale.study.plan import SECRET_SETS, describe, estimate
    cfg, base_dir, plan = prepare(study(tmp_path, tiny_data, shadow={"seed": 99}))
    targets = {r.group: r for r in plan.runs if r.pmp is not None}
    assert set(plan.shadows) == set(targets) and len(targets) == 2
    for group, target in targets.items():
        shadow = plan.shadows[group]
        assert setting(target.sets, "pmp.mask_seed") == "3"  # the study's: a secret
        public = [s for s in shadow.sets if s.partition("=")[0] not in SECRET_SETS]
        assert public == [s for s in target.sets if s.partition("=")[0] not in SECRET_SETS]
        rc = parse_config(apply_overrides(read_yaml(base_dir / "pre.yaml"), shadow.sets))
        target_rc = parse_config(apply_overrides(read_yaml(base_dir / "pre.yaml"), target.sets))
        assert rc.seed == 99 and target_rc.seed == 3 and rc.pmp.mask_seed is None
        assert rc.pmp.model_dump(exclude={"mask_seed"}) == \
            target_rc.pmp.model_dump(exclude={"mask_seed"})
        assert rc.data.path == tiny_data["data"] and rc.train.max_steps == target_rc.train.max_steps
        assert str(shadow.run_dir).startswith(str(plan.out / "secrecy" / "shadows"))
    assert parse_config(apply_overrides(read_yaml(base_dir / "pre.yaml"), plan.shadows[
        "llama-tiny__r0.5_earlybird_frozen"].sets)).data.shuffle_seed is None  # drawn: D1 on
    assert setting(plan.shadows["llama-tiny__r0.5_earlybird_frozen_D1off"].sets,
                   "data.shuffle_seed") == "17"  # the public default order: D1 off
    est = estimate(cfg, plan)
    assert len(est["shadow_s"]) == 2 and est["total_s"] >= sum(est["shadow_s"].values()) \
        + 2 * est["attack_s"] + sum(est["pretrain_s"].values())
    assert "shadow run llama-tiny__r0.5_earlybird_frozen__shadow" in describe(cfg, plan, est)
    _, _, plan = prepare(study(tmp_path, tiny_data, shadow={"stage2_steps": 7}))
    assert all(setting(s.sets, "train.max_steps") == "7" and setting(s.sets, "seed") == "null"
               for s in plan.shadows.values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secrecy, message", [
    ({"public": "/nonexistent/mds"}, "secrecy.public /nonexistent/mds: neither prepared data"),
    ({"attacks": ["magnitude", "gradient"]}, "secrecy.attacks: 'gradient' is unknown"),
    ({"attacks": ["grad_abs@K8"]}, "secrecy.attacks: 'grad_abs@K8' is never run"),
    ({"ks": [0]}, "secrecy.ks.0"),
    ({"shadow": {"seed": 3}}, "secrecy.shadow.seed 3 is a target's init seed"),
    ({"public": str(CORPUS / "persuasion.txt.gz")}, "must be prepared data"),
])
def test_bad_secrecy_settings_fail_before_any_run(tiny_data, tmp_path, secrecy, message):
    from pmp_scale.study import StudyError, prepare
    with pytest.raises(StudyError) as err:
        prepare(study(tmp_path, tiny_data, **secrecy))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def _planted(save_tiny_llama, out, mask_dir, seed: int):
    """A llama-tiny release whose masked elements (random, ρ 0.5; 1-D tensors all trained)
    moved off θ(0), and its private mask: a leak through the magnitudes, planted."""
    from pmp_scale.mask import pack_bits, write_artifact
    from pmp_scale.release import record_release, release_sha256
    from pmp_scale.secrecy import Target
    save_tiny_llama(out, seed=seed)
    g = torch.Generator().manual_seed(seed)
    weights, masks = {}, {}
    for name, t in Target(out).tensors():
        w = t.float().reshape(-1)
        m = torch.rand(w.numel(), generator=g) < 0.5 if t.dim() == 2 else \
            torch.ones(w.numel(), dtype=torch.bool)
        weights[name] = torch.where(m, w + 0.05 * torch.randn(w.numel(), generator=g), w
                                    ).reshape(t.shape).contiguous()
        masks[name] = (pack_bits(m), tuple(t.shape))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_artifact(mask_dir, [(n, packed, shape) for n, (packed, shape) in masks.items()],
                   {"mask_ratio": 0.5})
    sha = release_sha256(out)
    record_release(mask_dir, sha, "fp32")
    return sha


@pytest.mark.timeout(300)
def test_study_attacks_with_public_text_and_its_shadow_then_reuses(save_tiny_llama, tiny_data,
                                                                    tmp_path):
    """The real suite through the study's path: a planted target release and a planted
    shadow (their pre-training replaced by completion records, as a finished study leaves
    them); public text = the study's data; grad@K at the study's K; the shadow classifier
    catches the planted leak. A rerun reuses the result; any change of the attack settings
    changes its key."""
    from pmp_scale.study import prepare
    from pmp_scale.study import run as r
    cfg, base_dir, plan = prepare(study(tmp_path, tiny_data, shadow={"seed": 99}))
    target = next(x for x in plan.runs if x.group == "llama-tiny__r0.5_earlybird_frozen")
    release = plan.out / "releases" / target.name
    sha = _planted(save_tiny_llama, release, target.run_dir / "private" / "mask", seed=1)
    r.write_json(plan.out / "releases" / f"{target.name}.done.json", {"sha256": sha})
    shadow = plan.shadows[target.group]
    shadow_release = plan.shadow_release(shadow)
    shadow_sha = _planted(save_tiny_llama, shadow_release,
                          shadow.run_dir / "private" / "mask", seed=2)
    r.write_json(shadow.run_dir / "study_done.json", {"name": shadow.name, "sets": shadow.sets})
    r.write_json(shadow_release.with_name(f"{shadow_release.name}.done.json"),
                 {"sha256": shadow_sha})
    ledger = r.Ledger()
    info = r.shadow(cfg, base_dir, plan, target.group, ledger)
    assert ledger.reused == [f"pre-training {shadow.name}", f"release {shadow.name}"]
    assert info["release_sha256"] == shadow_sha
    doc = r.secrecy(cfg, plan, target, release, ledger, info)
    assert set(doc["attacks"]) == {"magnitude", "grad_abs@K1", "grad_abs@K2", "grad_sign@K2",
                                   "shadow"}
    assert doc["attacks"]["shadow"]["auc"] > 0.7  # the planted leak, learnt on the shadow
    assert all(0 <= e["auc"] <= 1 and "groups" in e for e in doc["attacks"].values())
    report = plan.out / "secrecy" / target.name
    assert (report / "attack.md").is_file() and not (report / "masks").exists()
    cached = json.loads((plan.out / "secrecy" / f"{target.name}.json").read_text())
    assert cached["key"]["public"] == tiny_data["data"] and cached["key"]["ks"] == [1, 2]
    assert cached["key"]["shadow"]["release_sha256"] == shadow_sha
    assert r.secrecy(cfg, plan, target, release, ledger, info) == doc
    assert ledger.reused[-1] == f"secrecy {target.name}"
    key = r.secrecy_key(cfg, plan, target, info)
    assert key == cached["key"]
    for change in ({"ks": [1, 4]}, {"attacks": ["magnitude", "grad_abs", "shadow"]},
                   {"public": str(CORPUS / "persuasion.txt.gz"), "attacks": ["grad_abs"]}):
        other = cfg.model_copy(update={"secrecy": cfg.secrecy.model_copy(update=change)})
        assert r.secrecy_key(other, plan, target, info) != key, change
    _, _, plan2 = prepare(study(tmp_path, tiny_data, shadow={"seed": 98}))
    other_shadow = {**info, "sets": plan2.shadows[target.group].sets}
    assert r.secrecy_key(cfg, plan, target, other_shadow) != key


def _fixture_study():
    """A study.json-like dict: dense, early-bird (its best attack inverted: AUC 0.3), D4 and
    the random floor, one release each, with grid gains and base costs."""
    core = {"mask_ratio": 0.7, "complement": "frozen", "score": "step"}
    pmp = {"eb": {**core, "mask_source": "earlybird", "label": None, "extra": {}},
           "D4e1": {**core, "mask_source": "earlybird", "label": "D4e1",
                    "extra": {"noise_epsilon": 1.0}},
           "rand": {**core, "mask_source": "random", "label": None, "extra": {}}}
    runs = {"p__dense": {"preset": "p", "pmp": None, "short": "dense", "group": "dense"},
            **{f"p__{k}": {"preset": "p", "pmp": v, "short": k, "group": k}
               for k, v in pmp.items()}}

    def attack(auc, groups=None, q=None, p10=0.7):
        return {"auc": auc, "auc_quantile": q if q is not None else auc,
                "precision_at_top10": p10, "mask_share": 0.7, "groups": groups or {}}
    secrecy = {
        "p__eb": {"attacks": {
            "magnitude": attack(0.62, {"lm_head": {"auc": 0.95, "share": 0.005}}),
            "grad_snr@K4": attack(0.3, {"embedding": {"auc": 0.1, "share": 0.3},
                                        "attention": {"auc": 0.6, "share": 0.3}}, q=0.4,
                                  p10=0.9)}},
        "p__D4e1": {"attacks": {"magnitude": attack(0.55), "shadow": attack(0.58)}},
        "p__rand": {"attacks": {"magnitude": attack(0.69)}}}
    cost = {"eb": 0.02, "D4e1": 0.05, "rand": 0.01}
    gains = {"eb": 0.5, "D4e1": 0.58, "rand": 0.6}
    variants = [{"preset": "p", "task": "t", "variant": k, "releases": [k], "seeds": [None],
                 **{f: v[f] for f in ("mask_ratio", "mask_source", "complement", "score",
                                      "label")}, "base_cost": cost[k], "gains": {k: gains[k]}}
                for k, v in pmp.items()]
    return runs, secrecy, variants


@pytest.mark.timeout(60)
def test_secrecy_table_folds_and_the_pareto_plot_is_written(tmp_path):
    from pmp_scale.study.secrecy import secrecy_rows
    from pmp_scale.study.write import render, write_outputs
    runs, secrecy, variants = _fixture_study()
    rows = {r["variant"]: r for r in secrecy_rows(variants, runs, secrecy, {"check_every": 5})}
    assert list(rows) == ["eb", "D4e1", "rand"]
    eb = rows["eb"]
    assert eb["best_attack"] == "grad_snr@K4" and eb["best_auc"] == pytest.approx(0.7)
    assert eb["best_auc_quantile"] == pytest.approx(0.6)  # folded too
    assert eb["best_precision_at_top10"] == 0.9 and eb["mask_share"] == 0.7
    # lm_head's 0.95 is under 1 % of the elements: not a group the table ranks
    assert eb["worst_group"] == {"group": "embedding", "auc": pytest.approx(0.9),
                                 "attack": "grad_snr@K4"}
    assert eb["base_cost"] == 0.02 and eb["knobs_text"] == "ρ 0.7 earlybird; D1 on"
    [benefit] = eb["earlybird_benefit"]
    assert benefit["vs"] == "rand" and benefit["test"]["effect"] == pytest.approx(0.1)
    d4 = rows["D4e1"]
    assert d4["knobs_text"] == "ρ 0.7 earlybird; D1 on; D4 ε 1, clip 4"
    assert d4["best_attack"] == "shadow" and d4["earlybird_benefit"][0]["vs"] == "rand"
    assert rows["rand"]["earlybird_benefit"] == []  # the reference itself: blank
    doc = {"title": "t", "runs": runs, "grids": {}, "wall_s": 1.0,
           "work": {"done": [], "reused": []}, "claims": [], "controls": [], "variants": [],
           "instability": {}, "curvature": {}, "secrecy": secrecy,
           "secrecy_table": list(rows.values())}
    write_outputs(tmp_path, doc)
    md = (tmp_path / "study.md").read_text()
    assert md == render(json.loads((tmp_path / "study.json").read_text()))
    assert ("| p / eb | ρ 0.7 earlybird; D1 on | 1 of 1 | 0.700 (grad_snr@K4) | embedding "
            "0.900 (grad_snr@K4) | 0.600 | 0.90 (0.70) | +2.0% | +0.100 (releases 1 vs 1) |") in md
    assert "| p / rand | ρ 0.7 random; D1 on | 1 of 1 | 0.690 (magnitude) |" in md
    assert "| +1.0% |  |" in md  # the floor's own benefit: blank
    assert "![secrecy vs base cost](secrecy_pareto.png)" in md
    assert (tmp_path / "secrecy_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_claims_secrecy_row_is_folded_and_names_the_attack(monkeypatch):
    from pmp_scale.study import claims as C
    monkeypatch.setattr(C, "release_results", lambda doc: {})  # no fine-tuning grid needed
    runs, secrecy, _ = _fixture_study()
    rows = C.variant_rows({("p", "t"): {"base": {}}}, runs, secrecy, None)
    cfg = SimpleNamespace(claims=SimpleNamespace(base_tolerance=0.05, secrecy_auc=0.55))
    table = {c["where"]: c for c in C.claims(rows, cfg) if c["claim"] == "mask secrecy"}
    assert table["p / eb"]["value"].startswith("best attack folded AUC 0.700 (grad_snr@K4)")
    assert table["p / eb"]["verdict"] == "contradicted"  # 0.3 fails "≤ 0.55"
    assert "max(AUC, 1 − AUC)" in table["p / eb"]["rule"]


@pytest.mark.timeout(120)
def test_defence_study_fits_its_hour(monkeypatch):
    """configs/study/secrecy.yaml: every defence beside dense, the random floor and D1 off,
    a shadow per variant, ≤ 60 min by its own estimate figures (on 2 CPU ranks)."""
    from pmp_scale.study import plan as P
    from pmp_scale.study import prepare
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(P, "measured_tokens_per_s", lambda plan: None)  # the config's figures
    monkeypatch.setattr(P, "_has_cuda", lambda: False)
    cfg, _, plan = prepare(REPO / "configs" / "study" / "secrecy.yaml")
    extras = [r.pmp["extra"] for r in plan.runs if r.pmp is not None]
    assert {json.dumps(e, sort_keys=True) for e in extras} >= {
        "{}", '{"secret_order": false}', '{"placement": "per_tensor_random"}',
        '{"core_fraction": 0.5}', '{"noise_clip": 4.0, "noise_epsilon": 1.0}',
        '{"noise_clip": 4.0, "noise_epsilon": 4.0}', '{"rewind": "none"}'}
    assert any(r.pmp and r.pmp["mask_source"] == "random" for r in plan.runs)
    assert len(plan.shadows) == sum(r.pmp is not None for r in plan.runs) == 8
    est = P.estimate(cfg, plan)
    assert math.isfinite(est["total_s"]) and est["total_s"] <= 3600, est["total_s"] / 60
