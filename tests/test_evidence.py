"""The study's evidence machinery (issue 19): the nested release-level test against a hand
computation, the Hessian probe against a quadratic with known eigenvalues, the positive
control's reparameterisation against its source's logits."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO))


@pytest.mark.timeout(60)
def test_nested_welch_and_paired_tests_match_a_hand_computation():
    from pmp_scale.study.stats import compare, holm, release_means, verdict
    # two releases per side, three fine-tuning seeds each: seeds are averaged first
    a = release_means({"a0": [1.0, 2.0, 3.0], "a1": [3.0, 4.0, 5.0], "a2": [5.0, 5.5, 6.5]})
    b = release_means({"b0": [0.0, 0.5, 1.0], "b1": [1.0, 1.0, 1.0], "b2": [0.5, 0.2, 0.2]})
    assert a == {"a0": 2.0, "a1": 4.0, "a2": 17 / 3}
    # Welch by hand on the release means (n = 3 each, not 9)
    ma, mb = [2.0, 4.0, 17 / 3], [0.5, 1.0, 0.3]
    va = sum((x - sum(ma) / 3) ** 2 for x in ma) / 2
    vb = sum((x - sum(mb) / 3) ** 2 for x in mb) / 2
    se = math.sqrt(va / 3 + vb / 3)
    t = (sum(ma) / 3 - sum(mb) / 3) / se
    df = (va / 3 + vb / 3) ** 2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    w = compare(a, b)
    assert w["test"] == "Welch t" and w["t"] == pytest.approx(t) and w["df"] == pytest.approx(df)
    from scipy.stats import t as tdist
    assert w["p"] == pytest.approx(2 * tdist.sf(abs(t), df))
    half = tdist.ppf(0.975, df) * se
    assert w["ci"] == pytest.approx([w["effect"] - half, w["effect"] + half])
    # paired by pre-training seed: df = n - 1 on the per-seed differences
    p = compare(a, b, {"a0": "b0", "a1": "b1", "a2": "b2"})
    d = [2.0 - 0.5, 4.0 - 1.0, 17 / 3 - 0.3]
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert p["test"] == "paired t" and p["df"] == 2
    assert p["t"] == pytest.approx((sum(d) / 3) / (sd / math.sqrt(3)))
    # one release per side cannot be tested, whatever the seeds say
    one = compare({"a0": 2.0}, {"b0": 0.5})
    assert one["test"] is None and verdict(one).startswith("inconclusive")
    # Holm: sorted p x (m - rank), monotone; the verdict reads the adjusted p
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                                nan_ok=True)
    assert verdict({**w, "p_adj": 0.049}) == "supported"
    assert verdict({**w, "p_adj": 0.051}) == "inconclusive"
    assert verdict({**w, "effect": -1.0, "p_adj": 0.01}) == "contradicted"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads and lose a lot on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(60)
def test_hessian_probe_finds_the_known_eigenvalues_of_a_quadratic():
    """L(x) = ½ xᵀAx: H = A, so H restricted to S is A[S, S] with known eigenvalues."""
    from pmp_scale.study.curvature import restricted_top_eigenvalue
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)) @ q.T
    x = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def loss():
        v = x.reshape(-1)
        return 0.5 * v @ A @ v
    S = torch.tensor([[True, False, True], [False, True, False]])
    full = restricted_top_eigenvalue(loss, [x], [None], iters=500, tol=1e-12)
    sub = restricted_top_eigenvalue(loss, [x], [S], iters=500, tol=1e-12)
    comp = restricted_top_eigenvalue(loss, [x], [~S], iters=500, tol=1e-12)
    idx, cidx = S.reshape(-1).nonzero().squeeze(1), (~S).reshape(-1).nonzero().squeeze(1)
    assert full["eig"] == pytest.approx(9.0, rel=1e-6)
    assert sub["eig"] == pytest.approx(torch.linalg.eigvalsh(A[idx][:, idx]).max().item(), rel=1e-6)
    assert comp["eig"] == pytest.approx(torch.linalg.eigvalsh(A[cidx][:, cidx]).max().item(),
                                        rel=1e-6)
    g = (A @ x.detach().reshape(-1))  # gradient RMS per element on each set
    assert sub["grad_rms"] == pytest.approx(g[idx].square().mean().sqrt().item())
    assert sub["elements"] == 3 and full["converged"]


def _tiny_release(tmp_path, model_type):
    """A random-init release of a tiny preset, written as the release path writes it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from pmp_scale.models import PRESETS
    kw = {k: v for k, v in PRESETS[f"{model_type}-tiny"].items() if k != "vocab_size"}
    config = AutoConfig.for_model(**kw, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / model_type
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.mark.timeout(60)
def test_reparameterised_control_computes_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    from pmp_scale.study.controls import ReparamError, reparameterise
    src, model = _tiny_release(tmp_path, "llama")
    out = reparameterise(src, tmp_path / "reparam", alpha=10.0)
    re = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.eval()(ids).logits, re.eval()(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    sd, rd = model.state_dict(), re.state_dict()
    v = "model.layers.0.self_attn.v_proj.weight"
    assert torch.allclose(rd[v], 10 * sd[v])  # the weights did change: not a copy
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(rd[down], sd[down] / 10)
    assert not (tmp_path / ".reparam.tmp").exists()
    g2, _ = _tiny_release(tmp_path, "gpt2")
    with pytest.raises(ReparamError) as err:
        reparameterise(g2, tmp_path / "g2r")
    assert "Llama releases only" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "g2r").exists()


@pytest.mark.timeout(30)
def test_project_radius_is_relative_to_the_first_norm_by_default():
    """Relative by default (the authors' 1.1B shrink at any size), absolute on request."""
    from pmp_scale.config import PMPConfig
    from pmp_scale.mask.project import radius_from
    cfg = PMPConfig(enabled=True, complement="project")
    assert cfg.project_radius_mode == "relative"
    assert cfg.project_radius == pytest.approx(2.0 / (0.02 * math.sqrt(0.3 * 1.1e9)), rel=0.01)
    assert radius_from(cfg, 400.0) == pytest.approx(400.0 * cfg.project_radius)
    absolute = PMPConfig(enabled=True, complement="project", project_radius=2.0,
                         project_radius_mode="absolute")
    assert radius_from(absolute, 400.0) == 2.0


@pytest.mark.timeout(60)
def test_replicated_plan_names_seeds_overrides_and_controls(tmp_path):
    """pretrain_seeds give one run per seed (own init seed and data order), a block's own
    `pmp` keys reach its runs only, and the grid holds every release, the reparameterised
    dense releases and the head-only mode."""
    import yaml
    from pmp_scale.study.config import StudyError, load_study
    from pmp_scale.study.plan import make_plan
    from pmp_scale.study.run import report_config
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({"model": {"preset": "llama-tiny"},
                                                        "train": {"max_steps": 4}}))
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"task": {"name": "review_lm"}}))
    study = {"out_dir": str(tmp_path / "out"), "data": {"path": "d", "tokenizer": "t.model"},
             "pretrain": {"config": "pre.yaml"}, "pretrain_seeds": [1, 2],
             "variants": [{"mask_ratio": [0.7]},
                          {"mask_ratio": [0.7], "mask_source": ["random"], "pretrain_seeds": [1],
                           "pmp": {"exclude": ["model.embed_tokens.weight"]},
                           "label": "embtrain"}],
             "controls": {"reparam_alpha": 10},
             "finetune": {"config": "ft.yaml", "lrs": [1e-3], "steps": [2], "seeds": [0, 1],
                          "min_seeds": 2, "head_only": True, "scratch": False}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    cfg, base = load_study(tmp_path / "s.yaml")
    plan = make_plan(cfg, base)
    names = [r.name for r in plan.runs]
    assert names == ["llama-tiny__dense__s1", "llama-tiny__dense__s2",
                     "llama-tiny__r0.7_earlybird_frozen__s1", "llama-tiny__r0.7_earlybird_frozen__s2",
                     "llama-tiny__r0.7_random_frozen_embtrain__s1"]
    runs = {r.name: r for r in plan.runs}
    assert {"seed=2", "data.shuffle_seed=2"} <= set(runs["llama-tiny__dense__s2"].sets)
    assert runs["llama-tiny__r0.7_earlybird_frozen__s2"].group == "llama-tiny__r0.7_earlybird_frozen"
    emb = runs["llama-tiny__r0.7_random_frozen_embtrain__s1"].sets
    assert 'pmp.exclude=["model.embed_tokens.weight"]' in emb
    assert not any(s.startswith("pmp.exclude") for s in runs["llama-tiny__dense__s1"].sets +
                   runs["llama-tiny__r0.7_earlybird_frozen__s1"].sets)
    rc = report_config(cfg, base, plan, "llama-tiny", "review_lm")
    releases = {r["name"]: r["modes"] for r in rc["releases"]}
    assert releases["dense__s1"] == ["unauthorized", "head-only"]
    assert releases["reparam__s2"] == ["unauthorized"]
    assert releases["r0.7_earlybird_frozen__s1"] == ["unauthorized", "authorized", "head-only"]
    study["variants"][1].pop("label")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(StudyError, match="needs a `label`"):
        load_study(tmp_path / "s.yaml")


@pytest.mark.timeout(300)  # ~10 s on idle cores; the shared machine is far slower at times
def test_head_only_mode_trains_lm_head_alone(save_tiny_llama, single_process_group, tmp_path):
    """The body-gain baseline: only lm_head moves (the rest of the release bit for bit)."""
    from pmp_scale.finetune import finetune, parse_finetune_config
    model = save_tiny_llama(tmp_path / "release")
    cfg = parse_finetune_config({
        "release": str(tmp_path / "release"), "mode": "head-only", "seed": 0,
        "task": {"name": "review_lm", "max_length": 32, "max_train_examples": 32,
                 "max_eval_examples": 8},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 2,
                  "eval_batch_size": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0}})
    result = finetune(cfg)
    head = model.lm_head.weight.numel()
    assert result["params"]["trainable"] == head
    assert 0 < result["backbone"]["changed"] <= head  # nothing outside lm_head moved
    assert result["curve"][-1]["loss"] < result["curve"][0]["loss"]


