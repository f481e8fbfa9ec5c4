"""Multi-rank scenarios, run under `deepspeed --num_gpus W`; results land in --out for pytest.

One launch runs many scenarios (each launch costs ~20 s of start-up on CPU), so tests share
launches instead of starting DeepSpeed per test. Every scenario writes plain files; the
assertions live in tests/test_distributed.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import deepspeed  # noqa: E402

from pmp_scale.config import parse_config  # noqa: E402
from pmp_scale.engine import Trainer, init_distributed  # noqa: E402

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def config(args, name: str, **sections) -> object:
    raw = {
        "run_dir": str(Path(args.out) / name),
        "seed": 7,
        "model": {"preset": "llama-tiny"},
        "data": {"path": args.data, "tokenizer": args.tokenizer},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6,
                  "log_every": 1, "eval_every": 1000, "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"every": 1000, "keep": 2},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return parse_config(raw)


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def gathered(model) -> dict[str, torch.Tensor]:
    """Full parameters on CPU (tiny test models only)."""
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().cpu().clone()
    return out


def losses(run_dir) -> dict[int, float]:
    from pmp_scale.telemetry import read_metrics
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def save0(obj, path) -> None:
    if rank() == 0:
        torch.save(obj, path)


# --- issue: streaming ZeRO-3 engine ---------------------------------------------------------
@scenario
def partition(args):
    t = Trainer(config(args, "partition"))
    info = {name: {"local": p.ds_tensor.numel(), "numel": p.ds_numel}
            for name, p in t.model.named_parameters()}
    Path(args.out, f"partition_rank{rank()}.json").write_text(json.dumps(info))


@scenario
def theta0(args):
    t = Trainer(config(args, "theta0"))
    save0(gathered(t.model), Path(args.out) / f"theta0_w{world()}.pt")


@scenario
def resume_first_half(args):
    """Uninterrupted run to 6 steps, and the same run stopped after step 3 (checkpointed)."""
    full = Trainer(config(args, "dense_full"))
    full.train()
    save0(losses(full.run_dir), Path(args.out) / "dense_full_losses.pt")
    save0(gathered(full.model), Path(args.out) / "dense_full_params.pt")
    Trainer(config(args, "dense_resumed")).train(stop_at=3)


@scenario
def resume_second_half(args):
    """A fresh process picks the stopped run up from its checkpoint."""
    t = Trainer(config(args, "dense_resumed"))
    t.resume("auto")
    assert t.state.step == 3
    t.train()
    save0(losses(t.run_dir), Path(args.out) / "dense_resumed_losses.pt")
    save0(gathered(t.model), Path(args.out) / "dense_resumed_params.pt")


# --- issue: PMP core ----------------------------------------------------------------------------
def _pmp_run(args, name, precision="fp32", steps=50, **pmp):
    cfg = config(args, name, train={"max_steps": steps, "precision": precision},
                 optim={"grad_clip": 0.05, "weight_decay": 0.1},
                 pmp={"enabled": True, **pmp})
    t = Trainer(cfg)
    before = gathered(t.model)
    master0 = [f.detach().clone() for f in t.engine.optimizer.fp32_partitioned_groups_flat]
    t.train()
    after = gathered(t.model)
    mask_dir = Path(cfg.run_dir) / "private" / "mask"
    result = {"before": before, "after": after, "drift": t.pmp.drift(),
              "grad_norms": [m.get("train/grad_norm") for m in _metrics(t.run_dir)],
              "mask_dir": str(mask_dir), "resident_bytes": t.pmp.mask.resident_bytes(),
              "local_numel": sum(t.pmp.layout.sub_group_sizes)}
    # the fp32 master complement too (not only what the low-precision params show)
    real = [t.pmp.layout.real_elements(g) for g in range(len(master0))]
    frozen = [~t.pmp.mask.sub_group(g) & real[g] for g in range(len(master0))]
    result["master_frozen_equal"] = all(
        torch.equal(m0[f], m1.detach()[f])
        for m0, m1, f in zip(master0, t.engine.optimizer.fp32_partitioned_groups_flat, frozen))
    flags = torch.tensor([int(result["master_frozen_equal"])])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    result["master_frozen_equal"] = bool(flags.item())
    save0(result, Path(args.out) / f"{name}.pt")
    return t


def _metrics(run_dir):
    from pmp_scale.telemetry import read_metrics
    return read_metrics(run_dir) if rank() == 0 else []


@scenario
def pmp_frozen(args):
    _pmp_run(args, "pmp_frozen_fp32", mask_source="random", mask_ratio=0.5)
    _pmp_run(args, "pmp_frozen_bf16", precision="bf16", mask_source="random", mask_ratio=0.5)
    _pmp_run(args, "pmp_decay", mask_source="random", mask_ratio=0.5, complement="decay")


@scenario
def pmp_earlybird(args):
    _pmp_run(args, "pmp_earlybird", steps=8, mask_ratio=0.7, check_every=2, patience=2,
             warmup_max_steps=8, save_init=True)


@scenario
def pmp_random_mask(args):
    """Same mask seed => same random mask at any world size (compared across launches)."""
    cfg = config(args, f"pmp_random_w{world()}", train={"max_steps": 2, "global_batch_size": 8},
                 pmp={"enabled": True, "mask_source": "random", "mask_seed": 11,
                      "mask_ratio": 0.7})
    Trainer(cfg).train()


# --- issue: release tools -------------------------------------------------------------------------
@scenario
def release_source(args):
    """A tied-embedding GPT-2 PMP run: its final params and logits, for the release round trip."""
    cfg = config(args, "release_source", model={"preset": "gpt2-tiny"}, train={"max_steps": 4},
                 pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5,
                      "save_init": True})
    t = Trainer(cfg)
    t.train()
    ids = torch.arange(2 * 16).reshape(2, 16) % t.hf_config.vocab_size
    t.engine.eval()
    with torch.no_grad():
        logits = t.engine(input_ids=ids.to(t.engine.device)).logits.float().cpu()
    save0({"params": gathered(t.model), "input_ids": ids, "logits": logits},
          Path(args.out) / "release_source_final.pt")


@scenario
def big_presets(args):
    """llama-1.1b and llama-7b under zero.Init: each rank only ever holds its partitions."""
    import psutil
    from pmp_scale.models import build_hf_config, build_model
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3}}
    result = {}
    for preset in ("llama-1.1b", "llama-7b"):
        model = build_model(build_hf_config(preset), seed=1, ds_config=ds, dtype=torch.bfloat16)
        result[preset] = {
            "params": {n: [p.ds_numel, p.ds_tensor.numel()] for n, p in model.named_parameters()},
            "rss_bytes": psutil.Process().memory_info().rss}
        del model
    Path(args.out, f"big_presets_rank{rank()}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    for name in args.scenarios.split(","):
        SCENARIOS[name](args)
        Path(args.out, f"done_{name}_rank{dist.get_rank()}").touch()


if __name__ == "__main__":
    main()
