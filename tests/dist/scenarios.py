"""The multi-rank scenarios: what runs on every rank, and next to it what pytest checks.

Each scenario runs under `deepspeed --num_gpus W` (this file is the rank-side entry point) and
writes plain files into `--out`. Launches cost tens of seconds each on CPU, so the scenarios
named in SESSION share four launches per pytest session (conftest's `dist_results`); their
checks run in tests/test_distributed.py, one test each, against that directory. A scenario whose
assertions live in another test file says which (`checked_in`): that file launches it or reads
the shared launches' output.

A new scenario: a function `name(args)` decorated with `@scenario(FIRST, ...)` (the launches it
joins), writing under `args.out`; then its checks, each decorated with `@name.check`.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers import full_masks, gathered, load_result, tiny_run_config  # noqa: E402
from pmp_scale.cli import fail_cleanly  # noqa: E402
from pmp_scale.faults import FaultPlan, Faults  # noqa: E402
from pmp_scale.config import parse_config  # noqa: E402
from pmp_scale.engine import Trainer  # noqa: E402
from pmp_scale.zero3 import init_distributed  # noqa: E402
from pmp_scale.mask.artifact import read_artifact  # noqa: E402


# --- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    name: str
    world: int


FIRST = Launch("first", 2)
RESUMED = Launch("resumed", 2)  # fresh processes resume the runs FIRST stopped
SINGLE = Launch("single", 1)  # W=1 against FIRST's results and checkpoints
PADDED = Launch("padded", 3)  # uneven ZeRO-3 partitions (padding on the last rank)
SESSION = (FIRST, RESUMED, SINGLE, PADDED)  # launched in this order


@dataclass(frozen=True)
class Check:
    """One pytest test: `fn(out, *case)` on the launches' output directory."""
    scenario: str
    fn: object
    case: object = None

    def __str__(self) -> str:
        case = [] if self.case is None else [str(self.case)]
        return "-".join([self.scenario, self.fn.__name__, *case])

    def __call__(self, out: Path, tmp_path: Path) -> None:
        wants_tmp = "tmp_path" in inspect.signature(self.fn).parameters
        self.fn(out, *([] if self.case is None else [self.case]),
                **({"tmp_path": tmp_path} if wants_tmp else {}))


@dataclass
class Scenario:
    run: object
    launches: tuple = ()
    checked_in: str | None = None  # assertions kept in another test file
    checks: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.__name__

    def check(self, fn=None, *, cases=(None,)):
        """Decorator: `fn` checks this scenario's results (once per case)."""
        def register(fn):
            self.checks.extend(Check(self.name, fn, case) for case in cases)
            return fn
        return register(fn) if fn else register


TABLE: dict[str, Scenario] = {}


def scenario(*launches: Launch, checked_in: str | None = None):
    def register(fn) -> Scenario:
        TABLE[fn.__name__] = Scenario(fn, launches, checked_in)
        return TABLE[fn.__name__]
    return register


def session_launches() -> list[tuple[int, list[str]]]:
    """(world size, scenario names) of each shared launch, in order."""
    return [(launch.world, [s.name for s in TABLE.values() if launch in s.launches])
            for launch in SESSION]


def session_checks() -> list[Check]:
    return [c for s in TABLE.values() for c in s.checks]


