"""Mask secrecy: each exact leak planted and caught, the default path clean, the attack scores
checked against hand computations, the shadow and payoff attacks end to end, bad inputs.

Synthetic releases are tiny HF models written here; the real-path ones come from the shared
launch (`leaky`: public seed + maskable constant-init norms; `release_source`, `pmp_frozen_bf16`:
the default path, fp32 and bf16 training)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from pmp_scale.mask import pack_bits, read_artifact, write_artifact
from pmp_scale.release import (ReleaseError, record_release, release_checkpoint, release_sha256,
                               resolve_checkpoint)
from pmp_scale.secrecy import audit_release, run_attacks
from pmp_scale.release.channels import MIN_CHANNEL_ELEMENTS, release_channels, trailing_zero_bits
from tools import attack_mask as attack_cli
from tools import audit_release as audit_cli

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"

DATA_FREE = ["bits", "constant", "magnitude", "seed_guess"]


def hand_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a masked element > score of a frozen one), ties counting one half: every pair
    compared (small inputs only)."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def rank_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """The same by the Mann–Whitney rank sum (average ranks for ties), for the whole model."""
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def synthetic(save_tiny_llama, tmp_path_factory):
    """A llama-tiny release whose complement is θ(0) of seed 99 and whose mask elements moved,
    with its private mask (random, ρ = 0.6, norm weights always trained)."""
    from pmp_scale.secrecy import Target
    root = tmp_path_factory.mktemp("synthetic")
    save_tiny_llama(root / "base")
    theta0 = dict(Target(root / "base").init_replay(99))
    g = torch.Generator().manual_seed(3)
    weights, masks = {}, {}
    for name, t0 in theta0.items():
        m = (torch.ones(t0.numel(), dtype=torch.bool) if "norm" in name
             else torch.rand(t0.numel(), generator=g) < 0.6)
        moved = t0.reshape(-1) + 0.01 * torch.randn(t0.numel(), generator=g)
        weights[name] = torch.where(m, moved, t0.reshape(-1)).reshape(t0.shape)
        masks[name] = m
    return {"root": root, "theta0": theta0, "weights": weights, "masks": masks}


def make_release(synthetic, name, weights=None, masks=None):
    """A release dir + bound private mask from (possibly planted) weights and masks."""
    root = synthetic["root"] / name
    shutil.copytree(synthetic["root"] / "base", root / "release")
    weights = weights or synthetic["weights"]
    masks = masks or synthetic["masks"]
    save_file({n: t.contiguous() for n, t in weights.items()},
              str(root / "release" / "model.safetensors"), metadata={"format": "pt"})
    write_artifact(root / "mask", [(n, pack_bits(m), tuple(weights[n].shape))
                                   for n, m in masks.items()], {"mask_ratio": 0.6})
    record_release(root / "mask", release_sha256(root / "release"), "fp32")
    return root / "release", root / "mask"


def test_scores_equal_hand_computation(synthetic):
    release, mask = make_release(synthetic, "clean")
    result = run_attacks(release, private_dir=mask, attacks=["magnitude", "bits"])
    w, m = synthetic["weights"], synthetic["masks"]
    # constant-initialised tensors (norm weights) are always trained by default: every attack
    # scores them as known trained, above anything else
    top = np.finfo(np.float32).max
    scores = np.concatenate([np.full(w[n].numel(), top, dtype=np.float32) if "norm" in n
                             else w[n].reshape(-1).abs().numpy() for n in sorted(w)])
    labels = np.concatenate([m[n].numpy() for n in sorted(m)])
    r = result["attacks"]["magnitude"]
    assert r["known_trained_tensors"] == sum("norm" in n for n in w)
    assert r["sampled"] == r["total"] == labels.size  # small model: no sampling, exact
    assert r["auc"] == pytest.approx(rank_auc(scores[labels], scores[~labels]), abs=1e-9)
    name = "model.layers.0.self_attn.k_proj.weight"
    s, y = w[name].reshape(-1).abs().numpy(), m[name].numpy()
    assert r["tensors"][name] == pytest.approx(hand_auc(s[y], s[~y]), abs=1e-9)
    # precision at the true complement size: the |M̄| smallest |w| called frozen
    k = int((~labels).sum())
    lowest = np.argsort(scores, kind="stable")[:k]
    assert r["precision_at_true_size"] == pytest.approx((~labels[lowest]).mean(), abs=2e-3)
    # bits: trailing zero mantissa bits, hand-checked on known patterns
    t = torch.tensor([1.0, 1.5, 1.25, 1.0 + 2 ** -23, 0.0, 3.0])
    assert trailing_zero_bits(t).tolist() == [23, 22, 21, 0, 23, 22]
    assert trailing_zero_bits(t.bfloat16()).tolist() == [7, 6, 5, 7, 7, 6]


def test_chunked_scans_equal_whole_tensor_reference(monkeypatch):
    """The memory-bounded scans (chunks of CHUNK elements) give what one whole-tensor pass gives:
    the spike (a global torch.unique), the zero-bit counts and the sampling stream."""
    from pmp_scale import chunking
    from pmp_scale.secrecy import evaluate, stats
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    torch.manual_seed(0)
    pinned = torch.randn(10_500)
    pinned[torch.rand(pinned.numel()) < 0.2] = 1.0
    for t in (pinned, torch.randn(10_500), torch.randn(10_500).bfloat16(), torch.zeros(3)):
        values, counts = torch.unique(t, return_counts=True)
        i = int(counts.argmax())
        found = stats.spike(t)
        if found is not None:
            assert (found[0], found[1]) == (float(values[i]), int(counts[i]))
        assert (found is not None) == (t is pinned)
    assert stats.constant_score(pinned).eq(-1).sum() == pinned.eq(1.0).sum()
    whole = torch.randn(10_500)
    ref = [stats.trailing_zero_bits(whole[i:i + 1]).item() for i in range(0, 10_500, 97)]
    assert stats.trailing_zero_bits(whole)[::97].tolist() == ref
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    keep = evaluate._keep(10_500, 0.3, g1)
    assert torch.equal(keep, (torch.rand(10_500, generator=g2) < 0.3).nonzero().squeeze(1))
    bits = torch.rand(10_500) < 0.7
    assert torch.equal(evaluate._labels(pack_bits(bits), 10_500, keep), bits[keep])


def test_constant_attack_finds_each_spike_once_over_both_passes(synthetic, monkeypatch):
    """The attack streams its scores twice (scoring, then the predicted mask); the spike's exact
    counts run once per tensor and both passes equal the uncached score."""
    from pmp_scale.secrecy import Target, attacks, stats
    planted = dict(synthetic["weights"])
    norm = next(n for n in planted if "norm" in n)
    planted[norm] = planted[norm].clone().reshape(-1)
    planted[norm][: planted[norm].numel() // 2] = 1.0
    planted[norm] = planted[norm].reshape(synthetic["weights"][norm].shape)
    release, _ = make_release(synthetic, "constant_once", planted)
    target = Target(release)
    calls = []
    spike = stats.spike
    monkeypatch.setattr(stats, "spike", lambda t: calls.append(1) or spike(t))
    constant = next(a for a in attacks.data_free(target) if a.name == "constant")
    first, second = dict(constant.scores()), dict(constant.scores())
    assert len(calls) == len(target.names)
    for name in target.names:
        reference = stats.constant_score(target.get(name))
        assert torch.equal(first[name], reference) and torch.equal(second[name], reference)
    assert first[norm].eq(-1).sum() == planted[norm].numel() // 2


def test_planted_bf16_init_is_caught_by_bits_and_audit(synthetic, capsys):
    """θ(0) drawn in bf16, released in fp32: the complement's low 16 bits are zero."""
    planted = {n: torch.where(synthetic["masks"][n].reshape(t.shape), t,
                              synthetic["theta0"][n].bfloat16().float())
               for n, t in synthetic["weights"].items()}
    release, mask = make_release(synthetic, "bf16_init", planted)
    auc = run_attacks(release, private_dir=mask, attacks=["bits"])["attacks"]["bits"]["auc"]
    assert auc > 0.95
    assert audit_cli.main([str(release)]) == 1  # without the mask: the release's own statistics
    out = capsys.readouterr().out
    assert "bits channel" in out and "audit FAILED" in out
    problems = audit_release(release, mask, load=False).problems
    assert any("bit patterns (bits)" in p and "fp32" in p for p in problems), problems


