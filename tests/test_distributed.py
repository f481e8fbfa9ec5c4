"""Real 2-rank (and 1-rank) ZeRO-3 on CPU ranks: partitioning, init, exact resume, PMP."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pmp_scale.mask.artifact import read_artifact
from pmp_scale.mask.bits import unpack_bits


def _load(dist_results, name):
    return torch.load(dist_results / name, weights_only=False)


# --- engine -------------------------------------------------------------------------------------
def test_each_rank_holds_only_its_partition(dist_results):
    ranks = [json.loads((dist_results / f"partition_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, info in ranks[0].items():
        assert info["local"] == math.ceil(info["numel"] / 2), name
        assert ranks[1][name]["local"] == info["local"]
    total = sum(i["numel"] for i in ranks[0].values())
    assert sum(i["local"] for i in ranks[0].values()) <= total / 2 + len(ranks[0])


def test_same_seed_same_theta0_at_world_sizes_1_and_2(dist_results):
    w1, w2 = _load(dist_results, "theta0_w1.pt"), _load(dist_results, "theta0_w2.pt")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
    # HF's init, not PyTorch's default (zero.Init would otherwise leave std 1.0 embeddings)
    emb = w1["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002
    assert torch.all(w1["model.norm.weight"] == 1)


def test_resume_after_stop_is_bit_exact(dist_results):
    full = _load(dist_results, "dense_full_losses.pt")
    resumed = _load(dist_results, "dense_resumed_losses.pt")
    assert sorted(full) == list(range(1, 7))
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert full[step] == resumed[step], f"step {step}: {full[step]} != {resumed[step]}"
    a, b = _load(dist_results, "dense_full_params.pt"), _load(dist_results, "dense_resumed_params.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- PMP ------------------------------------------------------------------------------------------
def _full_masks(mask_dir) -> dict[str, torch.Tensor]:
    packed, meta = read_artifact(mask_dir)
    return {name: unpack_bits(packed[name], meta["numel"][name]).reshape(meta["shapes"][name])
            for name in packed}


@pytest.mark.parametrize("name", ["pmp_frozen_fp32", "pmp_frozen_bf16", "pmp_scoped",
                                  "pmp_offload"])
def test_complement_stays_bit_exact_at_theta0(dist_results, name):
    r = _load(dist_results, f"{name}.pt")
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert all(p.dtype == dtype for p in r["after"].values()), "ran in the wrong precision"
    masks = _full_masks(r["mask_dir"])
    moved = total_masked = 0
    for pname, before in r["before"].items():
        after, m = r["after"][pname], masks[pname]
        assert torch.equal(before[~m], after[~m]), f"{pname}: frozen element changed"
        moved += (before[m] != after[m]).sum().item()
        total_masked += m.sum().item()
    assert moved >= 0.99 * total_masked, f"only {moved}/{total_masked} masked elements moved"
    assert r["master_frozen_equal"], "fp32 master complement changed"
    assert r["drift"] == 0.0
    # clipping was active (grad_clip 0.05 is far below the raw norm), so the test covers it
    assert max(g for g in r["grad_norms"] if g is not None) > 0.05


def test_offload_clips_the_masked_gradient(dist_results):
    """With the optimizer offloaded, the global norm is DeepSpeed's per-parameter cache: it
    must be the masked gradient's norm, as without offload (same mask seed, data and θ(0))."""
    first = [next(g for g in _load(dist_results, f"{n}.pt")["grad_norms"] if g is not None)
             for n in ("pmp_offload", "pmp_frozen_fp32")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)


def test_scope_options_per_tensor_and_exclusions(dist_results):
    r = _load(dist_results, "pmp_scoped.pt")
    _, meta = read_artifact(r["mask_dir"])
    for name, m in _full_masks(r["mask_dir"]).items():
        if "embed" in name or "norm" in name:
            assert m.all(), name
        else:
            assert m.sum().item() == math.floor(0.5 * m.numel() + 0.5), name
    trace = meta["discovery"]["trace"]
    assert meta["discovery"]["stop_reason"] == "step_limit" and [t["step"] for t in trace] == [2, 4, 6]
    assert trace[-1]["iou_final"] == 1.0 and all(0 < t["iou_final"] < 1 for t in trace[:-1])


def test_pmp_run_without_a_seed_draws_a_secret_one(dist_results):
    r = _load(dist_results, "pmp_secret_seed.pt")
    a, b = r["seeds"]
    assert a != b and not r["same_theta0"]
    for i, seed in enumerate(r["seeds"]):
        run = dist_results / f"pmp_secret_{i}"
        assert read_artifact(run / "private" / "mask")[1]["init_seed"] == seed
        public = [run / "config.yaml", run / "metrics.jsonl"]
        assert all(str(seed) not in p.read_text() for p in public if p.is_file())
        assert "seed: null" in (run / "config.yaml").read_text()


