"""Multi-rank scenarios, run under `deepspeed --num_gpus W`; results land in --out for pytest.

One launch runs many scenarios (each launch costs ~20 s of start-up on CPU), so tests share
launches instead of starting DeepSpeed per test. Every scenario writes plain files; the
assertions live in tests/test_distributed.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import deepspeed  # noqa: E402

from pmp_scale.cli import fail_cleanly  # noqa: E402
from pmp_scale.config import parse_config  # noqa: E402
from pmp_scale.engine import Trainer, init_distributed  # noqa: E402

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def config(args, name: str, **sections) -> object:
    """A tiny run's config. Also lines ranks up before the next Trainer: streaming picks its
    shared-memory names from those still in use, so earlier loaders must be gone on every
    rank alike (garbage collection timing differs between processes)."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
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


def _pmp_resume_cfg(args, name):
    """Early-bird discovery (stops at step 6) then 6 masked steps: 12 steps in all."""
    return config(args, name, train={"max_steps": 6},
                  pmp={"enabled": True, "mask_ratio": 0.6, "check_every": 2, "patience": 2,
                       "warmup_max_steps": 6, "score": "ema"})


@scenario
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


@scenario
def pmp_resume_first_half(args):
    full = Trainer(_pmp_resume_cfg(args, "pmp_full"))
    full.train()
    save0(losses(full.run_dir), Path(args.out) / "pmp_full_losses.pt")
    save0(gathered(full.model), Path(args.out) / "pmp_full_params.pt")
    Trainer(_pmp_resume_cfg(args, "pmp_in_stage1")).train(stop_at=3)   # mid discovery
    Trainer(_pmp_resume_cfg(args, "pmp_in_stage2")).train(stop_at=9)   # mid masked training
    Trainer(_pmp_resume_cfg(args, "pmp_stage1_only")).train(stop_at=3)  # resumed elsewhere only


@scenario
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


@scenario
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


# --- issue: PMP core ----------------------------------------------------------------------------
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


@scenario
def pmp_frozen(args):
    """The hooks work in chunks (of 32M elements by default): small ones here, so every
    sub-group of these runs spans many chunk boundaries."""
    import pmp_scale.mask.update as update
    default, update.CHUNK = update.CHUNK, 4104
    try:
        _pmp_run(args, "pmp_frozen_fp32", mask_source="random", mask_ratio=0.5, mask_seed=5)
        _pmp_run(args, "pmp_frozen_bf16", precision="bf16", mask_source="random", mask_ratio=0.5)
        _pmp_run(args, "pmp_decay", mask_source="random", mask_ratio=0.5, complement="decay")
    finally:
        update.CHUNK = default


@scenario
def pmp_earlybird(args):
    _pmp_run(args, "pmp_earlybird", steps=8, mask_ratio=0.7, check_every=2, patience=2,
             warmup_max_steps=8, save_init=True)


@scenario
def pmp_scoped(args):
    """Early-bird with per-tensor top-k and exclusions, rewind, then 50 masked steps: the
    stale-moment path (Stage I moments are discarded) and the scope options together."""
    _pmp_run(args, "pmp_scoped", mask_ratio=0.5, topk_scope="per_tensor",
             exclude=["*embed*", "*norm*"], check_every=2, patience=2, warmup_max_steps=6)


@scenario
def pmp_offload(args):
    """Optimizer state and fp32 master offloaded to the host (ZeRO-Offload)."""
    _pmp_run(args, "pmp_offload", steps=20, mask_source="random", mask_ratio=0.5, mask_seed=5,
             ds={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})


@scenario
def pmp_secret_seed(args):
    """A PMP run given no seed draws one per run and writes it only to private places."""
    seeds, theta = [], []
    for i in (0, 1):
        cfg = config(args, f"pmp_secret_{i}", train={"max_steps": 2},
                     pmp={"enabled": True, "mask_source": "random"})
        cfg = cfg.model_copy(update={"seed": None})
        t = Trainer(cfg)
        theta.append(gathered(t.model)["model.embed_tokens.weight"])
        t.train()
        seeds.append(t.init_seed)
    save0({"seeds": seeds, "same_theta0": torch.equal(*theta)},
          Path(args.out) / "pmp_secret_seed.pt")


