"""The stronger attacks on planted signals: sign-aware gradients and gradient SNR on a release
whose masked elements were really trained (AdamW with weight decay, complement frozen), row
aggregates of the shadow features, constant-init tensors as known trained."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pmp_scale.mask import pack_bits, write_artifact
from pmp_scale.secrecy import Target, run_attacks
from pmp_scale.secrecy.attacks import constant_init_names, public_batches


@pytest.fixture(scope="module")
def trained_release(save_tiny_llama, tiny_data, tmp_path_factory):
    """llama-tiny whose 2-D weights were trained on half their elements (random mask) to near
    a stationary point of loss + weight decay on a few batches; the rest frozen at θ(0)."""
    root = tmp_path_factory.mktemp("trained")
    model = save_tiny_llama(root / "release")
    target = Target(root / "release")
    batches = public_batches(tiny_data["data"], target, seq_len=64, batch_size=4, n_batches=4)
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(p.shape, generator=g) < 0.5 if p.dim() == 2 else
                 torch.ones(p.shape, dtype=torch.bool)) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    torch.set_num_threads(1)
    for step in range(40):
        ids = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.where(masks[n], p, before[n]))  # the complement stays at θ(0)
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if n in target.shapes}
    save_file(weights, str(root / "release" / "model.safetensors"), metadata={"format": "pt"})
    write_artifact(root / "mask", [(n, pack_bits(masks[n].reshape(-1)), tuple(w.shape))
                                   for n, w in weights.items()], {"mask_ratio": 0.5})
    return {"release": root / "release", "mask": root / "mask", "data": tiny_data["data"]}


@pytest.mark.timeout(300)
def test_sign_aware_and_snr_gradients_find_trained_elements(trained_release, tmp_path):
    """Against the true mask the planted signal shows; against an independent random mask of
    the same release (the control: no signal by construction) it does not."""
    from pmp_scale.mask import read_artifact
    kw = dict(public=trained_release["data"], ks=(1, 4), attacks=["grad_sign", "grad_snr"])
    r = run_attacks(trained_release["release"], private_dir=trained_release["mask"],
                    **kw)["attacks"]
    packed, _ = read_artifact(trained_release["mask"])
    g = torch.Generator().manual_seed(7)
    write_artifact(tmp_path / "control", [
        (n, pack_bits(torch.rand(s, generator=g).reshape(-1) < 0.5), s)
        for n, s in Target(trained_release["release"]).shapes.items()], {})
    control = run_attacks(trained_release["release"], private_dir=tmp_path / "control",
                          **kw)["attacks"]
    assert "grad_sign@K1" not in r and "grad_snr@K1" not in r  # one batch: no mean vs spread
    for name in ("grad_sign@K4", "grad_snr@K4"):
        assert abs(control[name]["auc"] - 0.5) < 0.02, (name, control[name]["auc"])
    # trained weights sit where the mean gradient pulls against the decay: −ḡ·w > 0
    assert r["grad_sign@K4"]["auc"] > 0.54, r["grad_sign@K4"]["auc"]
    # grad_snr finds no signal on this release (≈ 0.50 at K = 4: measured, not a pass mark);
    # its scores are checked against a hand computation instead
    from pmp_scale.secrecy.attacks import gradients
    target = Target(trained_release["release"])
    batches = public_batches(trained_release["data"], target, seq_len=64, batch_size=8,
                             n_batches=4)
    attacks = {a.name: a for a in gradients(target, batches, ks=(4,))}
    model = target.load_model()
    name = "model.layers.0.mlp.up_proj.weight"
    p = dict(model.named_parameters())[name]
    grads = []
    for ids in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(p.grad.clone())
    mean, rms = torch.stack(grads).mean(0), torch.stack(grads).square().mean(0).sqrt()
    got = {a: dict(attacks[a].scores())[name] for a in ("grad_sign@K4", "grad_snr@K4")}
    assert torch.allclose(got["grad_sign@K4"], (-mean * p.detach()).reshape(-1), rtol=1e-4,
                          atol=1e-12)
    assert torch.allclose(got["grad_snr@K4"], (-mean.abs() / rms).reshape(-1), rtol=1e-4)


@pytest.mark.timeout(120)
def test_constant_init_tensors_are_known_trained(trained_release):
    target = Target(trained_release["release"])
    names = constant_init_names(target)
    assert names and all("norm" in n for n in names)
    r = run_attacks(trained_release["release"], private_dir=trained_release["mask"],
                    attacks=["magnitude"])["attacks"]["magnitude"]
    assert r["known_trained_tensors"] == len(names)


@pytest.mark.timeout(60)
def test_row_spread_feature_sees_trained_rows():
    """A row whose elements were trained has drifted from the init's spread; a frozen row not."""
    from pmp_scale.secrecy.shadow import _spread_vs_init
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 256, generator=g) * 0.02
    w[:4] *= 3.0  # the first four rows were trained
    rows = torch.arange(w.numel()) // 256
    cols = torch.arange(w.numel()) % 256
    row_ratio, col_ratio = _spread_vs_init(w, 0.02, rows, cols)
    per_row = row_ratio.reshape(8, 256)[:, 0]
    assert bool((per_row[:4] > 2).all()) and bool((per_row[4:] - 1).abs().lt(0.2).all())
    assert np.isclose(float(col_ratio.mean()), float(w.std(0).mean() / 0.02), rtol=1e-5)


@pytest.mark.timeout(120)
def test_shadow_stage2_length_flag(tmp_path, capsys):
    """The shadow's Stage II length is the target's when given; nonsense is one clear line."""
    from tools import attack_mask as attack_cli
    cfg = tmp_path / "shadow.yaml"
    cfg.write_text("run_dir: unused\n")
    assert attack_cli.main([str(tmp_path), "--out", str(tmp_path / "out"), "--shadow-config",
                            str(cfg), "--shadow-stage2-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shadow-stage2-steps 0" in err[0], err