def test_decay_complement_moves(dist_results):
    r = _load(dist_results, "pmp_decay.pt")
    masks = _full_masks(r["mask_dir"])
    changed = sum((r["before"][n][~m] != r["after"][n][~m]).sum().item()
                  for n, m in masks.items())
    assert changed > 0.5 * sum((~m).sum().item() for m in masks.values())
    assert r["drift"] > 0


def _expected_selected(meta: dict, ratio: float = 0.7) -> int:
    """k = round(ρ·N) over the selectable elements, plus every element of the always-trained
    (constant-initialised, by default) parameters, which are outside the ratio."""
    excluded = sum(meta["numel"][n] for n in meta["excluded_params"])
    assert excluded > 0  # llama-tiny's norm weights
    return math.floor(ratio * (meta["total_numel"] - excluded) + 0.5) + excluded


def test_random_mask_exact_count_and_world_size_invariant(dist_results):
    a_packed, a_meta = read_artifact(dist_results / "pmp_random_w1" / "private" / "mask")
    b_packed, b_meta = read_artifact(dist_results / "pmp_random_w2" / "private" / "mask")
    assert a_meta["total_selected"] == _expected_selected(a_meta)
    for name in a_packed:
        assert torch.equal(a_packed[name], b_packed[name]), name


def test_private_artifact_matches_packbits_and_records_discovery(dist_results):
    r = _load(dist_results, "pmp_earlybird.pt")
    packed, meta = read_artifact(r["mask_dir"])
    masks = _full_masks(r["mask_dir"])
    for name, m in masks.items():
        assert packed[name].numpy().tobytes() == np.packbits(m.flatten().numpy()).tobytes()
    assert meta["total_selected"] == _expected_selected(meta)
    disc = meta["discovery"]
    assert disc["stop_reason"] in ("converged", "step_limit")
    assert disc["trace"] and all("iou_final" in t for t in disc["trace"])
    assert meta["init_seed"] == 7
    # θ(0) saved with the mask equals the gathered initial weights; complement still equals it
    from safetensors.torch import load_file
    init = load_file(f"{r['mask_dir']}/init.safetensors")
    for name, m in masks.items():
        assert torch.equal(init[name], r["before"][name].float()), name
        assert torch.equal(init[name][~m], r["after"][name][~m]), name


@pytest.mark.parametrize("name", ["pmp_in_stage1", "pmp_in_stage2"])
def test_pmp_resume_is_bit_exact_in_both_stages(dist_results, name):
    """Stopped mid-discovery or mid-masked-training, resumed in a fresh process."""
    full = _load(dist_results, "pmp_full_losses.pt")
    resumed = _load(dist_results, f"{name}_losses.pt")
    assert sorted(full) == list(range(1, 13)) == sorted(resumed)
    assert all(full[s] == resumed[s] for s in full), (full, resumed)
    a, b = _load(dist_results, "pmp_full_params.pt"), _load(dist_results, f"{name}_params.pt")
    assert all(torch.equal(a[n], b[n]) for n in a)
    full_mask = read_artifact(dist_results / "pmp_full" / "private" / "mask")[0]
    mask = read_artifact(dist_results / name / "private" / "mask")[0]
    assert all(torch.equal(full_mask[n], mask[n]) for n in full_mask)


def test_mismatched_checkpoint_is_refused_with_a_clear_error(dist_results):
    world = _load(dist_results, "pmp_refused_world.pt")
    model = _load(dist_results, "pmp_refused_model.pt")
    assert world.startswith("CheckpointError: elastic resume during Stage I (mask discovery) "
                            "is not supported"), world
    assert model.startswith("CheckpointError") and "preset is 'llama-tiny' there" in model


def test_rewind_restores_every_weight_to_theta0(dist_results):
    r = _load(dist_results, "pmp_rewind.pt")
    assert r["persistent"] > 0  # the case that needs care: small params stay gathered
    for name, before in r["before"].items():
        assert torch.equal(before, r["after"][name]), name
    assert r["val"] == r["val0"]


def test_rewind_starts_adam_and_the_lr_schedule_fresh(dist_results):
    """Stage II after the rewind is a new run: no Adam moments or step counts carried over from
    Stage I's 6 steps, the LR back at the start of warm-up, and the first masked step is
    Adam's step 1 with the schedule's second value."""
    r = _load(dist_results, "pmp_rewind.pt")
    fresh, one = r["fresh"], r["after_one"]
    assert fresh["adam_states"] == 0 and fresh["last_epoch"] == 0
    assert fresh["lr"] == [b * fresh["factor0"] for b in fresh["base_lrs"]]
    assert one["adam_steps"] == [1]
    assert one["lr"] == [b * one["factor1"] for b in fresh["base_lrs"]]
    assert one["lr"] != fresh["lr"]  # the schedule runs (warm-up: 2 steps)