def test_chance_round_values_are_no_channel_but_a_narrow_population_is():
    """A 64-element bias after four Adam steps held 0.0034942626953125 (16 zero low bits) by
    chance and the audit once refused the release for it. One or a few such values are chance;
    MIN_CHANNEL_ELEMENTS bf16-drawn ones (or a constant spike above that many) are a channel."""
    torch.manual_seed(0)
    bias = torch.randn(64) * 1e-2
    bias[5] = 0.0034942626953125
    assert trailing_zero_bits(bias[5:6]).item() >= 16
    assert release_channels("ln.bias", bias) == []
    k = MIN_CHANNEL_ELEMENTS
    few = bias.clone()
    few[:k - 1] = few[:k - 1].bfloat16().float()
    assert release_channels("ln.bias", few) == []
    planted = bias.clone()
    planted[:k] = planted[:k].bfloat16().float()
    assert "bits channel" in release_channels("ln.bias", planted)[0]
    pinned = bias.clone()
    pinned[:k + 1] = 1.0
    assert "constant channel" in release_channels("ln.bias", pinned)[0]


def test_planted_leaks_through_the_real_path(dist_results, tmp_path, capsys):
    """`leaky`: seed 1234 and constant-init norms in the mask. The release path refuses it; a
    research release (--allow-leaks) is caught by the constant and seed attacks and the audit."""
    run = dist_results / "leaky"
    with pytest.raises(ReleaseError, match="constant channel"):
        release_checkpoint(resolve_checkpoint(run), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".*tmp-*"))
    private = tmp_path / "mask"
    shutil.copytree(run / "private" / "mask", private)
    release_checkpoint(resolve_checkpoint(run), tmp_path / "rel", private_dir=private,
                       progress=False, allow_leaks=True)
    result = run_attacks(tmp_path / "rel", private_dir=private, attacks=DATA_FREE)
    a = result["attacks"]
    assert a["constant"]["groups"]["norm"]["auc"] > 0.95  # frozen norms sit at 1.0: score -1
    assert a["seed_guess"]["best_seed"] == 1234 and a["seed_guess"]["auc"] > 0.95
    assert audit_cli.main([str(tmp_path / "rel"), "--private", str(private)]) == 1
    fails = [x for x in capsys.readouterr().out.splitlines() if x.startswith("FAIL")]
    assert any("init-seed guessing" in x and "secret init seed" in x for x in fails), fails
    assert any("constant channel" in x for x in fails), fails