@pytest.mark.timeout(30)
def test_instability_metrics_and_the_grid_edge_flag():
    from pmp_scale.nft.summary import loss_spike, summarise
    assert loss_spike([[1, 5.0], [2, 4.0], [3, 4.5], [4, 3.0], [5, 3.9]], 5) == pytest.approx(0.9)
    assert loss_spike([[1, 5.0], [2, 4.0], [3, 4.5]], 2) == 0.0  # up to the duration only
    assert loss_spike([[1, 5.0], [2, float("nan")]], 2) == math.inf

    def cell(lr, seed, val, test):
        at = {"validation": {"loss": val}, "test": {"loss": test}}
        return {"release_name": "d", "mode": "unauthorized", "lr": lr, "seed": seed,
                "durations": [3], "diverged": False, "metric": "loss", "higher_is_better": False,
                "train_loss": [[1, 4.0], [2, 4.5], [3, 3.0]],
                "at": {"0": {"validation": {"loss": 4.2}, "test": {"loss": 4.2}}, "3": at}}
    cells = [cell(lr, s, v, v) for lr, v in ((1e-3, 4.0), (1e-2, 3.5), (1e-1, 4.4)) for s in (0, 1)]
    best = summarise(None, cells)["best"][0]
    assert best["lr"] == 1e-2 and best["lr_edge"] is None and best["max_spike"] == 0.5
    worse = [t["ended_worse"] for t in summarise(None, cells)["table"]]
    assert worse == [0, 0, 2]  # 4.4 > 4.2 at step 0
    cells = [c for c in cells if c["lr"] != 1e-2]
    assert summarise(None, cells)["best"][0]["lr_edge"] == "lowest"