@scenario
def pmp_random_mask(args):
    """Same mask seed => same random mask at any world size (compared across launches)."""
    cfg = config(args, f"pmp_random_w{world()}", train={"max_steps": 2, "global_batch_size": 8},
                 pmp={"enabled": True, "mask_source": "random", "mask_seed": 11,
                      "mask_ratio": 0.7})
    Trainer(cfg).train()


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


@scenario
def pmp_project(args):
    """`complement: project`, 6 masked steps (projection every 2), no clipping: θ(0), final
    weights, every rank's raw gradients and LRs, for the single-process reference."""
    from pmp_scale.mask.project import complement_norm
    name = f"pmp_project_w{world()}"
    cfg = config(args, name, train={"max_steps": 6, "global_batch_size": 12},
                 optim={"grad_clip": 0.0},
                 pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5,
                      "mask_seed": 5, "complement": "project", "project_every": 2,
                      "project_radius": 2.0, "save_init": True})
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


@scenario
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


# --- issue: release tools -------------------------------------------------------------------------
@scenario
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


@scenario
def leaky(args):
    """A PMP run with both exact leaks planted through the real path: a public (guessable) seed
    and constant-initialised norm weights left maskable."""
    Trainer(config(args, "leaky", seed=1234, train={"max_steps": 6},
                   pmp={"enabled": True, "mask_source": "random", "mask_ratio": 0.5,
                        "exclude_constant_init": False, "save_init": True})).train()


@scenario
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


# --- issue: fault tolerance -------------------------------------------------------------------
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
    t = Trainer(_fault_cfg(args, name, **over))
    t.resume("auto")
    t.train()
    if t._finished():
        save0({"losses": losses(t.run_dir), "params": gathered(t.model),
               "resumed_from": getattr(t, "resumed_from", None)},
              Path(args.out) / f"{name}_final.pt")
    return t


@scenario
def fault_reference(args):
    _run_to_end(args, "fault_ref")


@scenario
def fault_chain(args):
    """Run under PMP_FAULT (a rank SIGKILLs itself somewhere); relaunched until complete."""
    _run_to_end(args, "fault_chain")


@scenario
def sigterm_run(args):
    """Under PMP_FAULT=rank1:step:5:TERM every rank checkpoints step 5 and returns."""
    t = _run_to_end(args, "sigterm")
    save0(t.state.step, Path(args.out) / f"sigterm_stopped_at_{t.state.step}")


@scenario
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


@scenario
def corrupt_setup(args):
    """Runs whose checkpoints the test corrupts: two tags (2, 4) and a single tag (2)."""
    Trainer(_fault_cfg(args, "corrupt_two")).train(stop_at=4)
    Trainer(_fault_cfg(args, "corrupt_one")).train(stop_at=2)
    Trainer(_fault_cfg(args, "enospc")).train(stop_at=4)


@scenario
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


@scenario
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


@scenario
def elastic_setup(args):
    """A 2-rank PMP run stopped in Stage II (step 8), copied for resumes at W=1 and W=4.
    Without save_init: its Stage II checkpoint holds no θ(0), the re-cut rebuilds it."""
    import shutil
    Trainer(_fault_cfg(args, "elastic")).train(stop_at=8)
    if rank() == 0:
        for w in (1, 4):
            shutil.copytree(Path(args.out) / "elastic", Path(args.out) / f"elastic_w{w}")
    dist.barrier()


@scenario
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
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    for name in args.scenarios.split(","):
        SCENARIOS[name](args)
        Path(args.out, f"done_{name}_rank{dist.get_rank()}").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