def test_default_path_has_no_exact_channel(dist_results, tmp_path):
    """Secret seed, constant-init tensors trained, fp32 θ(0) — also for a bf16 run released in
    fp32: bits, constant and seed attacks at chance, audit clean."""
    # pmp_frozen_bf16 has the scenarios' public seed 7: only its bits and constants are checked
    for run, attacks in (("release_source", DATA_FREE), ("pmp_frozen_bf16", ["bits", "constant"])):
        private = tmp_path / run / "mask"
        shutil.copytree(dist_results / run / "private" / "mask", private)
        release_checkpoint(resolve_checkpoint(dist_results / run), tmp_path / run / "rel",
                           private_dir=private, progress=False)
        result = run_attacks(tmp_path / run / "rel", private_dir=private, attacks=attacks)
        for name in attacks:
            auc = result["attacks"][name]["auc"]
            assert 0.45 <= auc <= 0.55, (run, name, auc)
        problems = audit_release(tmp_path / run / "rel", private, load=False).problems
        assert not [p for p in problems if any(f"({a})" in p or f"{a} channel" in p
                                               for a in attacks)], problems


def test_cli_public_data_attacks_write_usable_masks(synthetic, tmp_path, capsys):
    from pmp_scale.finetune.release_check import Release, check_mask
    release, mask = make_release(synthetic, "cli")
    out = tmp_path / "report"
    assert attack_cli.main([str(release), "--out", str(out), "--private", str(mask),
                            "--public", str(CORPUS / "persuasion.txt.gz"), "--k", "1,2",
                            "--attacks", "magnitude,grad_abs,fisher,displacement,structural"]) == 0
    assert {p.name for p in out.iterdir()} == {"attack.md", "attack.json", "roc.png", "masks"}
    doc = json.loads((out / "attack.json").read_text())
    assert set(doc["attacks"]) == {"magnitude", "grad_abs@K1", "fisher@K1", "grad_abs@K2",
                                   "fisher@K2", "displacement", "structural"}
    predicted = out / "masks" / "grad_abs_K2"
    tensors, meta = read_artifact(predicted)
    true_share = (sum(int(m.sum()) for m in synthetic["masks"].values())
                  / sum(m.numel() for m in synthetic["masks"].values()))
    assert meta["total_selected"] / meta["total_numel"] == pytest.approx(true_share, abs=0.01)
    check_mask(predicted, Release.open(release), allow_unbound=True)  # usable for fine-tuning
    assert "| grad_abs@K2 |" in capsys.readouterr().out


