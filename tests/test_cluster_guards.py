"""Guards of the masked update: H2 cannot switch off quietly; uncovered DeepSpeed paths are
refused at config time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pmp_scale.config import ConfigError, parse_config


def test_broken_restore_hook_stops_the_step(dist_results):
    r = torch.load(dist_results / "pmp_h2_guard.pt")
    assert r["sub_groups"] >= 2  # small sub_group_size: the guard must count, not assume one
    assert r["error"] is not None, "a sub-group stepped without its restore went unnoticed"
    assert r["error"].startswith(f"masked update at step 2: the complement was restored for "
                                 f"{r['sub_groups'] - 1} of {r['sub_groups']} ZeRO-3 sub-groups "
                                 "(not restored: [0]")


def _raw(**deepspeed):
    return {"run_dir": "runs/x", "model": {"preset": "llama-tiny"},
            "data": {"path": "data/x", "tokenizer": "tok.model"},
            "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 10},
            "optim": {"lr": 1e-3}, "pmp": {"enabled": True},
            "deepspeed": {"zero_optimization": deepspeed}}


@pytest.mark.parametrize("zero, message", [
    ({"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
     "deepspeed.zero_optimization.offload_optimizer.device nvme is not supported with PMP: it "
     "swaps the fp32 master"),
    ({"offload_param": {"device": "nvme"}},
     "deepspeed.zero_optimization.offload_param.device nvme is not supported with PMP"),
    ({"zenflow": {"topk_ratio": 0.1}}, "deepspeed.zero_optimization.zenflow is not supported"),
    ({"stage": 2}, "deepspeed.zero_optimization.stage 2: PMP's masked update works on ZeRO-3"),
])
def test_uncovered_deepspeed_paths_are_refused_with_pmp(zero, message):
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(**zero))
    assert message in str(err.value), str(err.value)
    raw = _raw(**zero)
    raw["pmp"]["enabled"] = False
    parse_config(raw)  # dense runs may use them
    parse_config(_raw(offload_optimizer={"device": "cpu"}))  # ZeRO-Offload is covered


def test_authorized_finetuning_refuses_them_too():
    """The fine-tuning config has the same check (authorized mode uses the same hooks)."""
    from pmp_scale.finetune.config import parse_finetune_config
    raw = {"release": "rel", "mask": "mask", "train": {"max_steps": 2}, "optim": {"lr": 1e-4},
           "deepspeed": {"zero_optimization": {"zenflow": {"topk_ratio": 0.1}}}}
    with pytest.raises(ConfigError, match="zenflow is not supported with PMP"):
        parse_finetune_config({**raw, "mode": "authorized"})
    parse_finetune_config({**raw, "mode": "unauthorized"})


@pytest.mark.parametrize("name", ["pmp_frozen_fp32", "pmp_earlybird", "pmp_scoped"])
def test_stage2_mask_state_is_one_bit_per_local_parameter(dist_results, name):
    """Everything mask-related a rank keeps in Stage II (no second `selectable` vector, no
    leftover discovery candidate): 1 bit per local element + the last byte of each sub-group."""
    r = torch.load(dist_results / f"{name}.pt")
    assert 8 * r["mask_state_bytes"] <= r["local_numel"] + 8 * r["sub_groups"], r


def test_stage2_mask_state_after_resume(dist_results):
    """Resumed in Stage II: the discovery's final candidate and the mask are one copy."""
    import json
    for rank in (0, 1):
        m = json.loads((dist_results / f"pmp_in_stage2_memory_rank{rank}.json").read_text())
        assert 8 * m["mask_state_bytes"] <= m["local"] + 8 * m["sub_groups"], m


def test_mask_chunks_unpack_like_the_whole_sub_group():
    from pmp_scale.mask.bits import pack_bits
    from pmp_scale.mask.sharded import ShardedMask
    full = torch.rand(10_007) < 0.3
    mask = ShardedMask(layout=type("L", (), {"sub_group_sizes": [full.numel()]})(),
                       bits=[pack_bits(full)])
    for a, b in [(0, 8), (8, 4104), (4104, 10_007), (0, 10_007), (9_992, 10_007)]:
        assert torch.equal(mask.sub_group_slice(0, a, b), full[a:b]), (a, b)