# --- rank-side helpers --------------------------------------------------------------------------
def config(args, name: str, **sections) -> object:
    """A tiny run's config. Also lines ranks up before the next Trainer: streaming picks its
    shared-memory names from those still in use, so earlier loaders must be gone on every
    rank alike (garbage collection timing differs between processes)."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    return parse_config(tiny_run_config(Path(args.out) / name, vars(args), **sections))


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def losses(run_dir) -> dict[int, float]:
    from pmp_scale.telemetry import read_metrics
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def save0(obj, path) -> None:
    if rank() == 0:
        torch.save(obj, path)


# --- the streaming ZeRO-3 engine ----------------------------------------------------------------
@scenario(FIRST)
def partition(args):
    t = Trainer(config(args, "partition"))
    info = {name: {"local": p.ds_tensor.numel(), "numel": p.ds_numel}
            for name, p in t.model.named_parameters()}
    Path(args.out, f"partition_rank{rank()}.json").write_text(json.dumps(info))


@partition.check
def each_rank_holds_only_its_partition(out):
    ranks = [json.loads((out / f"partition_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, info in ranks[0].items():
        assert info["local"] == math.ceil(info["numel"] / 2), name
        assert ranks[1][name]["local"] == info["local"]
    total = sum(i["numel"] for i in ranks[0].values())
    assert sum(i["local"] for i in ranks[0].values()) <= total / 2 + len(ranks[0])


@scenario(FIRST, SINGLE)
def theta0(args):
    t = Trainer(config(args, "theta0"))
    save0(gathered(t.model), Path(args.out) / f"theta0_w{world()}.pt")


@theta0.check
def same_seed_same_theta0_at_world_sizes_1_and_2(out):
    w1, w2 = load_result(out, "theta0_w1"), load_result(out, "theta0_w2")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
    # HF's init, not PyTorch's default (zero.Init would otherwise leave std 1.0 embeddings)
    emb = w1["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002
    assert torch.all(w1["model.norm.weight"] == 1)


@scenario(FIRST, checked_in="tests/test_release.py (dense_resumed)")
def resume_first_half(args):
    """Uninterrupted run to 6 steps, and the same run stopped after step 3 (checkpointed)."""
    full = Trainer(config(args, "dense_full"))
    full.train()
    save0(losses(full.run_dir), Path(args.out) / "dense_full_losses.pt")
    save0(gathered(full.model), Path(args.out) / "dense_full_params.pt")
    Trainer(config(args, "dense_resumed")).train(stop_at=3)


@scenario(RESUMED)
def resume_second_half(args):
    """A fresh process picks the stopped run up from its checkpoint."""
    t = Trainer(config(args, "dense_resumed"))
    t.resume("auto")
    assert t.state.step == 3
    t.train()
    save0(losses(t.run_dir), Path(args.out) / "dense_resumed_losses.pt")
    save0(gathered(t.model), Path(args.out) / "dense_resumed_params.pt")


@resume_second_half.check
def resume_after_stop_is_bit_exact(out):
    full = load_result(out, "dense_full_losses")
    resumed = load_result(out, "dense_resumed_losses")
    assert sorted(full) == list(range(1, 7))
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert full[step] == resumed[step], f"step {step}: {full[step]} != {resumed[step]}"
    a, b = load_result(out, "dense_full_params"), load_result(out, "dense_resumed_params")
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- PMP: the masked update ---------------------------------------------------------------------
def _pmp_run(args, name, precision="fp32", steps=50, ds=None, **pmp):
    cfg = config(args, name, train={"max_steps": steps, "precision": precision},
                 optim={"grad_clip": 0.05, "weight_decay": 0.1},
                 pmp={"enabled": True, **pmp}, deepspeed=ds or {})
    t = Trainer(cfg)
    before = gathered(t.model)
    master0 = [f.detach().clone() for f in t.engine.optimizer.fp32_partitioned_groups_flat]
    t.train()
    after = gathered(t.model)
    mask_dir = Path(cfg.run_dir) / "private" / "mask"
    result = {"before": before, "after": after, "drift": t.pmp.drift(),
              "grad_norms": [m.get("train/grad_norm") for m in _metrics(t.run_dir)],
              "mask_dir": str(mask_dir), "resident_bytes": t.pmp.mask.resident_bytes(),
              "mask_state_bytes": t.pmp.mask_state_bytes(),
              "sub_groups": len(t.pmp.layout.sub_group_sizes),
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


def complement_stays_bit_exact_at_theta0(out, name):
    """Checks a `_pmp_run` result (registered with each scenario that makes one)."""
    r = load_result(out, name)
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert all(p.dtype == dtype for p in r["after"].values()), "ran in the wrong precision"
    masks = full_masks(r["mask_dir"])
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


@scenario(FIRST, checked_in="tests/test_cluster_guards.py, tests/test_release.py, "
                            "tests/test_secrecy.py (also)")
def pmp_frozen(args):
    """The hooks work in chunks (of 4M elements by default): small ones here, so every
    sub-group of these runs spans many chunk boundaries."""
    import pmp_scale.chunking as chunking
    default, chunking.CHUNK = chunking.CHUNK, 4104
    try:
        _pmp_run(args, "pmp_frozen_fp32", mask_source="random", mask_ratio=0.5, mask_seed=5)
        _pmp_run(args, "pmp_frozen_bf16", precision="bf16", mask_source="random", mask_ratio=0.5)
        _pmp_run(args, "pmp_decay", mask_source="random", mask_ratio=0.5, complement="decay")
    finally:
        chunking.CHUNK = default


pmp_frozen.check(complement_stays_bit_exact_at_theta0,
                 cases=("pmp_frozen_fp32", "pmp_frozen_bf16"))


@pmp_frozen.check
def decay_complement_moves(out):
    r = load_result(out, "pmp_decay")
    masks = full_masks(r["mask_dir"])
    changed = sum((r["before"][n][~m] != r["after"][n][~m]).sum().item()
                  for n, m in masks.items())
    assert changed > 0.5 * sum((~m).sum().item() for m in masks.values())
    assert r["drift"] > 0


@scenario(FIRST, checked_in="tests/test_cluster_guards.py (also)")
def pmp_earlybird(args):
    _pmp_run(args, "pmp_earlybird", steps=8, mask_ratio=0.7, check_every=2, patience=2,
             warmup_max_steps=8, save_init=True)


def _expected_selected(meta: dict, ratio: float = 0.7) -> int:
    """k = round(ρ·N) over the selectable elements, plus every element of the always-trained
    (constant-initialised, by default) parameters, which are outside the ratio."""
    excluded = sum(meta["numel"][n] for n in meta["excluded_params"])
    assert excluded > 0  # llama-tiny's norm weights
    return math.floor(ratio * (meta["total_numel"] - excluded) + 0.5) + excluded


@pmp_earlybird.check
def private_artifact_matches_packbits_and_records_discovery(out):
    r = load_result(out, "pmp_earlybird")
    packed, meta = read_artifact(r["mask_dir"])
    masks = full_masks(r["mask_dir"])
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


@scenario(FIRST, checked_in="tests/test_cluster_guards.py (also)")
def pmp_scoped(args):
    """Early-bird with per-tensor top-k and exclusions, rewind, then 50 masked steps: the
    stale-moment path (Stage I moments are discarded) and the scope options together."""
    _pmp_run(args, "pmp_scoped", mask_ratio=0.5, topk_scope="per_tensor",
             exclude=["*embed*", "*norm*"], check_every=2, patience=2, warmup_max_steps=6)


pmp_scoped.check(complement_stays_bit_exact_at_theta0, cases=("pmp_scoped",))


@pmp_scoped.check
def scope_options_per_tensor_and_exclusions(out):
    r = load_result(out, "pmp_scoped")
    _, meta = read_artifact(r["mask_dir"])
    for name, m in full_masks(r["mask_dir"]).items():
        if "embed" in name or "norm" in name:
            assert m.all(), name
        else:
            assert m.sum().item() == math.floor(0.5 * m.numel() + 0.5), name
    trace = meta["discovery"]["trace"]
    assert meta["discovery"]["stop_reason"] == "step_limit" and [t["step"] for t in trace] == [2, 4, 6]
    assert trace[-1]["iou_final"] == 1.0 and all(0 < t["iou_final"] < 1 for t in trace[:-1])


@scenario(FIRST)
def pmp_offload(args):
    """Optimizer state and fp32 master offloaded to the host (ZeRO-Offload)."""
    _pmp_run(args, "pmp_offload", steps=20, mask_source="random", mask_ratio=0.5, mask_seed=5,
             ds={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})


pmp_offload.check(complement_stays_bit_exact_at_theta0, cases=("pmp_offload",))


@pmp_offload.check
def offload_clips_the_masked_gradient(out):
    """With the optimizer offloaded, the global norm is DeepSpeed's per-parameter cache: it
    must be the masked gradient's norm, as without offload (same mask seed, data and θ(0))."""
    first = [next(g for g in load_result(out, n)["grad_norms"] if g is not None)
             for n in ("pmp_offload", "pmp_frozen_fp32")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)