def test_bad_inputs_one_line_nothing_written(synthetic, tiny_data, tmp_path, capsys):
    release, mask = make_release(synthetic, "bad")
    out = tmp_path / "out"

    def fails(argv, expected):
        assert attack_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))

    other = tmp_path / "other_mask"
    write_artifact(other, [("model.embed_tokens.weight", pack_bits(torch.ones(10, dtype=torch.bool)),
                            (2, 5))], {})
    fails([str(release), "--out", str(out), "--private", str(other)], "does not describe this release")
    fails([str(release), "--out", str(out), "--public", str(tmp_path / "none*.txt"),
           "--attacks", "grad_abs"], "public data")
    fails([str(release), "--out", str(out), "--attacks", "grad_abs"], "need --public")
    fails([str(tmp_path / "nowhere"), "--out", str(out)], "no release at")
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails([str(broken), "--out", str(out)], "cannot be read")
    assert audit_cli.main([str(tmp_path)]) == 2  # not a release: says what is missing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0], err


def test_shadow_attack_and_payoff(dist_results, tiny_data, tmp_path, single_process_group):
    """The attacker's own PMP run through the launcher, a classifier on its elements, applied to
    a Llama release; then fine-tuning with the recovered mask against the true mask."""
    run = dist_results / "pmp_frozen_fp32"
    private = tmp_path / "mask"
    shutil.copytree(run / "private" / "mask", private)
    release_checkpoint(resolve_checkpoint(run), tmp_path / "rel", private_dir=private,
                       progress=False)
    shadow_cfg = yaml.safe_load((run / "config.yaml").read_text())
    shadow_cfg.update(seed=None, run_dir="unused")
    shadow_cfg["pmp"].update(enabled=True, mask_seed=None)  # the attacker has its own seeds
    shadow_cfg["train"].update(max_steps=10)
    (tmp_path / "shadow.yaml").write_text(yaml.safe_dump(shadow_cfg))
    ft = {"release": "unused", "mode": "unauthorized", "seed": 0,
          "task": {"name": "review_lm", "max_length": 32, "max_train_examples": 32,
                   "max_eval_examples": 8},
          "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 2,
                    "eval_batch_size": 8},
          "optim": {"lr": 1e-2, "warmup_steps": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(ft))
    out = tmp_path / "report"
    assert attack_cli.main([str(tmp_path / "rel"), "--out", str(out), "--private", str(private),
                            "--attacks", "magnitude,shadow", "--shadow-config",
                            str(tmp_path / "shadow.yaml"), "--payoff", str(tmp_path / "ft.yaml")]) == 0
    doc = json.loads((out / "attack.json").read_text())
    shadow = doc["attacks"]["shadow"]
    assert shadow["train_elements"] > 1000 and 0 <= shadow["auc"] <= 1
    assert (tmp_path / "report-shadow" / "run" / "private" / "mask" / "mask.json").is_file()
    runs = {r["label"]: r for r in doc["payoff"]["runs"]}
    assert len(runs) == 5 and all(np.isfinite(r["gain"]) for r in runs.values())
    # the best attack's (oriented) mask at each attacker ratio: its top 10 %, 30 % and ρ
    assert [r["attacker_ratio"] for r in doc["payoff"]["runs"]] == [None, None, 0.1, 0.3,
                                                                    doc["ratio"]]
    best = doc["payoff"]["best_attack"]
    for r in (0.1, 0.3):
        _, meta = read_artifact(out / "masks" / f"{best}_top{round(100 * r)}")
        assert meta["total_selected"] / meta["total_numel"] == pytest.approx(r, abs=0.01)
        assert meta["inverted"] == doc["attacks"][best]["inverted"]


