"""PMP overhead, measured side by side on one engine: dense vs masked step time, the cost of a
discovery check, and the resident mask size.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/pmp_step_bench.py [--preset llama-demo]
        [--data data/demo/mds --tokenizer data/demo/spm4k.model] [--blocks 6 --steps 5]

Dense and PMP steps alternate in blocks on the same engine and data stream (the masked-update
hooks are attached only for PMP blocks), so machine noise hits both alike; the table reports
medians of per-block means.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pmp_scale.config import parse_config  # noqa: E402
from pmp_scale.engine import Trainer  # noqa: E402
from pmp_scale.mask.discovery import EarlyBird  # noqa: E402
from pmp_scale.chunking import CHUNK  # noqa: E402
from pmp_scale.mask.update import MaskedUpdate  # noqa: E402
from pmp_scale.zero3 import init_distributed  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(trainer, batches, n) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step(batches)
        trainer.state.step += 1
    sync()
    return (time.perf_counter() - start) / n


def dense_vs_masked(t: Trainer, batches, blocks: int, steps: int) -> tuple[list, list]:
    """Seconds per step, dense and with the masked update, in interleaved blocks on the same
    engine (so drift in the machine's speed hits both alike)."""
    pmp = t.pmp
    dense, masked = [], []
    for _ in range(blocks):
        t.hooks = []
        pmp.update.remove()
        dense.append(timed_steps(t, batches, steps))
        pmp.update = MaskedUpdate(t.engine, pmp.mask, "frozen")
        t.hooks = [pmp]
        masked.append(timed_steps(t, batches, steps))
    return dense, masked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-demo")
    p.add_argument("--data", default="data/demo/mds")
    p.add_argument("--tokenizer", default="data/demo/spm4k.model")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="auto")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--checks", type=int, default=5, help="discovery checks to time")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed()
    run_dir = [tempfile.mkdtemp(prefix="pmp_bench_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run_dir, src=0)  # one run_dir for all ranks (it is checked)
    cfg = parse_config({
        "run_dir": run_dir[0], "seed": 1,
        "model": {"preset": args.preset},
        "data": {"path": args.data, "tokenizer": args.tokenizer},
        "train": {"micro_batch_size": args.micro_batch,
                  "global_batch_size": args.micro_batch * world,
                  "max_steps": 10**6, "precision": args.precision},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "logging": {"tensorboard": False},
        # no drift measurement inside the timed blocks
        "pmp": {"enabled": True, "mask_source": "random", "mask_ratio": 0.7,
                "drift_every": 10**9},
    })
    t = Trainer(cfg)
    pmp = t.pmp
    batches = t._batches()
    timed_steps(t, batches, 2)  # warm-up (allocations, first optimizer state)

    dense, masked = dense_vs_masked(t, batches, args.blocks, args.steps)

    # A discovery check = top-k selection + IoU on this step's partitioned gradients.
    eb = EarlyBird(pmp.selector, score="step", check_every=1, iou_threshold=0.99,
                   patience=10**6, max_steps=10**6)
    check_times = []
    for _ in range(args.checks):
        for _ in range(t.grad_accum):
            t.engine.backward(t._forward(next(batches)))
        sync()
        start = time.perf_counter()
        eb.observe(t.engine)
        sync()
        check_times.append(time.perf_counter() - start)
        t.engine.step()

    local = sum(pmp.layout.sub_group_sizes)
    # Everything mask-related the rank keeps (PMPController.mask_state_bytes): Stage II = the
    # mask alone. Stage I also keeps the current candidate and a host history of candidates.
    bits_per_param = 8 * pmp.mask_state_bytes() / local
    stage1_bits = 8 * sum(b.numel() for m in [eb.candidate, *eb.history] for b in m.bits) / local
    d, m = statistics.median(dense), statistics.median(masked)
    c = statistics.median(check_times[1:] or check_times)
    rows = {"device": "cuda" if torch.cuda.is_available() else "cpu", "world_size": world,
            "preset": args.preset, "params": t.n_params, "local_elements_per_rank": local,
            "dense_step_s": d, "pmp_step_s": m, "ratio": m / d,
            "discovery_check_s": c, "check_vs_step": c / d,
            "mask_bytes_per_rank": pmp.mask_state_bytes(), "mask_bits_per_param": bits_per_param,
            "stage1_candidate_bits_per_param": stage1_bits, "stage1_checks": len(eb.history)}
    if dist.get_rank() == 0:
        print(f"\nPMP overhead — {rows['preset']} ({t.n_params / 1e6:.2f}M params), "
              f"{world} rank(s) on {rows['device']}, {t.precision}, "
              f"{args.blocks} blocks x {args.steps} steps each, interleaved")
        print(f"| {'measure':<38} | {'value':>14} |")
        print(f"|{'-' * 40}|{'-' * 16}|")
        for name, value in [
                ("dense step (s, median of blocks)", f"{d:.4f}"),
                ("PMP step, frozen complement (s)", f"{m:.4f}"),
                ("PMP / dense step time", f"{m / d:.3f}x"),
                ("discovery check: top-k + IoU (s)", f"{c:.4f}"),
                ("discovery check / dense step", f"{c / d:.2f}x"),
                ("Stage II mask state bytes per rank", f"{pmp.mask_state_bytes():,}"),
                ("Stage II mask bits per local parameter", f"{bits_per_param:.4f}"),
                (f"Stage I candidates, {len(eb.history)} checks (bits/p)", f"{stage1_bits:.4f}"),
                ("transient: unpacked mask chunk (B)",
                 f"{min(max(pmp.layout.sub_group_sizes), CHUNK):,}")]:
            print(f"| {name:<38} | {value:>14} |")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