@scenario(FIRST)
def pmp_secret_seed(args):
    """A PMP run given no seed draws one per run and writes it only to private places."""
    seeds, orders, theta = [], [], []
    for i in (0, 1):
        cfg = config(args, f"pmp_secret_{i}", train={"max_steps": 2},
                     pmp={"enabled": True, "mask_source": "random"},
                     data={"shuffle_seed": None})  # as if not written: a secret order
        cfg = cfg.model_copy(update={"seed": None})
        t = Trainer(cfg)
        theta.append(gathered(t.model)["model.embed_tokens.weight"])
        t.train()
        seeds.append(t.init_seed)
        orders.append(t.shuffle_seed)
    save0({"seeds": seeds, "orders": orders, "same_theta0": torch.equal(*theta)},
          Path(args.out) / "pmp_secret_seed.pt")


@pmp_secret_seed.check
def pmp_run_without_a_seed_draws_a_secret_one(out):
    r = load_result(out, "pmp_secret_seed")
    a, b = r["seeds"]
    assert a != b and not r["same_theta0"] and r["orders"][0] != r["orders"][1]
    for i, seed in enumerate(r["seeds"]):
        run = out / f"pmp_secret_{i}"
        meta = read_artifact(run / "private" / "mask")[1]
        order = r["orders"][i]
        assert meta["init_seed"] == seed and meta["shuffle_seed"] == order != 17
        public = [run / "config.yaml", run / "metrics.jsonl"]
        assert all(str(s) not in p.read_text() for p in public if p.is_file() for s in (seed, order))
        assert "seed: null" in (run / "config.yaml").read_text()