# --- scoring: folding, orientation, within-tensor quantiles, top-10 %, attacker ratios ----------
def _shrunk(synthetic):
    """Weights whose trained elements shrank (×0.1) while the complement stayed at θ(0):
    |w| then ranks the mask backwards (AUC well below 0.5) — an inverted winner."""
    w, m = synthetic["weights"], synthetic["masks"]
    return {n: torch.where(m[n], synthetic["theta0"][n].reshape(-1) * 0.1,
                           synthetic["theta0"][n].reshape(-1)).reshape(w[n].shape) for n in w}


@pytest.mark.timeout(120)
def test_inverted_attack_is_folded_everywhere_and_its_mask_oriented(synthetic, tmp_path):
    from pmp_scale.secrecy.evaluate import folded
    from pmp_scale.secrecy.payoff import best_attack
    release, mask = make_release(synthetic, "shrunk", weights=_shrunk(synthetic))
    result = run_attacks(release, tmp_path / "out", private_dir=mask,
                         attacks=["magnitude", "magnitude_tensor"])
    r = result["attacks"]["magnitude"]
    assert r["auc"] < 0.3 and r["inverted"] and r["auc_sym"] == folded(r["auc"]) > 0.7
    assert best_attack(result) in ("magnitude", "magnitude_tensor")
    assert best_attack({"attacks": {"a": {"auc": 0.3}, "b": {"auc": 0.65}}}) == "a"
    assert any("(magnitude)" in line for line in result["leaks"]), (r["groups"], result["leaks"])
    # the predicted mask is oriented: mostly the true mask, not the anti-mask
    predicted, meta = read_artifact(tmp_path / "out" / "masks" / "magnitude")
    assert meta["inverted"] is True
    from pmp_scale.mask import unpack_bits
    hit = total = 0
    for name, m in synthetic["masks"].items():
        p = unpack_bits(predicted[name], m.numel())
        hit, total = hit + int((p & m).sum()), total + int(p.sum())
    assert hit / total > 0.8  # the anti-mask would be at most 1 - 0.6 = 0.4 here
    assert r["precision_at_top10"] > 0.8 > r["mask_share"]


@pytest.mark.timeout(30)
def test_claims_fold_an_inverted_attack(monkeypatch):
    """An attack at AUC 0.3 is a 0.7 attack: it must fail "≤ 0.55", not pass it."""
    from types import SimpleNamespace
    from pmp_scale.study import claims as C
    monkeypatch.setattr(C, "release_results", lambda doc: {})  # no fine-tuning grid needed here
    pmp = {"mask_ratio": 0.7, "mask_source": "earlybird", "complement": "frozen",
           "score": "step"}
    rows = C.variant_rows({("p", "t"): {"base": {}}},
                          {"run": {"preset": "p", "pmp": pmp, "short": "v"}},
                          {"run": {"attacks": {"magnitude": {"auc": 0.3}}}}, None)
    assert rows[0]["max_auc"] == pytest.approx(0.7)
    cfg = SimpleNamespace(claims=SimpleNamespace(base_tolerance=0.05, secrecy_auc=0.55))
    verdicts = {c["claim"]: c["verdict"] for c in C.claims(rows, cfg)}
    assert verdicts["mask secrecy"] == "contradicted"


@pytest.mark.timeout(30)
def test_quantile_auc_compares_tensors_of_different_scales_fairly():
    """Two tensors, each ranked perfectly from within, at scales 100 apart: pooled, one
    tensor's frozen elements outrank the other's trained ones (AUC 0.75); on within-tensor
    quantiles the score ranks perfectly, as it does."""
    from pmp_scale.secrecy import Attack
    from pmp_scale.secrecy.evaluate import Sample
    g = torch.Generator().manual_seed(0)
    m_a = torch.rand(4000, generator=g) < 0.5
    m_b = torch.rand(4000, generator=g) < 0.5
    s_a = m_a.float() + 0.5 * torch.rand(4000, generator=g)          # in [0, 1.5)
    s_b = 100 + m_b.float() + 0.5 * torch.rand(4000, generator=g)    # in [100, 101.5)
    attack = Attack("planted", "release", "planted", lambda: iter([("a", s_a), ("b", s_b)]))
    result = Sample(attack, {"a": (4000,), "b": (4000,)},
                    {"a": pack_bits(m_a), "b": pack_bits(m_b)}).evaluate()
    assert result["auc"] < 0.8 and result["auc_quantile"] > 0.99