@pytest.mark.timeout(300)  # ~5 s on idle cores; the shared machine is far slower at times
def test_curvature_of_a_release_on_mask_complement_and_all(save_tiny_llama, tmp_path,
                                                           one_thread):
    """The probe runs through a real release (second derivatives of attention included) and
    splits the elements by the mask artifact; no restricted |λ| exceeds the whole Hessian's
    (Cauchy interlacing), within the power iteration's tolerance."""
    from pmp_scale.mask import pack_bits
    from pmp_scale.mask.artifact import write_artifact
    from pmp_scale.study.curvature import release_curvature
    model = save_tiny_llama(tmp_path / "release")
    gen = torch.Generator().manual_seed(0)
    items = [(n, pack_bits(torch.rand(p.numel(), generator=gen) < 0.7), tuple(p.shape))
             for n, p in model.named_parameters() if n != "model.norm.weight"]  # one excluded
    write_artifact(tmp_path / "mask", items, {})
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    out = release_curvature(tmp_path / "release", tmp_path / "mask", tokens, iters=40)
    total = sum(p.numel() for p in model.parameters())
    assert out["mask"]["elements"] + out["complement"]["elements"] == out["all"]["elements"] == total
    for part in ("mask", "complement"):
        assert math.isfinite(out[part]["eig"]) and out[part]["grad_rms"] > 0
        assert abs(out[part]["eig"]) <= abs(out["all"]["eig"]) * 1.05