@scenario(FIRST, SINGLE)
def pmp_random_mask(args):
    """Same mask seed => same random mask at any world size (compared across launches)."""
    cfg = config(args, f"pmp_random_w{world()}", train={"max_steps": 2, "global_batch_size": 8},
                 pmp={"enabled": True, "mask_source": "random", "mask_seed": 11,
                      "mask_ratio": 0.7})
    Trainer(cfg).train()


@pmp_random_mask.check
def random_mask_exact_count_and_world_size_invariant(out):
    a_packed, a_meta = read_artifact(out / "pmp_random_w1" / "private" / "mask")
    b_packed, b_meta = read_artifact(out / "pmp_random_w2" / "private" / "mask")
    assert a_meta["total_selected"] == _expected_selected(a_meta)
    for name in a_packed:
        assert torch.equal(a_packed[name], b_packed[name]), name


# --- PMP: resume, refusals, the rewind ----------------------------------------------------------
def _pmp_resume_cfg(args, name):
    """Early-bird discovery (stops at step 6) then 6 masked steps: 12 steps in all."""
    return config(args, name, train={"max_steps": 6},
                  pmp={"enabled": True, "mask_ratio": 0.6, "check_every": 2, "patience": 2,
                       "warmup_max_steps": 6, "score": "ema", "mask_seed": 3})


@scenario(FIRST)
def pmp_resume_first_half(args):
    full = Trainer(_pmp_resume_cfg(args, "pmp_full"))
    full.train()
    save0(losses(full.run_dir), Path(args.out) / "pmp_full_losses.pt")
    save0(gathered(full.model), Path(args.out) / "pmp_full_params.pt")
    Trainer(_pmp_resume_cfg(args, "pmp_in_stage1")).train(stop_at=3)   # mid discovery
    Trainer(_pmp_resume_cfg(args, "pmp_in_stage2")).train(stop_at=9)   # mid masked training
    Trainer(_pmp_resume_cfg(args, "pmp_stage1_only")).train(stop_at=3)  # resumed elsewhere only


@scenario(RESUMED, checked_in="tests/test_cluster_guards.py (also)")
def pmp_resume_second_half(args):
    for name in ("pmp_in_stage1", "pmp_in_stage2"):
        t = Trainer(_pmp_resume_cfg(args, name))
        t.resume("auto")
        t.train()
        save0(losses(t.run_dir), Path(args.out) / f"{name}_losses.pt")
        save0(gathered(t.model), Path(args.out) / f"{name}_params.pt")
        Path(args.out, f"{name}_memory_rank{rank()}.json").write_text(json.dumps({
            "mask_state_bytes": t.pmp.mask_state_bytes(),
            "local": sum(t.pmp.layout.sub_group_sizes),
            "sub_groups": len(t.pmp.layout.sub_group_sizes)}))
    _refused(args, "model", model={"preset": "gpt2-tiny"})


@pmp_resume_second_half.check(cases=("pmp_in_stage1", "pmp_in_stage2"))
def pmp_resume_is_bit_exact_in_both_stages(out, name):
    """Stopped mid-discovery or mid-masked-training, resumed in a fresh process."""
    full = load_result(out, "pmp_full_losses")
    resumed = load_result(out, f"{name}_losses")
    assert sorted(full) == list(range(1, 13)) == sorted(resumed)
    assert all(full[s] == resumed[s] for s in full), (full, resumed)
    a, b = load_result(out, "pmp_full_params"), load_result(out, f"{name}_params")
    assert all(torch.equal(a[n], b[n]) for n in a)
    full_mask = read_artifact(out / "pmp_full" / "private" / "mask")[0]
    mask = read_artifact(out / name / "private" / "mask")[0]
    assert all(torch.equal(full_mask[n], mask[n]) for n in full_mask)


@scenario(SINGLE)
def pmp_resume_refused(args):
    """At another world size, during discovery: the one elastic case that is refused."""
    _refused(args, "world", run="pmp_stage1_only")


def _refused(args, what, run="pmp_full", **over):
    """A checkpoint that cannot be resumed here is refused with a clear error."""
    cfg = _pmp_resume_cfg(args, run)
    if over:
        cfg = config(args, run, pmp=cfg.pmp.model_dump(), **over)
    try:
        Trainer(cfg).resume("auto")
        message = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        message = f"{type(err).__name__}: {err}"
    save0(message, Path(args.out) / f"pmp_refused_{what}.pt")


@pmp_resume_refused.check
def mismatched_checkpoint_is_refused_with_a_clear_error(out):
    world = load_result(out, "pmp_refused_world")  # at W=1, here
    model = load_result(out, "pmp_refused_model")  # another preset, in pmp_resume_second_half
    assert world.startswith("CheckpointError: elastic resume during Stage I (mask discovery) "
                            "is not supported"), world
    assert model.startswith("CheckpointError") and "preset is 'llama-tiny' there" in model


@scenario(FIRST)
def pmp_rewind(args):
    """Right after discovery (step 6) every weight is back at θ(0), persistent ones too."""
    t = Trainer(_pmp_resume_cfg(args, "pmp_rewind"))
    before = gathered(t.model)
    val0 = t.evaluate()
    t.train(stop_at=6)
    assert t.pmp.stage == 2 and t.pmp.stage2_start == 6
    inner = t.engine.optimizer.optimizer
    fresh = {"adam_states": len(inner.state), "lr": [g["lr"] for g in inner.param_groups],
             "base_lrs": list(t.engine.lr_scheduler.base_lrs),
             "last_epoch": t.engine.lr_scheduler.last_epoch, "factor0": t.schedule(0)}
    result = {"before": before, "after": gathered(t.model), "val0": val0, "val": t.evaluate(),
              "persistent": len(t.engine.optimizer.persistent_parameters), "fresh": fresh}
    t.train_step(t._batches())  # the first Stage II step: Adam starts from step 1
    steps = {int(st["step"]) for st in inner.state.values()}
    result["after_one"] = {"adam_steps": sorted(steps), "lr": [g["lr"] for g in inner.param_groups],
                           "factor1": t.schedule(1)}
    save0(result, Path(args.out) / "pmp_rewind.pt")


@pmp_rewind.check
def rewind_restores_every_weight_to_theta0(out):
    r = load_result(out, "pmp_rewind")
    assert r["persistent"] > 0  # the case that needs care: small params stay gathered
    for name, before in r["before"].items():
        assert torch.equal(before, r["after"][name]), name
    assert r["val"] == r["val0"]


@pmp_rewind.check
def rewind_starts_adam_and_the_lr_schedule_fresh(out):
    """Stage II after the rewind is a new run: no Adam moments or step counts carried over from
    Stage I's 6 steps, the LR back at the start of warm-up, and the first masked step is
    Adam's step 1 with the schedule's second value."""
    r = load_result(out, "pmp_rewind")
    fresh, one = r["fresh"], r["after_one"]
    assert fresh["adam_states"] == 0 and fresh["last_epoch"] == 0
    assert fresh["lr"] == [b * fresh["factor0"] for b in fresh["base_lrs"]]
    assert one["adam_steps"] == [1]
    assert one["lr"] == [b * one["factor1"] for b in fresh["base_lrs"]]
    assert one["lr"] != fresh["lr"]  # the schedule runs (warm-up: 2 steps)


# --- release tools ------------------------------------------------------------------------------
@scenario(FIRST, checked_in="tests/test_release.py")
def release_source(args):
    """A tied-embedding GPT-2 PMP run: its final params and logits, for the release round trip."""
    cfg = config(args, "release_source", seed=None, model={"preset": "gpt2-tiny"},
                 train={"max_steps": 4},
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


@scenario(FIRST, checked_in="tests/test_secrecy.py")
def leaky(args):
    """A PMP run with both exact leaks planted through the real path: a public (guessable) seed
    and constant-initialised norm weights left maskable."""
    Trainer(config(args, "leaky", seed=1234, train={"max_steps": 6},
                   pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5,
                        "exclude_constant_init": False, "save_init": True})).train()


# --- `complement: project` (the authors' Stage II) ----------------------------------------------
class _GradRecorder:
    """A step hook that runs before the PMP controller's: this rank's reduced gradient
    partition (before any masking) and the learning rate of every optimizer step."""

    def __init__(self):
        self.grads, self.lrs = [], []

    def before_step(self, engine, step):
        zero = engine.optimizer
        self.grads.append(zero.grad_partitions_flat_buffer.detach().cpu().clone())
        self.lrs.append(zero.optimizer.param_groups[0]["lr"])

    def after_step(self, engine, step):
        pass


RADIUS, EVERY = 2.0, 2


@scenario(FIRST, PADDED)
def pmp_project(args):
    """`complement: project`, 6 masked steps (projection every 2), no clipping: θ(0), final
    weights, every rank's raw gradients and LRs, for the single-process reference."""
    from pmp_scale.mask.project import complement_norm
    name = f"pmp_project_w{world()}"
    cfg = config(args, name, train={"max_steps": 6, "global_batch_size": 12},
                 optim={"grad_clip": 0.0},
                 pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5,
                      "mask_seed": 5, "complement": "project", "project_every": EVERY,
                      "project_radius": RADIUS, "project_radius_mode": "absolute",
                      "save_init": True})
    rec = _GradRecorder()
    t = Trainer(cfg, hooks=[rec])
    before = gathered(t.model)
    t.train()
    layout = t.pmp.layout
    starts = [0]
    for n in layout.sub_group_sizes:
        starts.append(starts[-1] + n)
    pieces = {e.name: (e.slice.start, [g[starts[e.sub_group] + e.offset:
                                         starts[e.sub_group] + e.offset + e.slice.length].clone()
                                       for g in rec.grads]) for e in layout.entries}
    torch.save(pieces, Path(args.out) / f"{name}_grads_rank{rank()}.pt")
    norm = complement_norm(t.engine, t.pmp.mask, t.engine.device)
    save0({"before": before, "after": gathered(t.model), "lrs": rec.lrs, "norm": norm,
           "drift": t.pmp.drift(), "persistent": len(t.engine.optimizer.persistent_parameters),
           "mask_dir": str(Path(cfg.run_dir) / "private" / "mask"),
           "run_dir": str(cfg.run_dir)}, Path(args.out) / f"{name}.pt")


def _full_grads(out: Path, world: int, shapes: dict) -> list[dict[str, torch.Tensor]]:
    """Every step's full (unmasked, rank-averaged) gradient per parameter, from the rank pieces."""
    ranks = [torch.load(out / f"pmp_project_w{world}_grads_rank{r}.pt") for r in range(world)]
    steps = len(next(iter(ranks[0].values()))[1])
    grads = []
    for s in range(steps):
        full = {}
        for name, shape in shapes.items():
            flat = torch.empty(math.prod(shape))
            for piece in ranks:
                start, per_step = piece[name]
                flat[start:start + per_step[s].numel()] = per_step[s]
            full[name] = flat.view(shape)
        grads.append(full)
    return grads


def _project_reference(theta0, grads, lrs, masks, wd=0.1):
    """Plain torch: masked gradients, AdamW (the engine's groups: no decay on 1-D tensors),
    projection every EVERY steps."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in theta0.items()}
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    norms = []
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for n, p in params.items():
            p.grad = g[n].masked_fill(~masks[n], 0)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        if step % EVERY == 0:
            with torch.no_grad():
                norm = math.sqrt(sum(p[~masks[n]].double().square().sum().item()
                                     for n, p in params.items()))
                norms.append(norm)
                if norm > RADIUS:
                    for n, p in params.items():
                        p[~masks[n]] = p[~masks[n]] * (RADIUS / norm)
    return {n: p.detach() for n, p in params.items()}, norms


@pmp_project.check(cases=(2, 3))
def project_matches_the_single_process_reference(out, world):
    """At 2 and 3 ranks against a single-process reference in plain torch: same θ(0), same
    gradients (recorded from the ranks before any masking), masked AdamW with weight decay,
    projection of the complement to global L2 norm ≤ R.

    Arithmetic: with clipping off, AdamW is elementwise, so every masked element must match the
    reference bit for bit. The complement is scaled by R/‖c‖, and ‖c‖ is summed in another
    order (per rank, then all-reduced) than in the reference: complement elements may differ by
    a few ulps, stated as a relative tolerance of 1e-6."""
    r = load_result(out, f"pmp_project_w{world}")
    _, meta = read_artifact(Path(r["mask_dir"]))
    assert meta["complement"] == "project" and meta["project_every"] == EVERY
    shapes = {n: t.shape for n, t in r["before"].items()}
    unpacked = full_masks(r["mask_dir"])
    masks = {n: unpacked[n] for n in shapes}
    ref, norms = _project_reference(r["before"], _full_grads(out, world, shapes), r["lrs"], masks)
    # the first projection binds; after it only weight decay moves the complement (no gradient)
    assert len(r["lrs"]) == 6 and norms[0] > 2 * RADIUS and max(norms[1:]) < RADIUS
    assert r["persistent"] > 0  # small always-gathered params must follow the master too
    worst = 0.0
    for n, after in r["after"].items():
        m = masks[n]
        assert torch.equal(after[m], ref[n][m]), f"{n}: masked elements differ"
        rel = ((after[~m] - ref[n][~m]).abs() / ref[n][~m].abs().clamp_min(1e-30)).max().item() \
            if (~m).any() else 0.0
        worst = max(worst, rel)
        assert not torch.equal(after[~m], r["before"][n][~m]) or not (~m).any(), n
    assert worst <= 1e-6, worst
    # the run's own global complement norm at the end: the reference's, within the radius
    final = math.sqrt(sum(ref[n][~masks[n]].double().square().sum().item() for n in ref))
    assert r["norm"] == pytest.approx(final, rel=1e-6) and r["norm"] <= RADIUS
    assert r["drift"] > 0  # a measurement, not a failure, in project mode


@pmp_project.check
def release_audit_does_not_check_a_projected_complement(out, tmp_path):
    """The audit's "complement == θ(0)" check is for `frozen` only: a project run's release is
    not reported as moved, and the audit says why the complement was not compared (the mask
    attacks may still report leaks: that is their job)."""
    import shutil
    from pmp_scale.release import release_checkpoint, resolve_checkpoint
    from pmp_scale.secrecy import audit_release
    r = load_result(out, "pmp_project_w2")
    private = tmp_path / "mask"
    shutil.copytree(r["mask_dir"], private)
    release_checkpoint(resolve_checkpoint(r["run_dir"]), tmp_path / "release",
                       private_dir=private, progress=False)
    audit = audit_release(tmp_path / "release", private, load=False)
    assert not [p for p in audit.problems if "θ(0)" in p], audit.problems
    assert any("complement: project moves it by design" in line for line in audit.report)


# --- guards -------------------------------------------------------------------------------------
@scenario(FIRST, checked_in="tests/test_cluster_guards.py")
def pmp_h2_guard(args):
    """H2 is broken on purpose: the restore hook no longer recognises sub-group 0, so its
    complement would train like `decay`. The step must fail instead (and a working step not)."""
    from pmp_scale.mask.update import MaskedUpdateError
    cfg = config(args, "pmp_h2_guard", train={"max_steps": 2},
                 pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5},
                 deepspeed={"zero_optimization": {"sub_group_size": 20_000}})
    t = Trainer(cfg)
    update = t.pmp.update
    batches = t._batches()
    t.train_step(batches)  # intact hooks: no error
    t.state.step += 1
    first = update.fp32_flat[0].data_ptr()
    update._group_of = {ptr: g for ptr, g in update._group_of.items() if ptr != first}
    try:
        t.train_step(batches)
        error = None
    except MaskedUpdateError as err:
        error = str(err)
    save0({"error": error, "sub_groups": len(update.fp32_flat)},
          Path(args.out) / "pmp_h2_guard.pt")


@scenario(checked_in="tests/test_launcher.py (slow: its own launch)")
def big_presets(args):
    """llama-1.1b and llama-7b under zero.Init: each rank only ever holds its partitions."""
    import psutil
    from pmp_scale.models import build_hf_config, build_model
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3}}
    result = {}
    for preset in ("llama-1.1b", "llama-7b"):
        gc.collect()
        before = psutil.Process().memory_info().rss
        model = build_model(build_hf_config(preset), ds_config=ds, dtype=torch.bfloat16)
        result[preset] = {
            "params": {n: [p.ds_numel, p.ds_tensor.numel()] for n, p in model.named_parameters()},
            "rss_growth": psutil.Process().memory_info().rss - before}
        del model
    Path(args.out, f"big_presets_rank{rank()}.json").write_text(json.dumps(result))


# --- fault tolerance: launched by tests/test_fault_tolerance.py (faults injected per launch) --
def _fault_cfg(args, name, **over):
    """PMP, discovery stops at step 6, then 6 masked steps; a checkpoint every 2 steps."""
    sections = {"train": {"max_steps": 6}, "checkpoint": {"every": 2, "keep": 2},
                "pmp": {"enabled": True, "mask_ratio": 0.6, "check_every": 2, "patience": 9,
                        "warmup_max_steps": 6}}
    for key, value in over.items():
        sections.setdefault(key, {}).update(value)
    return config(args, name, **sections)


def _run_to_end(args, name, **over):
    """Resume if possible, train; once the run is complete, record its final state."""
    t = Trainer(_fault_cfg(args, name, **over), faults=args.faults)
    t.resume("auto")
    t.train()
    if t._finished():
        save0({"losses": losses(t.run_dir), "params": gathered(t.model),
               "resumed_from": getattr(t, "resumed_from", None)},
              Path(args.out) / f"{name}_final.pt")
    return t


@scenario(FIRST, checked_in="tests/test_fault_tolerance.py")
def fault_reference(args):
    _run_to_end(args, "fault_ref")


@scenario(checked_in="tests/test_fault_tolerance.py")
def fault_chain(args):
    """Run with --fault (a rank SIGKILLs itself somewhere); relaunched until complete."""
    _run_to_end(args, "fault_chain")


@scenario(checked_in="tests/test_fault_tolerance.py")
def sigterm_run(args):
    """Under --fault rank1:step:5:TERM every rank checkpoints step 5 and returns."""
    t = _run_to_end(args, "sigterm")
    save0(t.state.step, Path(args.out) / f"sigterm_stopped_at_{t.state.step}")


@scenario(FIRST, checked_in="tests/test_fault_tolerance.py")
def nonfinite(args):
    """NaN losses at steps 3-4: skipped, weights untouched; at 3-4-5... (2 allowed): stop."""
    class NaNTrainer(Trainer):
        bad_steps: set = set()
        snapshots: dict = {}

        def _forward(self, batch):
            loss = super()._forward(batch)
            return loss * float("nan") if self.state.step + 1 in self.bad_steps else loss

        def train_step(self, batches):
            loss = super().train_step(batches)
            self.snapshots[self.state.step + 1] = gathered(self.model)
            return loss

    skip = NaNTrainer(_fault_cfg(args, "nan_skip", train={"nonfinite_max_in_a_row": 3}))
    skip.bad_steps = {3, 4}
    skip.train()
    stop = NaNTrainer(_fault_cfg(args, "nan_stop", train={"nonfinite_max_in_a_row": 2}))
    stop.bad_steps = set(range(3, 100))
    stop.snapshots = {}
    try:
        stop.train()
        error = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        error = f"{type(err).__name__}: {err}"
    save0({"skipped": skip.state.skipped, "skip_snapshots": skip.snapshots,
           "skip_losses": losses(skip.run_dir), "stop_error": error,
           "stop_snapshots": stop.snapshots}, Path(args.out) / "nonfinite.pt")


@scenario(FIRST, checked_in="tests/test_fault_tolerance.py")
def corrupt_setup(args):
    """Runs whose checkpoints the test corrupts: two tags (2, 4) and a single tag (2)."""
    Trainer(_fault_cfg(args, "corrupt_two")).train(stop_at=4)
    Trainer(_fault_cfg(args, "corrupt_one")).train(stop_at=2)
    Trainer(_fault_cfg(args, "enospc")).train(stop_at=4)


@scenario(checked_in="tests/test_fault_tolerance.py")
def enospc_in_torch_save(args):
    """Rank 1's disk fills while DeepSpeed writes its step-6 optimizer file: torch.save leaves a
    partial file and raises its own RuntimeError (the real one, from writing to /dev/full)."""
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if rank() == 1 and str(f).endswith("step00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            Path(f).write_bytes(b"PK\x03\x04 truncated")
            return real_save(obj, "/dev/full", *a, **kw)
        return real_save(obj, f, *a, **kw)

    torch.save = save
    try:
        _run_to_end(args, "enospc")
    finally:
        torch.save = real_save


@scenario(checked_in="tests/test_fault_tolerance.py")
def corrupt_resume(args):
    """After the test planted corruption / a failed save: what does resume pick?"""
    records = logging.getLogger("pmp_scale")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    records.addHandler(handler)
    result = {}
    for name in ("corrupt_two", "corrupt_one", "enospc"):
        seen.clear()
        try:
            t = Trainer(_fault_cfg(args, name))
            t.resume("auto")
            result[name] = {"step": t.state.step, "warnings": list(seen)}
        except Exception as err:  # noqa: BLE001 - recorded for the test
            result[name] = {"error": f"{type(err).__name__}: {err}", "warnings": list(seen)}
    save0(result, Path(args.out) / "corrupt_resume.pt")


@scenario(FIRST, checked_in="tests/test_fault_tolerance.py")
def elastic_setup(args):
    """A 2-rank PMP run stopped in Stage II (step 8), copied for resumes at W=1 and W=4.
    Without save_init: its Stage II checkpoint holds no θ(0), the re-cut rebuilds it."""
    import shutil
    Trainer(_fault_cfg(args, "elastic")).train(stop_at=8)
    if rank() == 0:
        for w in (1, 4):
            shutil.copytree(Path(args.out) / "elastic", Path(args.out) / f"elastic_w{w}")
    dist.barrier()


@scenario(SINGLE, checked_in="tests/test_fault_tolerance.py (W=4: its own launch)")
def elastic_resume(args):
    t = _run_to_end(args, f"elastic_w{world()}")
    drift = t.pmp.drift()  # against the θ(0) rebuilt from the universal checkpoint
    save0(drift, Path(args.out) / f"elastic_w{world()}_drift.pt")


@fail_cleanly
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--fault", help="a FaultPlan spec for the fault scenarios, e.g. "
                        "rank1:save_files:4 (pmp_scale/faults.py)")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    args.faults = FaultPlan(args.fault, dist.get_rank()) if args.fault else Faults()
    for name in args.scenarios.split(","):
        TABLE[name].run(args)
        Path(args.out, f"done_{name}_rank{dist.get_rank()}").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
